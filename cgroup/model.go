package cgroup

import (
	"fmt"
	"math"
	"os"

	"github.com/opencontainers/cgroups"
)

// Amount is a CPU and memory quantity.
type Amount struct {
	CPU    float64 `json:"cpu_cores"`
	Memory int64   `json:"memory_bytes"`
}

// Spec is a container's resource request.
type Spec struct {
	Guarantee Amount `json:"guarantee"`
	Ceiling   Amount `json:"ceiling"`
	PidsMax   int64  `json:"pids_max"`
}

// minMemory is the smallest memory ceiling accepted: below it the container's
// init cannot even start, and the failure would look like a runtime bug.
const minMemory = 4 << 20

// cfsPeriod is the CFS period used for quotas, the kernel's default (100 ms).
const cfsPeriod = 100000

// Normalize fills defaults (the ceiling defaults to the guarantee) and
// validates the spec. Errors name the field and the value.
func (s *Spec) Normalize() error {
	g, c := &s.Guarantee, &s.Ceiling
	for _, f := range []struct {
		name string
		v    float64
	}{{"cpu guarantee", g.CPU}, {"cpu limit", c.CPU}} {
		if f.v < 0 || math.IsNaN(f.v) || math.IsInf(f.v, 0) {
			return fmt.Errorf("%s %v: must be a non-negative number of cores: %w", f.name, f.v, ErrInvalid)
		}
	}
	if g.Memory < 0 {
		return fmt.Errorf("memory guarantee %d: negative: %w", g.Memory, ErrInvalid)
	}
	if c.Memory < 0 {
		return fmt.Errorf("memory limit %d: negative: %w", c.Memory, ErrInvalid)
	}
	if s.PidsMax < 0 {
		return fmt.Errorf("pids %d: negative: %w", s.PidsMax, ErrInvalid)
	}
	if c.CPU == 0 {
		c.CPU = g.CPU
	}
	if c.Memory == 0 {
		c.Memory = g.Memory
	}
	if g.CPU > c.CPU {
		return fmt.Errorf("cpu guarantee %v above cpu limit %v: %w", g.CPU, c.CPU, ErrInvalid)
	}
	if g.Memory > c.Memory {
		return fmt.Errorf("memory guarantee %s above memory limit %s: %w", FormatSize(g.Memory), FormatSize(c.Memory), ErrInvalid)
	}
	if c.Memory != 0 && c.Memory < minMemory {
		return fmt.Errorf("memory limit %s: below the minimum %s: %w", FormatSize(c.Memory), FormatSize(minMemory), ErrInvalid)
	}
	if c.CPU != 0 && c.CPU < 0.01 {
		return fmt.Errorf("cpu limit %v: below the minimum 0.01 cores: %w", c.CPU, ErrInvalid)
	}
	return nil
}

// SharesForCores converts a CPU guarantee to a v1 cpu.shares weight: 1024 per
// core, the kernel's weight of one default task, so guarantees divide the
// CPU in proportion when all containers are busy. 0 cores keeps the default.
func SharesForCores(cores float64) uint64 {
	if cores <= 0 {
		return 0
	}
	s := uint64(math.Round(cores * 1024))
	if s < 2 {
		s = 2 // the kernel's minimum
	}
	return s
}

// Resources maps s onto libcontainer's cgroup resources: the ceiling as hard
// limits (CFS quota, memory limit), the guarantee as a weight and soft limit.
func (s Spec) Resources() *cgroups.Resources {
	r := &cgroups.Resources{}
	if s.Ceiling.CPU > 0 {
		r.CpuPeriod = cfsPeriod
		r.CpuQuota = int64(math.Ceil(s.Ceiling.CPU * cfsPeriod))
	}
	r.CpuShares = SharesForCores(s.Guarantee.CPU)
	if s.Ceiling.Memory > 0 {
		r.Memory = s.Ceiling.Memory
		// No swap on top of the ceiling (v1 memsw equals the limit when swap accounting exists).
	}
	if s.Guarantee.Memory > 0 {
		r.MemoryReservation = s.Guarantee.Memory
	}
	if s.PidsMax > 0 {
		p := s.PidsMax
		r.PidsLimit = &p
	}
	return r
}

// Mode reports the host's cgroup mode: "v2" (unified) or "v1" (legacy or
// hybrid: v1 controllers, possibly an empty unified hierarchy beside them).
func Mode() string {
	if cgroups.IsCgroup2UnifiedMode() {
		return "v2"
	}
	if _, err := os.Stat("/sys/fs/cgroup/unified/cgroup.controllers"); err == nil {
		return "v1 (hybrid)"
	}
	return "v1"
}
