package cgroup

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// V1Driver drives cgroup v1 (legacy or hybrid): cpu.shares and
// cpu.cfs_quota_us in the cpu hierarchy, memory.soft_limit_in_bytes and
// memory.limit_in_bytes in the memory hierarchy, pids.max, usage from
// cpuacct and memory, and per-container PSI from the cgroup's twin in the
// unified hierarchy (hybrid mode places every task there too).
type V1Driver struct {
	root string
	// dirs maps a controller ("cpu", "cpuacct", "memory", "pids",
	// "unified") to its mount under root ("cpu,cpuacct" where co-mounted).
	dirs map[string]string
	f    files
}

var _ Driver = (*V1Driver)(nil)

// NewV1Driver finds the v1 hierarchies under root ("": DefaultRoot). cpu and
// memory must exist; cpuacct, pids and unified are used when present.
func NewV1Driver(root string) (*V1Driver, error) {
	if root == "" {
		root = DefaultRoot
	}
	return newV1Driver(root, filesFor(root))
}

func newV1Driver(root string, f files) (*V1Driver, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("cgroup v1 root %s: %w", root, err)
	}
	d := &V1Driver{root: root, dirs: map[string]string{}, f: f}
	for _, want := range []string{"cpu", "cpuacct", "memory", "pids", "unified"} {
		for _, e := range entries {
			if !e.IsDir() && e.Type()&os.ModeSymlink == 0 {
				continue
			}
			if e.Name() == want || slices.Contains(strings.Split(e.Name(), ","), want) {
				d.dirs[want] = filepath.Join(root, e.Name())
				if e.Name() == want {
					break
				}
			}
		}
	}
	for _, need := range []string{"cpu", "memory"} {
		if d.dirs[need] == "" {
			return nil, fmt.Errorf("cgroup v1 root %s: no %s hierarchy: %w", root, need, os.ErrNotExist)
		}
	}
	return d, nil
}

// Version implements Driver.
func (d *V1Driver) Version() string { return "v1" }

func (d *V1Driver) dir(controller, path string) string {
	base := d.dirs[controller]
	if base == "" {
		return ""
	}
	return filepath.Join(base, filepath.Clean("/"+path))
}

// Apply implements Driver. Order: CPU weight and quota; memory soft limit
// (the guarantee) before any change of the hard limit; the hard limit
// raised in one write, or lowered with a step-down on EBUSY; pids.max.
func (d *V1Driver) Apply(path string, l Limits) (Applied, error) {
	if err := l.validate(); err != nil {
		return Applied{}, fmt.Errorf("cgroup %s: %w", path, err)
	}
	var errs []error
	cpu := d.dir("cpu", path)
	errs = append(errs,
		d.f.Write(cpu, "cpu.shares", strconv.FormatUint(guaranteeShares(l.Guarantee.CPU), 10)),
		d.f.Write(cpu, "cpu.cfs_period_us", strconv.Itoa(cfsPeriod)),
		d.f.Write(cpu, "cpu.cfs_quota_us", strconv.FormatInt(quotaFor(l.Ceiling.CPU), 10)))

	mem := d.dir("memory", path)
	applied, err := d.applyMemory(mem, l)
	errs = append(errs, err)

	if pids := d.dir("pids", path); pids != "" {
		errs = append(errs, d.f.Write(pids, "pids.max", pidsValue(l.PidsMax)))
	}
	return applied, errors.Join(errs...)
}

func pidsValue(n int64) string {
	if n <= 0 {
		return "max"
	}
	return strconv.FormatInt(n, 10)
}

// applyMemory sets the soft limit to the guarantee and moves the hard limit
// to the ceiling. Lowering a v1 limit makes the kernel reclaim synchronously
// and answer EBUSY when it cannot get under the new limit (anonymous memory
// without swap, say); v1 has no memory.high to throttle instead, and never
// OOM-kills on such a write. On EBUSY the limit is held at usage +
// holdHeadroom (never below the guarantee) and the step-down is pending.
func (d *V1Driver) applyMemory(dir string, l Limits) (Applied, error) {
	// memory.soft_limit_in_bytes is the guarantee: under global memory
	// pressure the kernel reclaims groups above their soft limit first
	// (0 for best-effort containers: reclaimed first).
	if err := d.f.Write(dir, "memory.soft_limit_in_bytes", strconv.FormatInt(l.Guarantee.Memory, 10)); err != nil {
		return Applied{}, err
	}
	target := l.Ceiling.Memory // 0: unlimited
	curRaw, err := readUint(d.f, dir, "memory.limit_in_bytes")
	if err != nil {
		return Applied{}, err
	}
	cur := unlimitedBytes(curRaw)
	if target == cur {
		return Applied{MemoryLimit: target}, nil
	}
	if target == 0 || (cur != 0 && target > cur) {
		return Applied{MemoryLimit: target}, d.raiseV1(dir, target)
	}
	err = d.f.Write(dir, "memory.limit_in_bytes", strconv.FormatInt(target, 10))
	if err == nil {
		return Applied{MemoryLimit: target}, d.tieMemsw(dir, cur, target)
	}
	if !isBusy(err) {
		return Applied{MemoryLimit: cur}, err
	}
	// EBUSY: the kernel reclaimed what it could and the cgroup is still above
	// target. Hold the limit just above usage so it cannot grow.
	usage, uerr := readUint(d.f, dir, "memory.usage_in_bytes")
	if uerr != nil {
		return Applied{MemoryLimit: cur, MemoryPending: true}, uerr
	}
	hold := max(pageUp(int64(usage)+holdHeadroom), target, l.Guarantee.Memory)
	if cur != 0 && hold >= cur {
		return Applied{MemoryLimit: cur, MemoryPending: true}, nil
	}
	if err := d.f.Write(dir, "memory.limit_in_bytes", strconv.FormatInt(hold, 10)); err != nil {
		if isBusy(err) { // usage grew between the read and the write
			return Applied{MemoryLimit: cur, MemoryPending: true}, nil
		}
		return Applied{MemoryLimit: cur, MemoryPending: true}, err
	}
	return Applied{MemoryLimit: hold, MemoryPending: true}, d.tieMemsw(dir, cur, hold)
}

// raiseV1 raises the hard limit (target 0: unlimited). The kernel insists on
// memory.limit_in_bytes <= memory.memsw.limit_in_bytes, so a memsw limit
// below the new value is raised first.
func (d *V1Driver) raiseV1(dir string, target int64) error {
	want := target
	if want == 0 {
		want = -1
	}
	if sw, err := readUint(d.f, dir, "memory.memsw.limit_in_bytes"); err == nil {
		if swb := unlimitedBytes(sw); swb != 0 && (target == 0 || swb < target) {
			if err := d.f.Write(dir, "memory.memsw.limit_in_bytes", strconv.FormatInt(want, 10)); err != nil {
				return err
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return d.f.Write(dir, "memory.limit_in_bytes", strconv.FormatInt(want, 10))
}

// tieMemsw keeps a memsw limit that was tied to the old hard limit ("no swap
// beyond the limit") tied to the new one; an unlimited memsw stays unlimited.
func (d *V1Driver) tieMemsw(dir string, old, now int64) error {
	sw, err := readUint(d.f, dir, "memory.memsw.limit_in_bytes")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if old != 0 && unlimitedBytes(sw) == old {
		return d.f.Write(dir, "memory.memsw.limit_in_bytes", strconv.FormatInt(now, 10))
	}
	return nil
}

// Stats implements Driver.
func (d *V1Driver) Stats(path string) (Stats, error) {
	var s Stats
	mem := d.dir("memory", path)
	usage, err := readUint(d.f, mem, "memory.usage_in_bytes")
	if err != nil {
		return Stats{}, err
	}
	s.MemoryUsage = int64(usage)
	ms, err := readKeyed(d.f, mem, "memory.stat")
	if err != nil {
		return Stats{}, err
	}
	s.MemoryWorkingSet = max(s.MemoryUsage-int64(ms["total_inactive_file"]), 0)
	limit, err := readUint(d.f, mem, "memory.limit_in_bytes")
	if err != nil {
		return Stats{}, err
	}
	s.MemoryLimit = unlimitedBytes(limit)
	if s.MemoryLimitHits, err = readUint(d.f, mem, "memory.failcnt"); err != nil {
		return Stats{}, err
	}
	oc, err := readKeyed(d.f, mem, "memory.oom_control")
	if err != nil {
		return Stats{}, err
	}
	s.OOMKills = oc["oom_kill"]

	cpu := d.dir("cpu", path)
	acct := d.dir("cpuacct", path)
	if acct != "" {
		ns, err := readUint(d.f, acct, "cpuacct.usage")
		if err != nil {
			return Stats{}, err
		}
		s.CPUUsage = time.Duration(ns)
	}
	cs, err := readKeyed(d.f, cpu, "cpu.stat")
	if err != nil {
		return Stats{}, err
	}
	s.ThrottledPeriods, s.ThrottledTime = cs["nr_throttled"], time.Duration(cs["throttled_time"])
	quota, err := d.f.Read(cpu, "cpu.cfs_quota_us")
	if err != nil {
		return Stats{}, err
	}
	period, err := readUint(d.f, cpu, "cpu.cfs_period_us")
	if err != nil {
		return Stats{}, err
	}
	s.CPUQuota = quotaCores(strings.TrimSpace(quota), period)

	if u := d.dir("unified", path); u != "" {
		if s.CPUPressure, err = readPressureWith(d.f, u, "cpu.pressure"); err != nil {
			return Stats{}, err
		}
		if s.MemoryPressure, err = readPressureWith(d.f, u, "memory.pressure"); err != nil {
			return Stats{}, err
		}
	}
	return s, nil
}

// quotaCores converts a quota in µs ("-1" or "max": unlimited) per period to cores.
func quotaCores(quota string, period uint64) float64 {
	q, err := strconv.ParseInt(quota, 10, 64)
	if err != nil || q <= 0 || period == 0 {
		return 0
	}
	return math.Round(float64(q)/float64(period)*1e6) / 1e6
}

// ApplyParent implements Driver: v1 soft limits are not hierarchical
// protection, so the parent needs nothing.
func (d *V1Driver) ApplyParent(string, Amount) error { return nil }
