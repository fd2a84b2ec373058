package cgroup

import (
	"bytes"
	"context"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// rig is a controller on a fake cgroupfs, a fake /proc/pressure and a fake clock.
type rig struct {
	t    *testing.T
	fs   *fakeFS
	psi  *fakePSI
	clk  *fakeClock
	node *Node
	c    *Controller
	log  *bytes.Buffer

	mu     sync.Mutex
	events []Event
}

var (
	ctA  = Container{ID: "a", Path: "/ferry/a", Spec: Spec{Guarantee: Amount{CPU: 0.5, Memory: 64 * mi}, Ceiling: Amount{CPU: 1.5, Memory: 256 * mi}}}
	ctB  = Container{ID: "b", Path: "/ferry/b", Spec: Spec{Guarantee: Amount{CPU: 0.5, Memory: 128 * mi}}} // ceiling = guarantee
	ctBE = Container{ID: "be", Path: "/ferry/be"}                                                          // best effort
)

func newRig(t *testing.T, v2 bool, capacity Amount, tune func(*DetectorConfig)) *rig {
	t.Helper()
	r := &rig{t: t, psi: newFakePSI(t), clk: newFakeClock(), log: &bytes.Buffer{}}
	if v2 {
		r.fs = newFakeV2(t)
		r.fs.put("ferry", "memory.min", "0")
	} else {
		r.fs = newFakeV1(t)
	}
	for _, ct := range []Container{ctA, ctB, ctBE} {
		r.fs.addContainer(ct.Path)
	}
	r.node = mustNode(t, capacity, Amount{})
	cfg := DefaultDetectorConfig()
	cfg.Source = HostPressure(strings.TrimSuffix(r.psi.dir, "/pressure"))
	if tune != nil {
		tune(&cfg)
	}
	var logMu sync.Mutex
	c, err := NewController(ControllerConfig{Node: r.node, Driver: r.fs.driver(), Parent: "/ferry", Detector: cfg, Clock: r.clk,
		Logger: slog.New(slog.NewTextHandler(lockedWriter{&logMu, r.log}, nil)),
		OnEvent: func(e Event) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.events = append(r.events, e)
		}})
	if err != nil {
		t.Fatal(err)
	}
	r.c = c
	return r
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (r *rig) add(cts ...Container) {
	r.t.Helper()
	for _, ct := range cts {
		if err := r.node.Admit(ct.ID, ct.Spec.Guarantee); err != nil {
			r.t.Fatal(err)
		}
		if err := r.c.Add(context.Background(), ct); err != nil {
			r.t.Fatal(err)
		}
	}
}

// step runs n ticks, each after adding the given stall time for the tick to
// the host's pressure files.
func (r *rig) step(n int, memStall, cpuStall time.Duration) {
	r.t.Helper()
	for i := 0; i < n; i++ {
		r.psi.add(Memory, memStall)
		r.psi.add(CPU, cpuStall)
		r.clk.Advance(tick)
		if err := r.c.Tick(context.Background()); err != nil {
			r.t.Fatal(err)
		}
	}
}

// stepUntil runs ticks until cond holds and returns how many it took (or fails after max).
func (r *rig) stepUntil(max int, memStall, cpuStall time.Duration, cond func() bool) int {
	r.t.Helper()
	for i := 1; i <= max; i++ {
		r.step(1, memStall, cpuStall)
		if cond() {
			return i
		}
	}
	r.t.Fatalf("condition not reached in %d ticks", max)
	return 0
}

func (r *rig) eventList() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.events...)
}

func (r *rig) memLimit(path string) int64 {
	if r.fs.v2 {
		return r.fs.getInt("", path, "memory.max")
	}
	return r.fs.getInt("memory", path, "memory.limit_in_bytes")
}

func (r *rig) quota(path string) string {
	if r.fs.v2 {
		return r.fs.get("", path, "cpu.max")
	}
	return r.fs.get("cpu", path, "cpu.cfs_quota_us")
}

func TestControllerHardensAndRelaxesMemory(t *testing.T) {
	for _, v2 := range []bool{false, true} {
		name := map[bool]string{false: "v1", true: "v2"}[v2]
		t.Run(name, func(t *testing.T) {
			r := newRig(t, v2, Amount{CPU: 2, Memory: gi}, nil)
			r.add(ctA, ctB, ctBE)
			if r.memLimit("/ferry/a") != 256*mi {
				t.Fatalf("relaxed limit of a: %d", r.memLimit("/ferry/a"))
			}
			wantQuota := map[bool]string{false: "150000", true: "150000 100000"}[v2]
			r.step(10, 0, 0)
			if len(r.eventList()) != 0 {
				t.Fatalf("events while calm: %v", r.eventList())
			}
			// 30% memory stall per tick: the 500 ms share reaches 10% after two ticks.
			n := r.stepUntil(10, 30*time.Millisecond, 0, func() bool { return r.c.State(Memory) == Hardened })
			if n > 2 {
				t.Errorf("hardened after %d ticks, want 2", n)
			}
			if got := r.memLimit("/ferry/a"); got != 64*mi {
				t.Errorf("hardened limit of a: %d, want its guarantee", got)
			}
			if got := r.memLimit("/ferry/b"); got != 128*mi {
				t.Errorf("limit of b: %d", got)
			}
			if got := r.memLimit("/ferry/be"); got != 4*mi {
				t.Errorf("best-effort container hardened to %d, want the 4Mi floor", got)
			}
			if q := r.quota("/ferry/a"); q != wantQuota || r.c.State(CPU) != Relaxed {
				t.Errorf("cpu touched by a memory transition: quota %s state %s", q, r.c.State(CPU))
			}
			if l, a, ok := r.c.Effective("a"); !ok || l.Ceiling.Memory != 64*mi || a.MemoryLimit != 64*mi || l.Ceiling.CPU != 1.5 {
				t.Errorf("effective %+v %+v", l, a)
			}
			ev := r.eventList()
			if len(ev) != 1 || ev[0].Resource != Memory || ev[0].From != Relaxed || ev[0].To != Hardened ||
				!strings.Contains(ev[0].Reason, "memory psi some") || ev[0].Values["psi"] < 0.1 || ev[0].Values["containers"] != 3 {
				t.Fatalf("event %+v", ev)
			}
			if !strings.Contains(r.log.String(), "elastic state transition") || !strings.Contains(r.log.String(), "to=hardened") {
				t.Errorf("no log line: %s", r.log.String())
			}
			if m := r.c.Metrics(); m.Transitions["memory:hardened"] != 1 || m.States[Memory] != Hardened {
				t.Errorf("metrics %+v", m)
			}
			// Calm: the 500 ms share drops to ≤ 2% within 5 ticks, then 30 s must pass.
			r.step(290, 0, 0)
			if r.c.State(Memory) != Hardened {
				t.Fatal("relaxed before the leave window")
			}
			r.stepUntil(20, 0, 0, func() bool { return r.c.State(Memory) == Relaxed })
			if got := r.memLimit("/ferry/a"); got != 256*mi {
				t.Errorf("relaxed limit of a: %d, want its ceiling back", got)
			}
			ev = r.eventList()
			if len(ev) != 2 || ev[1].To != Relaxed || !strings.Contains(ev[1].Reason, "for 30s") {
				t.Errorf("events %+v", ev)
			}
			if r.fs.oomKills() != 0 {
				t.Error("a v2 memory.max write would have OOM-killed")
			}
		})
	}
}

// The "must show", end to end: pressure oscillating around one
// threshold, through the fake cgroupfs and the fake clock, does not flap.
func TestControllerOscillatingPressureDoesNotFlap(t *testing.T) {
	r := newRig(t, false, Amount{CPU: 2, Memory: gi}, nil)
	r.add(ctA)
	writes := func() int {
		n := 0
		for _, w := range r.fs.writeLog() {
			if strings.HasPrefix(w, "memory/ferry/a/memory.limit_in_bytes=") {
				n++
			}
		}
		return n
	}
	before := writes()
	// 11% and 7% in turn around the 10% enter level, five minutes: an
	// instantaneous comparison would flip 3000 times.
	for i := 0; i < 1500; i++ {
		r.step(1, 11*time.Millisecond, 0)
		r.step(1, 7*time.Millisecond, 0)
	}
	if ev := r.eventList(); len(ev) != 0 || r.c.State(Memory) != Relaxed || writes() != before {
		t.Fatalf("flapped around the enter level: %d events, state %s, %d limit writes", len(ev), r.c.State(Memory), writes()-before)
	}
	// 14% and 8% in turn: the window's share is above 10%, so it hardens,
	// once; 8% is far above the 2% leave level, so it never relaxes.
	for i := 0; i < 1500; i++ {
		r.step(1, 14*time.Millisecond, 0)
		r.step(1, 8*time.Millisecond, 0)
	}
	if ev := r.eventList(); len(ev) != 1 || r.c.State(Memory) != Hardened {
		t.Fatalf("around enter, above: %d events %+v", len(ev), ev)
	}
	// 1% and 3% in turn around the 2% leave level: never held below it.
	for i := 0; i < 1500; i++ {
		r.step(1, time.Millisecond, 0)
		r.step(1, 3*time.Millisecond, 0)
	}
	if ev := r.eventList(); len(ev) != 1 || r.c.State(Memory) != Hardened || writes() != before+1 {
		t.Fatalf("flapped around the leave level: %d events, %d limit writes", len(ev), writes()-before)
	}
}

func TestSelfLimitedContainerDoesNotHardenTheNode(t *testing.T) {
	for _, count := range []bool{false, true} {
		r := newRig(t, false, Amount{CPU: 2, Memory: gi}, func(c *DetectorConfig) { c.CountSelfLimited = count })
		r.add(ctA, ctB)
		// a thrashes against its own ceiling: its failcnt rises and the
		// whole host stall is its own.
		for i := 1; i <= 20; i++ {
			r.fs.set("memory", "/ferry/a", "memory.failcnt", strconv.Itoa(i*100))
			r.fs.addCgroupPSI("/ferry/a", Memory, 40*time.Millisecond)
			r.step(1, 40*time.Millisecond, 0)
		}
		want := map[bool]State{false: Relaxed, true: Hardened}[count]
		if got := r.c.State(Memory); got != want {
			t.Errorf("CountSelfLimited=%v: state %s, want %s", count, got, want)
		}
	}
	// Stall beyond the self-limited container's own still counts.
	r := newRig(t, false, Amount{CPU: 2, Memory: gi}, nil)
	r.add(ctA, ctB)
	for i := 1; i <= 20; i++ {
		r.fs.set("memory", "/ferry/a", "memory.failcnt", strconv.Itoa(i*100))
		r.fs.addCgroupPSI("/ferry/a", Memory, 10*time.Millisecond)
		r.step(1, 40*time.Millisecond, 0)
	}
	if r.c.State(Memory) != Hardened {
		t.Error("30% stall not explained by the self-limited container was discounted")
	}
}

func TestUsageAgainstAllocatableHardens(t *testing.T) {
	r := newRig(t, false, Amount{CPU: 2, Memory: 300 * mi}, nil)
	r.add(ctA, ctB)
	r.step(1, 0, 0) // the first tick only takes the baseline
	// The working sets reach 97% of allocatable (a bursts to 163Mi, b at 128Mi).
	r.fs.setUsage("/ferry/a", 163*mi, 20*mi)
	r.fs.setUsage("/ferry/b", 128*mi, 128*mi)
	n := r.stepUntil(10, 0, 0, func() bool { return r.c.State(Memory) == Hardened })
	if n != 5 {
		t.Errorf("usage hardened after %d ticks, want 5 (the window)", n)
	}
	if got := r.memLimit("/ferry/a"); got != 64*mi {
		t.Errorf("limit of a %d", got)
	}
	ev := r.eventList()
	if len(ev) != 1 || !strings.Contains(ev[0].Reason, "usage of allocatable") {
		t.Errorf("events %+v", ev)
	}
	// CPU: the containers use 2.1 cores of 2 allocatable.
	var used int64
	n = r.stepUntil(20, 0, 0, func() bool {
		used += int64(105 * time.Millisecond)
		r.fs.set("cpuacct", "/ferry/a", "cpuacct.usage", strconv.FormatInt(used, 10))
		r.fs.set("cpuacct", "/ferry/b", "cpuacct.usage", strconv.FormatInt(used, 10))
		return r.c.State(CPU) == Hardened
	})
	if q := r.quota("/ferry/a"); q != "50000" {
		t.Errorf("cpu hardened quota of a %s after %d ticks", q, n)
	}
	if rep := r.c.Report(); rep.CPU.Used < 2 || rep.CPU.State != Hardened {
		t.Errorf("report cpu %+v", rep.CPU)
	}
}

func TestPendingStepDownIsRetried(t *testing.T) {
	r := newRig(t, false, Amount{CPU: 2, Memory: gi}, nil)
	r.add(ctA)
	r.fs.setUsage("/ferry/a", 200*mi, 150*mi) // 150Mi anonymous: cannot be reclaimed
	r.stepUntil(10, 50*time.Millisecond, 0, func() bool { return r.c.State(Memory) == Hardened })
	_, a, _ := r.c.Effective("a")
	if !a.MemoryPending || a.MemoryLimit != 154*mi || r.memLimit("/ferry/a") != 154*mi {
		t.Fatalf("applied %+v, limit %d", a, r.memLimit("/ferry/a"))
	}
	if !strings.Contains(r.log.String(), "memory step-down pending") {
		t.Error("pending step-down not logged")
	}
	attempts := func() int {
		n := 0
		for _, w := range r.fs.writeLog() {
			if w == "memory/ferry/a/memory.limit_in_bytes=67108864" {
				n++
			}
		}
		return n
	}
	first := attempts()
	r.step(5, 50*time.Millisecond, 0)
	if attempts() != first {
		t.Error("retried before the retry interval")
	}
	if m := r.c.Metrics(); m.Pending != 1 {
		t.Errorf("pending %d", m.Pending)
	}
	// The process frees its memory: the next retry completes the step-down.
	r.fs.setUsage("/ferry/a", 150*mi, 30*mi)
	r.stepUntil(12, 50*time.Millisecond, 0, func() bool {
		_, a, _ := r.c.Effective("a")
		return !a.MemoryPending
	})
	if got := r.memLimit("/ferry/a"); got != 64*mi {
		t.Errorf("limit %d after the retry", got)
	}
}

func TestRebuildReadsTheStateBackFromTheKernel(t *testing.T) {
	r := newRig(t, false, Amount{CPU: 2, Memory: gi}, nil)
	// ferryd died while memory was hardened: a sits at its guarantee.
	r.fs.set("memory", "/ferry/a", "memory.limit_in_bytes", strconv.FormatInt(64*mi, 10))
	r.fs.set("memory", "/ferry/b", "memory.limit_in_bytes", strconv.FormatInt(128*mi, 10))
	r.fs.set("cpu", "/ferry/a", "cpu.cfs_quota_us", "150000")
	if err := r.c.Rebuild(context.Background(), []Container{ctA, ctB, ctBE}); err != nil {
		t.Fatal(err)
	}
	if r.c.State(Memory) != Hardened || r.c.State(CPU) != Relaxed {
		t.Fatalf("states memory %s cpu %s", r.c.State(Memory), r.c.State(CPU))
	}
	if r.memLimit("/ferry/a") != 64*mi || r.memLimit("/ferry/be") != 4*mi || r.fs.get("cpu", "/ferry/a", "cpu.shares") != "512" {
		t.Errorf("limits after rebuild: a %d be %d shares %s", r.memLimit("/ferry/a"), r.memLimit("/ferry/be"), r.fs.get("cpu", "/ferry/a", "cpu.shares"))
	}
	ev := r.eventList()
	if len(ev) != 1 || ev[0].To != Hardened || !strings.Contains(ev[0].Reason, "rebuild") {
		t.Fatalf("events %+v", ev)
	}
	// A rebuilt hardened state still needs the full leave window of calm.
	r.step(290, 0, 0)
	if r.c.State(Memory) != Hardened {
		t.Fatal("relaxed early after a rebuild")
	}
	r.stepUntil(20, 0, 0, func() bool { return r.c.State(Memory) == Relaxed })
	if r.memLimit("/ferry/a") != 256*mi {
		t.Errorf("relaxed limit %d", r.memLimit("/ferry/a"))
	}

	// All at their ceilings: relaxed, limits rewritten, no event; a second
	// Rebuild does not double anything.
	r2 := newRig(t, false, Amount{CPU: 2, Memory: gi}, nil)
	r2.fs.set("memory", "/ferry/a", "memory.limit_in_bytes", strconv.FormatInt(256*mi, 10))
	for i := 0; i < 2; i++ {
		if err := r2.c.Rebuild(context.Background(), []Container{ctA, ctB}); err != nil {
			t.Fatal(err)
		}
	}
	if r2.c.State(Memory) != Relaxed || len(r2.eventList()) != 0 || len(r2.c.Report().Containers) != 2 {
		t.Errorf("state %s events %v", r2.c.State(Memory), r2.eventList())
	}
	// A container whose cgroup vanished is reported, the rest still applied.
	err := r2.c.Rebuild(context.Background(), []Container{ctA, {ID: "gone", Path: "/ferry/gone"}})
	if err == nil || !strings.Contains(err.Error(), `"gone"`) || r2.memLimit("/ferry/a") != 256*mi {
		t.Errorf("rebuild with a missing cgroup: %v", err)
	}
}

func TestAddWhileHardenedClampsAtOnce(t *testing.T) {
	r := newRig(t, false, Amount{CPU: 2, Memory: gi}, nil)
	r.add(ctB)
	r.stepUntil(10, 50*time.Millisecond, 500*time.Millisecond, func() bool {
		return r.c.State(Memory) == Hardened && r.c.State(CPU) == Hardened
	})
	if s := r.c.EffectiveSpec(ctA.Spec); s.Ceiling != ctA.Spec.Guarantee {
		t.Errorf("effective spec for create %+v", s)
	}
	r.add(ctA)
	if r.memLimit("/ferry/a") != 64*mi || r.quota("/ferry/a") != "50000" {
		t.Errorf("added while hardened: limit %d quota %s", r.memLimit("/ferry/a"), r.quota("/ferry/a"))
	}
	// Update (resize) rewrites; Remove forgets.
	up := ctA
	up.Spec.Guarantee.Memory = 96 * mi
	if err := r.c.Update(context.Background(), up); err != nil {
		t.Fatal(err)
	}
	if r.memLimit("/ferry/a") != 96*mi {
		t.Errorf("after resize %d", r.memLimit("/ferry/a"))
	}
	if err := r.c.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := r.c.Effective("a"); ok {
		t.Error("still tracked after Remove")
	}
	if err := r.c.Update(context.Background(), up); err == nil {
		t.Error("update of an untracked container")
	}
	bad := ctA
	bad.Spec.Guarantee.Memory = 512 * mi // above its ceiling
	if err := r.c.Add(context.Background(), bad); err == nil {
		t.Error("invalid spec accepted")
	}
}

func TestRunLoopOnTheFakeClock(t *testing.T) {
	r := newRig(t, false, Amount{CPU: 2, Memory: gi}, nil)
	r.add(ctA)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.c.Run(ctx) }()
	waitTicks := func(n uint64) {
		deadline := time.Now().Add(5 * time.Second)
		for r.c.Metrics().Ticks < n {
			if time.Now().After(deadline) {
				t.Fatalf("loop stuck at %d ticks, want %d", r.c.Metrics().Ticks, n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	// The ticker is made when Run starts; wait for it.
	for deadline := time.Now().Add(5 * time.Second); ; {
		r.clk.mu.Lock()
		n := len(r.clk.tickers)
		r.clk.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Run made no ticker")
		}
		time.Sleep(time.Millisecond)
	}
	// A baseline tick, then five ticks of 50% stall cover the window.
	for i := uint64(1); i <= 6; i++ {
		r.psi.add(Memory, 50*time.Millisecond)
		r.clk.Advance(tick)
		waitTicks(i)
	}
	if r.c.State(Memory) != Hardened || r.memLimit("/ferry/a") != 64*mi {
		t.Errorf("state %s limit %d", r.c.State(Memory), r.memLimit("/ferry/a"))
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestReport(t *testing.T) {
	r := newRig(t, true, Amount{CPU: 2, Memory: gi}, nil)
	r.add(ctA, ctB)
	if err := r.node.Reserve("m", Amount{CPU: 0.5, Memory: 32 * mi}); err != nil {
		t.Fatal(err)
	}
	if got := r.fs.getInt("", "/ferry", "memory.min"); got != 192*mi {
		t.Errorf("parent memory.min %d, want the sum of guarantees", got)
	}
	r.fs.setUsage("/ferry/a", 100*mi, 0)
	r.step(3, 0, 0)
	rep := r.c.Report()
	if rep.Driver != "v2" || rep.Memory.Capacity != float64(gi) || rep.Memory.Allocatable != float64(gi) ||
		rep.Memory.Guaranteed != float64(224*mi) || rep.Memory.Incoming != float64(32*mi) || rep.Memory.Used != float64(100*mi) ||
		rep.Memory.PressureAvg10 != 1 || rep.Memory.State != Relaxed || rep.Memory.Unit != "bytes" {
		t.Errorf("memory %+v", rep.Memory)
	}
	if rep.CPU.Guaranteed != 1.5 || rep.CPU.Unguaranteed != 0.5 || rep.CPU.UnguaranteedShare != 0.25 || rep.CPU.Unit != "cores" {
		t.Errorf("cpu %+v", rep.CPU)
	}
	// cpu: 25% of allocatable unguaranteed; memory: 78%.
	if rep.Scarcest != CPU {
		t.Errorf("scarcest %s", rep.Scarcest)
	}
	if len(rep.Containers) != 2 || rep.Containers[0].ID != "a" || rep.Containers[0].Effective.Memory != 256*mi || rep.Containers[0].Usage == nil {
		t.Errorf("containers %+v", rep.Containers)
	}
	if err := r.c.Remove("b"); err != nil {
		t.Fatal(err)
	}
	if got := r.fs.getInt("", "/ferry", "memory.min"); got != 64*mi {
		t.Errorf("parent memory.min after remove %d", got)
	}
}
