package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// The tests in this file use the machine's real cgroup v1 hierarchies (root).
// Everything they make lives under /ferry-cg-test-<pid>-<n> in the memory,
// cpu, cpuacct, pids and unified hierarchies and is removed in t.Cleanup,
// also on failure; every process they start is a copy of the test binary
// that stops by itself after helperLifetime and is killed in cleanup. The
// only memory hog rewrites a 400Mi file inside a v1 memory cgroup limited to
// 64Mi: page cache bounded by the limit, never the host's RAM, and disk
// writes only while an episode lasts.

const (
	helperEnv      = "FERRY_CGROUP_TEST_HELPER"
	helperLifetime = 60 * time.Second
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(runHelper(mode, os.Args[len(os.Args)-1]))
	}
	os.Exit(m.Run())
}

// runHelper is the child process. It waits for "go" on stdin (so the parent
// can move it into its cgroups first), then:
//
//	sleep         idles
//	anon:<MiB>    touches that much anonymous memory, says "ready", idles
//	rewrite:<MiB> overwrites the file (arg) with that many MiB, in a loop
//
// and exits after helperLifetime in any case.
func runHelper(mode, arg string) int {
	in := bufio.NewReader(os.Stdin)
	if line, err := in.ReadString('\n'); err != nil || strings.TrimSpace(line) != "go" {
		return 2
	}
	deadline := time.Now().Add(helperLifetime)
	name, param, _ := strings.Cut(mode, ":")
	switch name {
	case "sleep":
	case "anon":
		n, _ := strconv.Atoi(param)
		buf := make([]byte, n<<20)
		for i := 0; i < len(buf); i += 4096 {
			buf[i] = 1
		}
		fmt.Println("ready")
		defer func() { _ = buf[len(buf)-1] }()
	case "rewrite":
		// Overwrites the file (arg) in place, n MiB per pass, without
		// fsync: in a v1 memory cgroup smaller than the file, reclaim has
		// to wait for the writeback of dirty pages, which PSI counts as a
		// memory stall (measured here: 50–70% of the time with 400Mi in
		// 64Mi, against 2–5% for re-reading a clean file).
		n, _ := strconv.Atoi(param)
		chunk := make([]byte, 1<<20)
		for i := range chunk {
			chunk[i] = byte(i)
		}
		for time.Now().Before(deadline) {
			f, err := os.OpenFile(arg, os.O_WRONLY|os.O_CREATE, 0o600)
			if err != nil {
				return 3
			}
			for i := 0; i < n && time.Now().Before(deadline); i++ {
				if _, err := f.Write(chunk); err != nil {
					return 3
				}
			}
			_ = f.Close()
		}
		return 0
	default:
		return 5
	}
	time.Sleep(time.Until(deadline))
	return 0
}

var treeSeq atomic.Int64

// testTree is a unique cgroup parent in the v1 hierarchies and its unified twin.
type testTree struct {
	tb   testing.TB
	name string // "/ferry-cg-test-<pid>-<n>"
	dirs []string
}

var treeHierarchies = []string{"memory", "cpu", "cpuacct", "pids", "unified"}

// requireV1 needs root and this machine's v1 (hybrid) hierarchies.
func requireV1(tb testing.TB) {
	tb.Helper()
	testenv.RequireRoot(tb)
	for _, h := range treeHierarchies {
		testenv.RequirePath(tb, filepath.Join(DefaultRoot, h), "cgroup v1 hybrid hierarchies (v2 is tested in the VM tier)")
	}
}

func newTestTree(tb testing.TB) *testTree {
	tb.Helper()
	requireV1(tb)
	t := &testTree{tb: tb, name: fmt.Sprintf("/ferry-cg-test-%d-%d", os.Getpid(), treeSeq.Add(1))}
	tb.Cleanup(t.remove)
	t.mk("")
	return t
}

// path is the cgroup path of a child ("" for the tree itself).
func (t *testTree) path(child string) string { return filepath.Join(t.name, child) }

func (t *testTree) mk(child string) string {
	t.tb.Helper()
	for _, h := range treeHierarchies {
		d := filepath.Join(DefaultRoot, h, t.path(child))
		if err := os.Mkdir(d, 0o755); err != nil {
			t.tb.Fatalf("mkdir %s: %v", d, err)
		}
		t.dirs = append(t.dirs, d)
	}
	return t.path(child)
}

// remove deletes the tree's cgroups, children first, retrying while the
// kernel still finishes the exit of killed processes.
func (t *testTree) remove() {
	for i := len(t.dirs) - 1; i >= 0; i-- {
		var err error
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if err = os.Remove(t.dirs[i]); err == nil || errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
				break
			}
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.tb.Errorf("cleanup: %v", err)
		}
	}
}

func (t *testTree) write(hier, child, file, v string) {
	t.tb.Helper()
	if err := os.WriteFile(filepath.Join(DefaultRoot, hier, t.path(child), file), []byte(v), 0o644); err != nil {
		t.tb.Fatal(err)
	}
}

func (t *testTree) read(hier, child, file string) string {
	t.tb.Helper()
	b, err := os.ReadFile(filepath.Join(DefaultRoot, hier, t.path(child), file))
	if err != nil {
		t.tb.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// helper is a running child process.
type helper struct {
	cmd  *exec.Cmd
	out  *bufio.Reader
	done chan error
}

// start runs a helper in the child cgroup of the tree; it is killed in
// cleanup if still alive.
func (t *testTree) start(child, mode, arg string) *helper {
	t.tb.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$", arg)
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.tb.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.tb.Fatal(err)
	}
	h := &helper{cmd: cmd, out: bufio.NewReader(stdout), done: make(chan error, 1)}
	go func() { h.done <- cmd.Wait() }()
	t.tb.Cleanup(h.kill)
	for _, hier := range treeHierarchies {
		t.write(hier, child, "cgroup.procs", strconv.Itoa(cmd.Process.Pid))
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.tb.Fatal(err)
	}
	return h
}

func (h *helper) kill() {
	_ = h.cmd.Process.Kill()
	err := <-h.done // the helper's exit: killed, as intended
	h.done <- err   // later kills return at once
}

func (h *helper) alive() bool { return h.cmd.Process.Signal(syscall.Signal(0)) == nil }

func (h *helper) waitLine(tb testing.TB, want string) {
	tb.Helper()
	got := make(chan string, 1)
	go func() {
		line, _ := h.out.ReadString('\n')
		got <- strings.TrimSpace(line)
	}()
	select {
	case line := <-got:
		if line != want {
			tb.Fatalf("helper said %q, want %q", line, want)
		}
	case <-time.After(30 * time.Second):
		tb.Fatalf("helper did not say %q", want)
	}
}

func TestRealV1DriverAppliesAndReads(t *testing.T) {
	tree := newTestTree(t)
	c := tree.mk("c")
	h := tree.start("c", "sleep", "-")
	d, err := NewV1Driver("")
	if err != nil {
		t.Fatal(err)
	}
	l := Limits{Guarantee: Amount{CPU: 0.25, Memory: 32 * mi}, Ceiling: Amount{CPU: 0.5, Memory: 128 * mi}, PidsMax: 64}
	if a, err := d.Apply(c, l); err != nil || a != (Applied{MemoryLimit: 128 * mi}) {
		t.Fatalf("apply: %+v %v", a, err)
	}
	for _, f := range []struct{ hier, file, want string }{
		{"cpu", "cpu.shares", "256"}, {"cpu", "cpu.cfs_quota_us", "50000"}, {"cpu", "cpu.cfs_period_us", "100000"},
		{"memory", "memory.soft_limit_in_bytes", "33554432"}, {"memory", "memory.limit_in_bytes", "134217728"},
		{"pids", "pids.max", "64"},
	} {
		if got := tree.read(f.hier, "c", f.file); got != f.want {
			t.Errorf("%s/%s = %s, want %s", f.hier, f.file, got, f.want)
		}
	}
	s, err := d.Stats(c)
	if err != nil {
		t.Fatal(err)
	}
	if s.MemoryLimit != 128*mi || s.CPUQuota != 0.5 || !s.MemoryPressure.Present || !s.CPUPressure.Present {
		t.Errorf("stats %+v", s)
	}
	// Hardened and relaxed again.
	hard := l
	hard.Ceiling = l.Guarantee
	if a, err := d.Apply(c, hard); err != nil || a != (Applied{MemoryLimit: 32 * mi}) {
		t.Fatalf("harden: %+v %v", a, err)
	}
	if q, m := tree.read("cpu", "c", "cpu.cfs_quota_us"), tree.read("memory", "c", "memory.limit_in_bytes"); q != "25000" || m != "33554432" {
		t.Errorf("hardened quota %s limit %s", q, m)
	}
	if _, err := d.Apply(c, l); err != nil || tree.read("memory", "c", "memory.limit_in_bytes") != "134217728" {
		t.Fatalf("relax: %v", err)
	}
	// Unlimited.
	if _, err := d.Apply(c, Limits{}); err != nil {
		t.Fatal(err)
	}
	if s, _ := d.Stats(c); s.MemoryLimit != 0 || s.CPUQuota != 0 {
		t.Errorf("unlimited read back as %d %v", s.MemoryLimit, s.CPUQuota)
	}
	if !h.alive() {
		t.Error("the helper died")
	}
}

// A v1 limit below what the kernel can reclaim answers EBUSY: the driver
// holds the limit just above usage, kills nothing, and finishes later.
func TestRealV1StepDownOnEBUSY(t *testing.T) {
	tree := newTestTree(t)
	c := tree.mk("c")
	d, err := NewV1Driver("")
	if err != nil {
		t.Fatal(err)
	}
	relaxed := Limits{Guarantee: Amount{Memory: 16 * mi}, Ceiling: Amount{Memory: 128 * mi}}
	if _, err := d.Apply(c, relaxed); err != nil {
		t.Fatal(err)
	}
	h := tree.start("c", "anon:48", "-") // 48Mi anonymous: no swap here, so not reclaimable
	h.waitLine(t, "ready")
	hard := relaxed
	hard.Ceiling.Memory = 16 * mi
	a, err := d.Apply(c, hard)
	if err != nil {
		t.Fatalf("EBUSY surfaced: %v", err)
	}
	s, err := d.Stats(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("usage %s, applied %+v", FormatSize(s.MemoryUsage), a)
	if !a.MemoryPending || a.MemoryLimit < s.MemoryUsage || a.MemoryLimit >= 128*mi || a.MemoryLimit < 16*mi {
		t.Errorf("applied %+v with usage %d: want pending, held between usage and the old ceiling", a, s.MemoryUsage)
	}
	if !h.alive() || s.OOMKills != 0 {
		t.Fatalf("the container was killed (alive %v, oom kills %d)", h.alive(), s.OOMKills)
	}
	// The memory goes away: the step-down completes.
	h.kill()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if a, err = d.Apply(c, hard); err != nil {
			t.Fatal(err)
		}
		if !a.MemoryPending || time.Now().After(deadline) {
			break
		}
	}
	if a != (Applied{MemoryLimit: 16 * mi}) || tree.read("memory", "c", "memory.limit_in_bytes") != "16777216" {
		t.Errorf("after the memory was freed: %+v", a)
	}
}

// hogRig is a real pressure source: a child cgroup "hog" limited to 64Mi
// (whose unified twin is the detector's pressure source: the test's own
// stand-in for a scarce node) in which a helper rewrites a 400Mi file, and
// a tracked container c (sleeping) that the controller clamps. CPU
// detection is off: the machine is shared and its CPU pressure is not the
// test's.
type hogRig struct {
	tree *testTree
	file string
	c    *Controller
	ev   chan Event
	ct   Container
}

func newHogRig(tb testing.TB, tune func(*DetectorConfig)) *hogRig {
	tb.Helper()
	tree := newTestTree(tb)
	hog := tree.mk("hog")
	tree.write("memory", "hog", "memory.limit_in_bytes", strconv.FormatInt(64*mi, 10))
	ct := Container{ID: "c", Path: tree.mk("c"), Spec: Spec{Guarantee: Amount{CPU: 0.1, Memory: 32 * mi}, Ceiling: Amount{CPU: 1, Memory: 128 * mi}}}
	tree.start("c", "sleep", "-")
	r := &hogRig{tree: tree, file: filepath.Join(tb.TempDir(), "hog.dat"), ev: make(chan Event, 64), ct: ct}

	node, err := NewNode(Amount{CPU: 2, Memory: gi}, Amount{})
	if err != nil {
		tb.Fatal(err)
	}
	d, err := NewV1Driver("")
	if err != nil {
		tb.Fatal(err)
	}
	cfg := DefaultDetectorConfig()
	cfg.Source = CgroupPressure(filepath.Join(DefaultRoot, "unified", hog), hog)
	cfg.CPU.PSI, cfg.CPU.Usage = Threshold{}, Threshold{}
	if tune != nil {
		tune(&cfg)
	}
	r.c, err = NewController(ControllerConfig{Node: node, Driver: d, Detector: cfg,
		OnEvent: func(e Event) {
			select {
			case r.ev <- e:
			default:
			}
		}})
	if err != nil {
		tb.Fatal(err)
	}
	if err := node.Admit(ct.ID, ct.Spec.Guarantee); err != nil {
		tb.Fatal(err)
	}
	if err := r.c.Rebuild(tb.Context(), []Container{ct}); err != nil {
		tb.Fatal(err)
	}
	go func() { _ = r.c.Run(tb.Context()) }()
	return r
}

func (r *hogRig) wait(tb testing.TB, to State, timeout time.Duration) Event {
	tb.Helper()
	for {
		select {
		case e := <-r.ev:
			if e.Resource == Memory && e.To == to {
				return e
			}
		case <-time.After(timeout):
			tb.Fatalf("memory did not turn %s within %v (state %s, signals %v)", to, timeout, r.c.State(Memory), r.c.Metrics().Signals[Memory])
		}
	}
}

func TestRealPressureHardensAndRelaxes(t *testing.T) {
	r := newHogRig(t, func(c *DetectorConfig) { c.Memory.LeaveWindow = time.Second })
	if got := r.tree.read("memory", "c", "memory.limit_in_bytes"); got != "134217728" {
		t.Fatalf("relaxed limit %s", got)
	}
	start := time.Now()
	reader := r.tree.start("hog", "rewrite:400", r.file)
	e := r.wait(t, Hardened, 15*time.Second)
	t.Logf("hardened %v after the hog started: %s (%v)", time.Since(start).Round(time.Millisecond), e.Reason, e.Values)
	if got := r.tree.read("memory", "c", "memory.limit_in_bytes"); got != "33554432" {
		t.Errorf("hardened limit of c %s, want its 32Mi guarantee", got)
	}
	if got := r.tree.read("cpu", "c", "cpu.cfs_quota_us"); got != "100000" {
		t.Errorf("cpu quota touched: %s", got)
	}
	// The hog's own unified cgroup shows the pressure the detector reacted to.
	d, _ := NewV1Driver("")
	s, err := d.Stats(r.tree.path("hog"))
	if err != nil {
		t.Fatal(err)
	}
	if !s.MemoryPressure.Present || s.MemoryPressure.Some.Total <= 0 || s.MemoryLimitHits == 0 {
		t.Errorf("hog stats %+v", s)
	}
	reader.kill()
	e = r.wait(t, Relaxed, 15*time.Second)
	t.Logf("relaxed: %s", e.Reason)
	if got := r.tree.read("memory", "c", "memory.limit_in_bytes"); got != "134217728" {
		t.Errorf("relaxed limit of c %s, want its 128Mi ceiling back", got)
	}
	if rep := r.c.Report(); rep.Memory.State != Relaxed || len(rep.Containers) != 1 {
		t.Errorf("report %+v", rep)
	}
}
