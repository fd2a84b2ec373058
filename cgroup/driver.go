package cgroup

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/cgroups"
	"golang.org/x/sys/unix"
)

// DefaultRoot is where the cgroup hierarchies are mounted.
const DefaultRoot = "/sys/fs/cgroup"

// Driver writes a container's guarantee and effective ceiling into its cgroup
// and reads back its usage and pressure. Paths are cgroup paths as libcontainer
// gets them (absolute, e.g. "/ferry/web"), the same in every hierarchy.
type Driver interface {
	// Apply writes l to the cgroup at path: the guarantee as a CPU weight
	// and a memory protection, the ceiling as a CFS quota and a hard memory
	// limit, pids.max. A hard memory limit is lowered without OOM-killing:
	// if the kernel cannot reclaim down to the ceiling, the limit is held
	// just above current usage and Applied.MemoryPending says so; calling
	// Apply again later continues the step-down. It never sets a hard limit
	// below l.Guarantee.Memory.
	Apply(path string, l Limits) (Applied, error)
	// Stats reads usage, limits in place, limit hits and per-cgroup PSI.
	Stats(path string) (Stats, error)
	// ApplyParent sets what the parent of all containers needs for the
	// children's guarantees to hold (v2: memory.min = sum of guarantees,
	// since a child's protection is bounded by its ancestors'; v1: nothing).
	ApplyParent(path string, guaranteed Amount) error
	// Version is "v1" or "v2".
	Version() string
}

// Limits is what Apply writes for one container.
type Limits struct {
	Guarantee Amount `json:"guarantee"`
	Ceiling   Amount `json:"ceiling"`  // the effective ceiling; 0 means unlimited
	PidsMax   int64  `json:"pids_max"` // 0 means unlimited
}

// Applied is what Apply left in place.
type Applied struct {
	// MemoryLimit is the hard memory limit now set (0: unlimited). It is
	// above Ceiling.Memory while MemoryPending.
	MemoryLimit int64 `json:"memory_limit"`
	// MemoryPending says the kernel could not reclaim the cgroup down to its
	// ceiling yet (v1: EBUSY; v2: memory.current above the ceiling after
	// memory.high reclaimed what it could), so the hard limit is held just
	// above current usage: the container cannot grow, and is not killed.
	MemoryPending bool `json:"memory_pending"`
}

// Stats is one reading of a container's cgroup.
type Stats struct {
	MemoryUsage      int64         `json:"memory_usage"`       // bytes charged, page cache included
	MemoryWorkingSet int64         `json:"memory_working_set"` // usage minus inactive file cache
	MemoryLimit      int64         `json:"memory_limit"`       // hard limit in place, 0: unlimited
	MemoryLimitHits  uint64        `json:"memory_limit_hits"`  // v1 memory.failcnt; v2 memory.events high+max
	OOMKills         uint64        `json:"oom_kills"`          // v1 memory.oom_control, v2 memory.events oom_kill
	CPUUsage         time.Duration `json:"cpu_usage"`          // cumulative CPU time
	CPUQuota         float64       `json:"cpu_quota"`          // CFS quota in cores, 0: unlimited
	ThrottledPeriods uint64        `json:"throttled_periods"`
	ThrottledTime    time.Duration `json:"throttled_time"`
	CPUPressure      Pressure      `json:"cpu_pressure"`
	MemoryPressure   Pressure      `json:"memory_pressure"`
}

// FileError is a failed read or write of one cgroup file.
type FileError struct {
	Op   string // "read", "write", "parse"
	Path string
	Data string // what was written (write) or read (parse)
	Err  error
}

func (e *FileError) Error() string {
	if e.Data != "" {
		return fmt.Sprintf("cgroup %s %s %q: %v", e.Op, e.Path, e.Data, e.Err)
	}
	return fmt.Sprintf("cgroup %s %s: %v", e.Op, e.Path, e.Err)
}

func (e *FileError) Unwrap() error { return e.Err }

// files is the file layer under the drivers: the kernel's cgroupfs, or a fake
// one in unit tests (which can also play the kernel's EBUSY).
type files interface {
	Read(dir, file string) (string, error)
	Write(dir, file, data string) error
}

// kernelFiles goes through github.com/opencontainers/cgroups, the layer
// libcontainer uses for the same cgroups: openat2 confined beneath
// /sys/fs/cgroup, a cgroupfs type check, EINTR handled.
type kernelFiles struct{}

func (kernelFiles) Read(dir, file string) (string, error) {
	s, err := cgroups.ReadFile(dir, file)
	if err != nil {
		return "", &FileError{Op: "read", Path: filepath.Join(dir, file), Err: err}
	}
	return s, nil
}

func (kernelFiles) Write(dir, file, data string) error {
	if err := cgroups.WriteFile(dir, file, data); err != nil {
		return &FileError{Op: "write", Path: filepath.Join(dir, file), Data: data, Err: err}
	}
	return nil
}

// plainFiles reads and writes ordinary files that must already exist, as on
// cgroupfs (a write to a file the kernel does not have fails).
type plainFiles struct{}

func (plainFiles) Read(dir, file string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return "", &FileError{Op: "read", Path: filepath.Join(dir, file), Err: err}
	}
	return string(b), nil
}

func (plainFiles) Write(dir, file, data string) error {
	p := filepath.Join(dir, file)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
	if err == nil {
		_, err = f.WriteString(data)
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		return &FileError{Op: "write", Path: p, Data: data, Err: err}
	}
	return nil
}

// filesFor picks the kernel layer for the real cgroupfs and plain files for
// any other root (a copy or a fake cgroupfs).
func filesFor(root string) files {
	if root == DefaultRoot || strings.HasPrefix(root, DefaultRoot+"/") {
		return kernelFiles{}
	}
	return plainFiles{}
}

// NewDriver returns the driver for the cgroup mode found under root (""
// means DefaultRoot): v2 when root is a unified hierarchy, v1 otherwise.
func NewDriver(root string) (Driver, error) {
	if root == "" {
		root = DefaultRoot
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err == nil {
		return NewV2Driver(root)
	}
	return NewV1Driver(root)
}

func readUint(f files, dir, file string) (uint64, error) {
	s, err := f.Read(dir, file)
	if err != nil {
		return 0, err
	}
	s = strings.TrimSpace(s)
	if s == "max" {
		return math.MaxUint64, nil
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		// v1 reports some unlimited values as -1.
		if iv, ierr := strconv.ParseInt(s, 10, 64); ierr == nil && iv < 0 {
			return math.MaxUint64, nil
		}
		return 0, &FileError{Op: "parse", Path: filepath.Join(dir, file), Data: s, Err: err}
	}
	return v, nil
}

// readKeyed reads a "key value" per line file (memory.stat, cpu.stat, memory.events).
func readKeyed(f files, dir, file string) (map[string]uint64, error) {
	s, err := f.Read(dir, file)
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), " ")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return nil, &FileError{Op: "parse", Path: filepath.Join(dir, file), Data: line, Err: err}
		}
		out[k] = n
	}
	return out, nil
}

// unlimitedBytes maps the kernel's "no limit" readings (v1: about 2^63, v2:
// "max") to 0.
func unlimitedBytes(v uint64) int64 {
	if v >= 1<<62 {
		return 0
	}
	return int64(v)
}

// pageUp rounds a byte count up to a whole page: the kernel rounds limits down
// to pages, and a limit held at usage must not fall below it.
func pageUp(b int64) int64 {
	const page = 4096
	return (b + page - 1) / page * page
}

// holdHeadroom is how far above current usage a hard limit is held while the
// kernel cannot reclaim down to the ceiling: enough for the kernel's per-CPU
// charge batches, small enough that the container effectively cannot grow.
const holdHeadroom = 4 << 20

// isBusy reports the v1 kernel's answer to a limit below what it can reclaim.
func isBusy(err error) bool { return errors.Is(err, unix.EBUSY) }

// quotaFor is the CFS quota (µs per cfsPeriod) for a ceiling in cores, -1 for
// unlimited; the kernel's minimum quota is 1 ms.
func quotaFor(cores float64) int64 {
	if cores <= 0 {
		return -1
	}
	return max(int64(math.Ceil(cores*cfsPeriod)), 1000)
}

// guaranteeShares is the cpu.shares written for a CPU guarantee. Unlike
// SharesForCores (which keeps the kernel default for "no guarantee" when a
// container is created), a container without a CPU guarantee gets the
// minimum weight, so best-effort containers never dilute guarantees when the
// CPU is contended.
func guaranteeShares(cores float64) uint64 {
	if cores <= 0 {
		return minShares
	}
	return min(SharesForCores(cores), maxShares)
}

// The kernel's bounds for cpu.shares (v1) and cpu.weight (v2).
const (
	minShares = 2
	maxShares = 262144
	minWeight = 1
	maxWeight = 10000
)

// WeightForShares converts a v1 cpu.shares value to a v2 cpu.weight with the
// linear mapping the kernel documentation, systemd and runc up to v1.3 use:
//
//	weight = 1 + ((shares − 2) × 9999) / 262142
//
// It maps [2, 262144] onto [1, 10000] and keeps proportions: guarantees of 1
// and 2 cores (1024 and 2048 shares) get weights 39 and 79, so they split a
// contended CPU 1:2 on v2 as on v1. ferry writes the same guarantee → shares →
// weight on both. (runc v1.4 / opencontainers/cgroups v0.0.6 switched to a
// quadratic curve that maps 1024 to 100 but splits 1 and 2 cores 100:173,
// which would break the guarantees; ferry's siblings under one parent only
// compare with each other, so the absolute scale does not matter.) One
// weight step is about 26 shares, so v2 resolves CPU guarantees to about
// 0.026 cores.
func WeightForShares(shares uint64) uint64 {
	if shares == 0 {
		return 0
	}
	shares = min(max(shares, minShares), maxShares)
	return 1 + ((shares-2)*9999)/262142
}

// validate checks what every driver relies on: no negative amounts, and a
// ceiling never below the guarantee (a hard limit below the guarantee would
// break the promise that a container within its guarantee is never
// reclaimed from or killed).
func (l Limits) validate() error {
	if err := validAmount(l.Guarantee); err != nil {
		return fmt.Errorf("guarantee %w", err)
	}
	if err := validAmount(l.Ceiling); err != nil {
		return fmt.Errorf("ceiling %w", err)
	}
	if l.Ceiling.Memory != 0 && l.Ceiling.Memory < l.Guarantee.Memory {
		return fmt.Errorf("memory ceiling %s below guarantee %s: %w", FormatSize(l.Ceiling.Memory), FormatSize(l.Guarantee.Memory), ErrInvalid)
	}
	if l.Ceiling.CPU != 0 && l.Ceiling.CPU < l.Guarantee.CPU {
		return fmt.Errorf("cpu ceiling %v below guarantee %v: %w", l.Ceiling.CPU, l.Guarantee.CPU, ErrInvalid)
	}
	if l.PidsMax < 0 {
		return fmt.Errorf("pids %d: negative: %w", l.PidsMax, ErrInvalid)
	}
	return nil
}
