package sysctlguard

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// hostSysctls are read before and after each test: none may change.
var hostSysctls = []string{
	"kernel.panic", "vm.swappiness", "kernel.shmmax", "net.ipv4.ip_local_port_range", "kernel.pid_max",
	"net.core.rmem_max", "net.ipv4.ip_forward",
}

func snapshotHost(tb testing.TB) map[string]string {
	tb.Helper()
	m := map[string]string{}
	for _, k := range hostSysctls {
		v, err := readSysctl(sysctlPath("", k))
		if err != nil {
			tb.Fatalf("read %s: %v", k, err)
		}
		m[k] = v
	}
	return m
}

// checkHostUnchanged compares the host's sysctls with before when the test ends.
func checkHostUnchanged(tb testing.TB) {
	before := snapshotHost(tb)
	tb.Cleanup(func() {
		after := snapshotHost(tb)
		for k, v := range before {
			if after[k] != v {
				tb.Errorf("host sysctl %s changed: %q -> %q", k, v, after[k])
			}
		}
	})
}

// closeAtEnd closes c when the test ends, before the pin root is removed.
func closeAtEnd(tb testing.TB, c interface{ Close() error }) {
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
}

func fullPolicy(tb testing.TB) *Policy {
	p, err := NewPolicy(nil)
	if err != nil {
		tb.Fatal(err)
	}
	return p.For(allNS)
}

// programsOn lists the sysctl programs attached directly to a cgroup.
func programsOn(tb testing.TB, cgroupDir string) []ebpf.ProgramID {
	tb.Helper()
	f, err := os.Open(cgroupDir)
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupSysctl})
	if err != nil {
		tb.Fatalf("query programs of %s: %v", cgroupDir, err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

// collect watches g until it has n events or the timeout passed.
func collect(t *testing.T, g *Guard, n int, timeout time.Duration) []Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var mu sync.Mutex
	var evs []Event
	err := g.Watch(ctx, func(e Event) {
		mu.Lock()
		defer mu.Unlock()
		evs = append(evs, e)
		if len(evs) == n {
			cancel()
		}
	})
	if err != nil {
		t.Fatalf("watch: %v", err)
	}
	return evs
}

// expectErrno checks a step's errno; a refusal must come from the write
// itself, not from the read or open before it.
func expectErrno(t *testing.T, o outcome, want unix.Errno, what string) {
	t.Helper()
	if o.Errno != int(want) {
		t.Errorf("%s (%s %s): %s failed with errno %d %q, want %d (%v)", what, o.Op, o.Key, o.Stage, o.Errno, o.Err, int(want), want)
	} else if want != 0 && strings.HasPrefix(o.Op, "write") && o.Stage != "write" {
		t.Errorf("%s (%s %s): errno %d from the %s, want it from the write", what, o.Op, o.Key, o.Errno, o.Stage)
	}
}

func TestGuardDeniesGlobalWrites(t *testing.T) {
	m := testManager(t)
	cg := testCgroup(t)
	checkHostUnchanged(t)
	g, err := m.Attach(context.Background(), cg, "web", fullPolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g)

	procDir := t.TempDir()
	out := runInCgroup(t, cg, script{
		Pre: []step{{Op: "open", Key: "kernel.panic"}},
		Main: []step{
			{Op: "write", Key: "kernel.panic", Value: "="},
			{Op: "write", Key: "vm.swappiness", Value: "="},
			{Op: "read", Key: "kernel.pid_max"},
			{Op: "write-fd", Key: "kernel.panic", Value: "="},
			{Op: "write", Key: "net.core.rmem_max", Value: "="}, // below net.*, on the global list
			{Op: "unshare", NS: "mnt"},
			{Op: "mount-proc", Proc: procDir},
			{Op: "write", Key: "kernel.panic", Value: "=", Proc: procDir},
			{Op: "unshare", NS: "ipc"},
			{Op: "write", Key: "kernel.shmmax", Value: "68719476736"},
			{Op: "read", Key: "kernel.shmmax"},
			{Op: "unshare", NS: "net"},
			{Op: "write", Key: "net.ipv4.ip_local_port_range", Value: "20000 30000"},
			{Op: "read", Key: "net.ipv4.ip_local_port_range"},
		},
	})
	if len(out) != 15 {
		t.Fatalf("helper returned %d outcomes: %+v", len(out), out)
	}
	expectErrno(t, out[0], 0, "open before the move")
	expectErrno(t, out[1], unix.EPERM, "global key through /proc/sys")
	expectErrno(t, out[2], unix.EPERM, "another global key")
	expectErrno(t, out[3], 0, "read of a global key")
	if strings.TrimSpace(out[3].Value) == "" {
		t.Errorf("read of kernel.pid_max returned nothing")
	}
	expectErrno(t, out[4], unix.EPERM, "descriptor opened outside the cgroup")
	expectErrno(t, out[5], unix.EPERM, "global key under an allowed prefix")
	expectErrno(t, out[6], 0, "unshare mnt")
	expectErrno(t, out[7], 0, "mount a new procfs")
	expectErrno(t, out[8], unix.EPERM, "global key through a new procfs")
	expectErrno(t, out[9], 0, "unshare ipc")
	expectErrno(t, out[10], 0, "kernel.shmmax in a private IPC namespace")
	if out[11].Value != "68719476736\n" {
		t.Errorf("kernel.shmmax in the private IPC namespace reads %q", out[11].Value)
	}
	expectErrno(t, out[12], 0, "unshare net")
	expectErrno(t, out[13], 0, "net.ipv4.ip_local_port_range in a private netns")
	if out[14].Value != "20000\t30000\n" {
		t.Errorf("ip_local_port_range in the private netns reads %q", out[14].Value)
	}

	if n, err := g.Denied(); err != nil || n != 5 {
		t.Errorf("Denied() = %d, %v; want 5", n, err)
	}
	evs := collect(t, g, 5, 5*time.Second)
	var keys []string
	for _, e := range evs {
		keys = append(keys, e.Key)
		if e.ID != "web" || time.Since(e.Time) > time.Minute || time.Since(e.Time) < 0 {
			t.Errorf("event %+v: wrong id or time", e)
		}
	}
	sort.Strings(keys)
	if want := []string{"kernel.panic", "kernel.panic", "kernel.panic", "net.core.rmem_max", "vm.swappiness"}; strings.Join(keys, ",") != strings.Join(want, ",") {
		t.Errorf("event keys %v, want %v", keys, want)
	}
	if n, err := g.Lost(); err != nil || n != 0 {
		t.Errorf("Lost() = %d, %v", n, err)
	}

	// The test process is in another cgroup: the same write back succeeds.
	cur, err := readSysctl(sysctlPath("", "kernel.panic"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("/proc/sys/kernel/panic", []byte(cur), 0); err != nil {
		t.Errorf("write from outside the guarded cgroup: %v", err)
	}
}

func TestDetachLiftsTheGuard(t *testing.T) {
	m := testManager(t)
	cg := testCgroup(t)
	checkHostUnchanged(t)
	g, err := m.Attach(context.Background(), cg, "web", fullPolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	writeBack := script{Main: []step{{Op: "write", Key: "kernel.panic", Value: "="}}}
	expectErrno(t, runInCgroup(t, cg, writeBack)[0], unix.EPERM, "attached")
	if err := g.Detach(); err != nil {
		t.Fatal(err)
	}
	// Same value as it holds: no change to the host even now.
	expectErrno(t, runInCgroup(t, cg, writeBack)[0], 0, "detached")
	if ids := programsOn(t, cg); len(ids) != 0 {
		t.Errorf("programs still attached after Detach: %v", ids)
	}
	if _, err := os.Stat(m.pinDir("web")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins left after Detach: %v", err)
	}
	if _, err := m.Open("web"); !errors.Is(err, ErrNotAttached) {
		t.Errorf("Open after Detach: %v", err)
	}
	if err := g.Detach(); err != nil {
		t.Errorf("second Detach: %v", err)
	}
	if err := m.Detach("web"); err != nil {
		t.Errorf("Manager.Detach of a detached id: %v", err)
	}
}

func TestAttachIsIdempotent(t *testing.T) {
	m := testManager(t)
	cg := testCgroup(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	guards := make([]*Guard, 4)
	errs := make([]error, 4)
	for i := range guards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			guards[i], errs[i] = m.Attach(ctx, cg, "web.1", fullPolicy(t))
		}()
	}
	wg.Wait()
	var first Info
	for i, g := range guards {
		if errs[i] != nil {
			t.Fatalf("Attach %d: %v", i, errs[i])
		}
		closeAtEnd(t, g)
		in, err := g.Info()
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = in
		} else if in.ProgramID != first.ProgramID || in.LinkID != first.LinkID {
			t.Errorf("Attach %d made program %d link %d, first %d %d", i, in.ProgramID, in.LinkID, first.ProgramID, first.LinkID)
		}
	}
	if ids := programsOn(t, cg); len(ids) != 1 || ids[0] != first.ProgramID {
		t.Errorf("programs on the cgroup: %v, want just %d", ids, first.ProgramID)
	}
	if filepath.Base(first.PinDir) != "web:1" {
		t.Errorf("pin dir %s, want the id with its dot as a colon", first.PinDir)
	}
	ents, err := os.ReadDir(m.PinRoot())
	if err != nil || len(ents) != 1 {
		t.Errorf("pin root holds %v, %v; want one dir", ents, err)
	}

	// Attaching again with a narrower policy reuses the program and
	// rewrites its rules.
	narrow, err := NewPolicy([]string{"net.ipv4.ip_local_port_range"})
	if err != nil {
		t.Fatal(err)
	}
	g, err := m.Attach(ctx, cg, "web.1", narrow.For(allNS))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g)
	rules, err := g.Rules()
	if err != nil || strings.Join(rules, ",") != "allow net.ipv4.ip_local_port_range" {
		t.Errorf("rules after re-attach %q, %v", rules, err)
	}
	if ids := programsOn(t, cg); len(ids) != 1 || ids[0] != first.ProgramID {
		t.Errorf("programs on the cgroup after re-attach: %v", ids)
	}
}

func TestReconcile(t *testing.T) {
	m := testManager(t)
	cgA, cgB, cgRestored := testCgroup(t), testCgroup(t), testCgroup(t)
	checkHostUnchanged(t)
	ctx := context.Background()
	for id, cg := range map[string]string{"a": cgA, "b": cgB} {
		g, err := m.Attach(ctx, cg, id, fullPolicy(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := g.Close(); err != nil { // as when ferryd exits
			t.Fatal(err)
		}
	}
	// An Attach that died half way.
	if err := os.Mkdir(filepath.Join(m.PinRoot(), tmpPrefix+"c-123"), 0o700); err != nil {
		t.Fatal(err)
	}
	writeBack := script{Main: []step{{Op: "write", Key: "kernel.panic", Value: "="}}}
	expectErrno(t, runInCgroup(t, cgA, writeBack)[0], unix.EPERM, "a, while ferryd is down")

	// ferryd restarts: a new Manager on the same root, b is gone.
	m2, err := NewManager(m.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	re, rm, err := m2.Reconcile(ctx, map[string]string{"a": cgA})
	if err != nil || strings.Join(re, ",") != "a" || strings.Join(rm, ",") != "b" {
		t.Fatalf("Reconcile = %v, %v, %v; want [a] [b]", re, rm, err)
	}
	if ids := programsOn(t, cgB); len(ids) != 0 {
		t.Errorf("b's cgroup still has %v", ids)
	}
	if ids := programsOn(t, cgA); len(ids) != 1 {
		t.Errorf("a's cgroup has %v, want one program", ids)
	}
	ents, _ := os.ReadDir(m.PinRoot())
	if len(ents) != 1 || ents[0].Name() != "a" {
		t.Errorf("pin root after Reconcile: %v", ents)
	}
	// Reconciling again changes nothing.
	if re, rm, err := m2.Reconcile(ctx, map[string]string{"a": cgA}); err != nil || len(re) != 1 || len(rm) != 0 {
		t.Errorf("second Reconcile = %v, %v, %v", re, rm, err)
	}

	// The counter and the events survived: a reader after the restart gets
	// the denial made while nobody watched.
	g, err := m2.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := g.Denied(); err != nil || n != 1 {
		t.Errorf("Denied after restart = %d, %v; want 1", n, err)
	}
	if evs := collect(t, g, 1, 5*time.Second); len(evs) != 1 || evs[0].Key != "kernel.panic" {
		t.Errorf("events after restart: %+v", evs)
	}
	before, _ := g.Info()
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}

	// A restore puts a into a new cgroup: reconcile moves the guard.
	re, rm, err = m2.Reconcile(ctx, map[string]string{"a": cgRestored})
	if err != nil || len(re) != 1 || len(rm) != 0 {
		t.Fatalf("Reconcile after restore = %v, %v, %v", re, rm, err)
	}
	if ids := programsOn(t, cgA); len(ids) != 0 {
		t.Errorf("old cgroup still guarded: %v", ids)
	}
	if ids := programsOn(t, cgRestored); len(ids) != 1 || ids[0] != before.ProgramID {
		t.Errorf("restored cgroup has %v, want program %d", ids, before.ProgramID)
	}
	expectErrno(t, runInCgroup(t, cgRestored, writeBack)[0], unix.EPERM, "a after the restore")
	g, err = m2.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g)
	if n, _ := g.Denied(); n != 2 {
		t.Errorf("Denied after restore = %d, want 2 (the count goes on)", n)
	}
}

func TestAttachFollowsARecreatedCgroup(t *testing.T) {
	m := testManager(t)
	ctx := context.Background()
	cg := testCgroup(t)
	g, err := m.Attach(ctx, cg, "web", fullPolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g)
	first, _ := g.Info()
	// The container's cgroup is removed (the link goes defunct) and a new
	// one is made, as for a restore on the same host.
	if err := os.Remove(cg); err != nil {
		t.Fatal(err)
	}
	if in, _ := g.Info(); in.CgroupID != 0 {
		t.Logf("link still reports cgroup %d right after rmdir", in.CgroupID)
	}
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	g2, err := m.Attach(ctx, cg, "web", fullPolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g2)
	in, _ := g2.Info()
	if in.ProgramID != first.ProgramID || in.LinkID == first.LinkID || in.CgroupID == 0 {
		t.Errorf("after re-attach %+v, before %+v: want same program, new link", in, first)
	}
	if ids := programsOn(t, cg); len(ids) != 1 {
		t.Errorf("new cgroup has %v", ids)
	}
}

func TestEnsureBPFFS(t *testing.T) {
	testManager(t) // root, and the skip/fail rule
	dir := t.TempDir()
	mounted, err := EnsureBPFFS(dir)
	if err != nil || !mounted {
		t.Fatalf("EnsureBPFFS(%s) = %v, %v", dir, mounted, err)
	}
	defer func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Error(err)
		}
	}()
	if ok, err := IsBPFFS(dir); !ok || err != nil {
		t.Errorf("IsBPFFS after mount = %v, %v", ok, err)
	}
	if mounted, err := EnsureBPFFS(dir); mounted || err != nil {
		t.Errorf("second EnsureBPFFS = %v, %v; want no new mount", mounted, err)
	}
}

func TestKernelErrorsNameTheirInputs(t *testing.T) {
	m := testManager(t)
	cg := testCgroup(t)
	_, err := m.Attach(context.Background(), cg+"-missing", "web", fullPolicy(t))
	var ke *KernelError
	if !errors.As(err, &ke) || !errors.Is(err, unix.ENOENT) || !strings.Contains(err.Error(), cg+"-missing") {
		t.Errorf("Attach to a missing cgroup: %v", err)
	}
}

// A cgroup the container makes below its own is guarded too: the kernel runs
// every ancestor's programs, and a link cannot be overridden from below.
func TestGuardCoversSubCgroups(t *testing.T) {
	m := testManager(t)
	cg := testCgroup(t)
	checkHostUnchanged(t)
	g, err := m.Attach(context.Background(), cg, "web", fullPolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g)
	sub := filepath.Join(cg, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(sub) }) // runs before the parent's removal
	out := runInCgroup(t, sub, script{Main: []step{{Op: "write", Key: "kernel.panic", Value: "="}}})
	expectErrno(t, out[0], unix.EPERM, "write from a child cgroup")
	if n, _ := g.Denied(); n != 1 {
		t.Errorf("Denied() = %d, want 1", n)
	}
}

// The kernel enforces the operator's narrowing, inside the container's own
// namespaces too.
func TestNarrowedPolicyInKernel(t *testing.T) {
	m := testManager(t)
	cg := testCgroup(t)
	checkHostUnchanged(t)
	p, err := NewPolicy([]string{"net.ipv4.ip_local_port_range"})
	if err != nil {
		t.Fatal(err)
	}
	g, err := m.Attach(context.Background(), cg, "web", p.For(allNS))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g)
	out := runInCgroup(t, cg, script{Main: []step{
		{Op: "unshare", NS: "ipc"},
		{Op: "write", Key: "kernel.shmmax", Value: "="},
		{Op: "unshare", NS: "net"},
		{Op: "write", Key: "net.ipv4.ip_forward", Value: "="},
		{Op: "write", Key: "net.ipv4.ip_local_port_range", Value: "20000 30000"},
	}})
	expectErrno(t, out[1], unix.EPERM, "IPC key outside the narrowed list")
	expectErrno(t, out[3], unix.EPERM, "net key outside the narrowed list")
	expectErrno(t, out[4], 0, "the one allowed key")
	if n, _ := g.Denied(); n != 2 {
		t.Errorf("Denied() = %d, want 2", n)
	}
}

// A burst larger than the ring is counted exactly; what did not fit in the
// ring is counted as lost, and the ring keeps the oldest events.
func TestBurstBeyondTheRing(t *testing.T) {
	const burst = 500
	m := testManager(t)
	cg := testCgroup(t)
	checkHostUnchanged(t)
	g, err := m.Attach(context.Background(), cg, "web", fullPolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, g)
	out := runInCgroup(t, cg, script{Main: []step{{Op: "write", Key: "kernel.panic", Value: "=", N: burst}}})
	expectErrno(t, out[0], unix.EPERM, "burst")
	denied, _ := g.Denied()
	lost, _ := g.Lost()
	evs := collect(t, g, burst, time.Second) // they are all in the ring already
	if denied != burst || lost == 0 || uint64(len(evs))+lost != burst {
		t.Errorf("denied %d, lost %d, events %d: want %d = events + lost, some lost", denied, lost, len(evs), burst)
	}
	t.Logf("ring held %d of %d events", len(evs), burst)
}

// Watch returns when the guard is closed or detached, as on rm.
func TestWatchEndsOnDetach(t *testing.T) {
	m := testManager(t)
	cg := testCgroup(t)
	g, err := m.Attach(context.Background(), cg, "web", fullPolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- g.Watch(context.Background(), func(Event) {}) }()
	time.Sleep(100 * time.Millisecond) // let Watch block in the ring
	if err := g.Detach(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watch after Detach: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch still running after Detach")
	}
	if err := g.Watch(context.Background(), func(Event) {}); err == nil {
		t.Error("Watch on a detached guard succeeded")
	}
}
