package cgroup

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeFS is a fake cgroupfs in t.TempDir() (after containerd/cgroups'
// cgroup1/mock_test.go): real files, written and read through plainFiles,
// plus the kernel behaviour the drivers depend on when a memory limit goes
// down. floor is what the kernel can reclaim a memory cgroup down to (its
// unreclaimable part); without an entry everything is reclaimable.
type fakeFS struct {
	t    testing.TB
	root string
	v2   bool

	mu     sync.Mutex
	floor  map[string]int64 // memory cgroup dir → unreclaimable bytes
	writes []string         // "file=data" in order, file relative to root
	ooms   int              // v2 memory.max writes the kernel would have answered with an OOM kill
}

func newFakeV1(t testing.TB) *fakeFS {
	fs := &fakeFS{t: t, root: t.TempDir(), floor: map[string]int64{}}
	for _, h := range []string{"cpu", "cpuacct", "memory", "pids", "unified"} {
		if err := os.MkdirAll(filepath.Join(fs.root, h), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return fs
}

func newFakeV2(t testing.TB) *fakeFS {
	fs := &fakeFS{t: t, root: t.TempDir(), v2: true, floor: map[string]int64{}}
	fs.put("", "cgroup.controllers", "cpuset cpu io memory pids")
	return fs
}

const v1Unlimited = "9223372036854771712"

const zeroPSI = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"

// addContainer makes the cgroup of a container at path with the kernel's
// default values.
func (fs *fakeFS) addContainer(path string) {
	if fs.v2 {
		for f, v := range map[string]string{
			"cpu.weight": "100", "cpu.max": "max 100000", "memory.min": "0", "memory.high": "max", "memory.max": "max",
			"memory.current": "0", "memory.stat": "anon 0\nfile 0\ninactive_file 0\n",
			"memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n", "pids.max": "max",
			"cpu.stat":     "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
			"cpu.pressure": zeroPSI, "memory.pressure": zeroPSI,
		} {
			fs.put(path, f, v)
		}
		return
	}
	for f, v := range map[string]string{
		"cpu/cpu.shares": "1024", "cpu/cpu.cfs_period_us": "100000", "cpu/cpu.cfs_quota_us": "-1",
		"cpu/cpu.stat":                 "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
		"cpuacct/cpuacct.usage":        "0",
		"memory/memory.limit_in_bytes": v1Unlimited, "memory/memory.soft_limit_in_bytes": v1Unlimited,
		"memory/memory.memsw.limit_in_bytes": v1Unlimited, "memory/memory.usage_in_bytes": "0",
		"memory/memory.stat": "cache 0\nrss 0\ntotal_inactive_file 0\n", "memory/memory.failcnt": "0",
		"memory/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
		"pids/pids.max":             "max",
		"unified/cpu.pressure":      zeroPSI,
		"unified/memory.pressure":   zeroPSI,
	} {
		h, name, _ := strings.Cut(f, "/")
		fs.put(filepath.Join(h, path), name, v)
	}
}

// file is a path in the fake: for v1 "memory", "/c" and a file name.
func (fs *fakeFS) file(hier, path, name string) string {
	if fs.v2 {
		return filepath.Join(fs.root, path, name)
	}
	return filepath.Join(fs.root, hier, path, name)
}

func (fs *fakeFS) put(dir, name, v string) {
	fs.t.Helper()
	d := filepath.Join(fs.root, dir)
	if err := os.MkdirAll(d, 0o755); err != nil {
		fs.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, name), []byte(v), 0o644); err != nil {
		fs.t.Fatal(err)
	}
}

// set writes a value as the kernel would (not through the driver).
func (fs *fakeFS) set(hier, path, name, v string) {
	fs.t.Helper()
	if err := os.WriteFile(fs.file(hier, path, name), []byte(v), 0o644); err != nil {
		fs.t.Fatal(err)
	}
}

func (fs *fakeFS) get(hier, path, name string) string {
	fs.t.Helper()
	b, err := os.ReadFile(fs.file(hier, path, name))
	if err != nil {
		fs.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (fs *fakeFS) getInt(hier, path, name string) int64 {
	fs.t.Helper()
	n, err := strconv.ParseInt(fs.get(hier, path, name), 10, 64)
	if err != nil {
		fs.t.Fatal(err)
	}
	return n
}

// setUsage sets a container's memory usage (and working set: no inactive
// file cache) and what the kernel can reclaim it down to.
func (fs *fakeFS) setUsage(path string, usage, floor int64) {
	fs.t.Helper()
	fs.mu.Lock()
	fs.floor[fs.memDir(path)] = floor
	fs.mu.Unlock()
	if fs.v2 {
		fs.set("", path, "memory.current", strconv.FormatInt(usage, 10))
	} else {
		fs.set("memory", path, "memory.usage_in_bytes", strconv.FormatInt(usage, 10))
	}
}

func (fs *fakeFS) memDir(path string) string {
	if fs.v2 {
		return filepath.Join(fs.root, path)
	}
	return filepath.Join(fs.root, "memory", path)
}

func (fs *fakeFS) writeLog() []string {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return append([]string(nil), fs.writes...)
}

func (fs *fakeFS) Read(dir, file string) (string, error) { return plainFiles{}.Read(dir, file) }

// Write plays the kernel: a v1 memory.limit_in_bytes below usage reclaims
// down to the floor and answers EBUSY if that is still above the new limit;
// a v2 memory.high reclaims down to max(limit, floor) and never fails; a v2
// memory.max below the floor would OOM-kill (counted, so tests can insist
// it never happens).
func (fs *fakeFS) Write(dir, file, data string) error {
	fs.mu.Lock()
	rel, _ := filepath.Rel(fs.root, filepath.Join(dir, file))
	fs.writes = append(fs.writes, rel+"="+data)
	floor := fs.floor[dir]
	fs.mu.Unlock()
	usageFile := "memory.usage_in_bytes"
	if fs.v2 {
		usageFile = "memory.current"
	}
	reclaim := func(limit int64) (int64, bool) {
		u, err := plainFiles{}.Read(dir, usageFile)
		if err != nil {
			return 0, true
		}
		usage, _ := strconv.ParseInt(strings.TrimSpace(u), 10, 64)
		if limit <= 0 || usage <= limit {
			return usage, true
		}
		usage = max(limit, floor)
		_ = plainFiles{}.Write(dir, usageFile, strconv.FormatInt(usage, 10))
		return usage, usage <= limit
	}
	n, numErr := strconv.ParseInt(data, 10, 64)
	switch {
	case !fs.v2 && file == "memory.limit_in_bytes" && numErr == nil:
		if _, ok := reclaim(n); !ok {
			return &FileError{Op: "write", Path: filepath.Join(dir, file), Data: data, Err: unix.EBUSY}
		}
	case fs.v2 && file == "memory.high" && numErr == nil:
		reclaim(n)
	case fs.v2 && file == "memory.max" && numErr == nil:
		if _, ok := reclaim(n); !ok {
			fs.mu.Lock()
			fs.ooms++
			fs.mu.Unlock()
		}
	}
	return plainFiles{}.Write(dir, file, data)
}

func (fs *fakeFS) oomKills() int {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.ooms
}

func (fs *fakeFS) driver() Driver {
	fs.t.Helper()
	var d Driver
	var err error
	if fs.v2 {
		d, err = newV2Driver(fs.root, fs)
	} else {
		d, err = newV1Driver(fs.root, fs)
	}
	if err != nil {
		fs.t.Fatal(err)
	}
	return d
}

// fakePSI is a fake /proc/pressure whose "some" totals a test advances.
type fakePSI struct {
	t     testing.TB
	dir   string
	mu    sync.Mutex
	total map[Resource]time.Duration
}

func newFakePSI(t testing.TB) *fakePSI {
	p := &fakePSI{t: t, dir: filepath.Join(t.TempDir(), "pressure"), total: map[Resource]time.Duration{}}
	if err := os.MkdirAll(p.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, r := range AllResources {
		p.add(r, 0)
	}
	return p
}

// add accounts d more stall time to r.
func (p *fakePSI) add(r Resource, d time.Duration) {
	p.t.Helper()
	p.mu.Lock()
	p.total[r] += d
	tot := p.total[r]
	p.mu.Unlock()
	s := fmt.Sprintf("some avg10=1.00 avg60=0.50 avg300=0.10 total=%d\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", tot.Microseconds())
	if err := os.WriteFile(filepath.Join(p.dir, string(r)), []byte(s), 0o644); err != nil {
		p.t.Fatal(err)
	}
}

// addCgroupPSI adds stall time to a container's own pressure file.
func (fs *fakeFS) addCgroupPSI(path string, r Resource, d time.Duration) {
	fs.t.Helper()
	hier := "unified"
	p, err := parsePressure(fs.get(hier, path, string(r)+".pressure"))
	if err != nil {
		fs.t.Fatal(err)
	}
	p.Some.Total += d
	fs.set(hier, path, string(r)+".pressure",
		fmt.Sprintf("some avg10=0.00 avg60=0.00 avg300=0.00 total=%d\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", p.Some.Total.Microseconds()))
}

// fakeClock is a Clock that moves only when told.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*fakeTicker
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTicker(d time.Duration) Ticker {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTicker{clk: c, c: make(chan time.Time, 1), period: d, next: c.now.Add(d)}
	c.tickers = append(c.tickers, t)
	return t
}

// Advance moves the clock and fires the tickers that became due (a tick is
// dropped, as with time.Ticker, if the last one was not received).
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for _, t := range c.tickers {
		for !t.stopped && !t.next.After(c.now) {
			select {
			case t.c <- t.next:
			default:
			}
			t.next = t.next.Add(t.period)
		}
	}
}

type fakeTicker struct {
	clk     *fakeClock
	c       chan time.Time
	period  time.Duration
	next    time.Time
	stopped bool
}

func (t *fakeTicker) C() <-chan time.Time { return t.c }

func (t *fakeTicker) Stop() {
	t.clk.mu.Lock()
	defer t.clk.mu.Unlock()
	t.stopped = true
}
