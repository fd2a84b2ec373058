package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// V2Driver drives the unified hierarchy: cpu.weight and cpu.max; memory.min
// (the guarantee), memory.high and memory.max (the ceiling); pids.max; usage
// from memory.current, memory.stat and cpu.stat; limit hits from
// memory.events; PSI from the cgroup's pressure files.
type V2Driver struct {
	root string
	f    files
}

var _ Driver = (*V2Driver)(nil)

// NewV2Driver drives the unified hierarchy mounted at root ("": DefaultRoot).
func NewV2Driver(root string) (*V2Driver, error) {
	if root == "" {
		root = DefaultRoot
	}
	return newV2Driver(root, filesFor(root))
}

func newV2Driver(root string, f files) (*V2Driver, error) {
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
		return nil, fmt.Errorf("cgroup v2 root %s: %w", root, err)
	}
	return &V2Driver{root: root, f: f}, nil
}

// Version implements Driver.
func (d *V2Driver) Version() string { return "v2" }

func (d *V2Driver) dir(path string) string { return filepath.Join(d.root, filepath.Clean("/"+path)) }

// Apply implements Driver. Memory: memory.min = guarantee (hard protection:
// guarantees are never oversold, so the sum of all memory.min stays within
// allocatable and cannot starve the system), then memory.high = ceiling,
// then memory.max = ceiling. A memory.max below usage makes the v2 kernel
// OOM-kill when reclaim fails, so lowering goes through memory.high first
// (the kernel reclaims and throttles, never kills, on a memory.high write)
// and memory.max follows only as far as usage allows; the rest is pending.
func (d *V2Driver) Apply(path string, l Limits) (Applied, error) {
	if err := l.validate(); err != nil {
		return Applied{}, fmt.Errorf("cgroup %s: %w", path, err)
	}
	dir := d.dir(path)
	var errs []error
	errs = append(errs,
		d.f.Write(dir, "cpu.weight", strconv.FormatUint(WeightForShares(guaranteeShares(l.Guarantee.CPU)), 10)),
		d.f.Write(dir, "cpu.max", cpuMax(l.Ceiling.CPU)))
	applied, err := d.applyMemory(dir, l)
	errs = append(errs, err, d.f.Write(dir, "pids.max", pidsValue(l.PidsMax)))
	return applied, errors.Join(errs...)
}

func cpuMax(cores float64) string {
	q := quotaFor(cores)
	if q < 0 {
		return "max " + strconv.Itoa(cfsPeriod)
	}
	return strconv.FormatInt(q, 10) + " " + strconv.Itoa(cfsPeriod)
}

func bytesValue(b int64) string {
	if b <= 0 {
		return "max"
	}
	return strconv.FormatInt(b, 10)
}

func (d *V2Driver) applyMemory(dir string, l Limits) (Applied, error) {
	if err := d.f.Write(dir, "memory.min", strconv.FormatInt(l.Guarantee.Memory, 10)); err != nil {
		return Applied{}, err
	}
	target := l.Ceiling.Memory
	curRaw, err := readUint(d.f, dir, "memory.max")
	if err != nil {
		return Applied{}, err
	}
	cur := unlimitedBytes(curRaw)
	if target == 0 || (cur != 0 && target >= cur) {
		// Raising: max first, so high never sits above max.
		if err := d.f.Write(dir, "memory.max", bytesValue(target)); err != nil {
			return Applied{MemoryLimit: cur}, err
		}
		return Applied{MemoryLimit: target}, d.f.Write(dir, "memory.high", bytesValue(target))
	}
	// Lowering: memory.high reclaims synchronously and then throttles.
	if err := d.f.Write(dir, "memory.high", bytesValue(target)); err != nil {
		return Applied{MemoryLimit: cur}, err
	}
	usage, err := readUint(d.f, dir, "memory.current")
	if err != nil {
		return Applied{MemoryLimit: cur, MemoryPending: true}, err
	}
	next, pending := target, false
	if int64(usage) > target {
		next, pending = max(pageUp(int64(usage)+holdHeadroom), l.Guarantee.Memory), true
		if cur != 0 && next >= cur {
			return Applied{MemoryLimit: cur, MemoryPending: true}, nil
		}
	}
	if err := d.f.Write(dir, "memory.max", bytesValue(next)); err != nil {
		return Applied{MemoryLimit: cur, MemoryPending: true}, err
	}
	return Applied{MemoryLimit: next, MemoryPending: pending}, nil
}

// Stats implements Driver.
func (d *V2Driver) Stats(path string) (Stats, error) {
	var s Stats
	dir := d.dir(path)
	usage, err := readUint(d.f, dir, "memory.current")
	if err != nil {
		return Stats{}, err
	}
	s.MemoryUsage = int64(usage)
	ms, err := readKeyed(d.f, dir, "memory.stat")
	if err != nil {
		return Stats{}, err
	}
	s.MemoryWorkingSet = max(s.MemoryUsage-int64(ms["inactive_file"]), 0)
	limit, err := readUint(d.f, dir, "memory.max")
	if err != nil {
		return Stats{}, err
	}
	s.MemoryLimit = unlimitedBytes(limit)
	ev, err := readKeyed(d.f, dir, "memory.events")
	if err != nil {
		return Stats{}, err
	}
	s.MemoryLimitHits, s.OOMKills = ev["high"]+ev["max"], ev["oom_kill"]

	cs, err := readKeyed(d.f, dir, "cpu.stat")
	if err != nil {
		return Stats{}, err
	}
	s.CPUUsage = time.Duration(cs["usage_usec"]) * time.Microsecond
	s.ThrottledPeriods = cs["nr_throttled"]
	s.ThrottledTime = time.Duration(cs["throttled_usec"]) * time.Microsecond
	cm, err := d.f.Read(dir, "cpu.max")
	if err != nil {
		return Stats{}, err
	}
	if q, p, ok := strings.Cut(strings.TrimSpace(cm), " "); ok {
		period, _ := strconv.ParseUint(p, 10, 64)
		s.CPUQuota = quotaCores(q, period)
	}
	if s.CPUPressure, err = readPressureWith(d.f, dir, "cpu.pressure"); err != nil {
		return Stats{}, err
	}
	if s.MemoryPressure, err = readPressureWith(d.f, dir, "memory.pressure"); err != nil {
		return Stats{}, err
	}
	return s, nil
}

// ApplyParent implements Driver. A v2 child's memory.min protects it only as
// far as every ancestor's memory.min reaches, so the parent of all
// containers carries the sum of their guarantees. (Ancestors above the
// parent are the delegating service manager's: systemd's MemoryMin= on
// ferryd's unit, when the parent is not directly below the root.)
func (d *V2Driver) ApplyParent(path string, guaranteed Amount) error {
	if filepath.Clean("/"+path) == "/" {
		return nil // the root has no memory.min
	}
	return d.f.Write(d.dir(path), "memory.min", strconv.FormatInt(guaranteed.Memory, 10))
}
