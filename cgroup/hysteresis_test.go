package cgroup

import (
	"errors"
	"math/rand"
	"testing"
	"time"
)

const tick = 100 * time.Millisecond

var testPolicy = Policy{
	PSI:         Threshold{Enter: 0.20, Leave: 0.05},
	EnterWindow: 500 * time.Millisecond,
	LeaveWindow: 10 * time.Second,
}

type transition struct {
	at time.Duration
	to State
}

// drive feeds a PSI signal, one value per tick, and returns the transitions.
func drive(m *machine, start time.Time, from time.Duration, values func(i int) float64, n int) []transition {
	var out []transition
	for i := 0; i < n; i++ {
		at := from + time.Duration(i+1)*tick
		v := m.observe(start.Add(at), tick, signalValue{values(i), true}, signalValue{})
		if v.changed {
			out = append(out, transition{at, v.to})
		}
	}
	return out
}

func TestMachineEntersWithinTheWindowAndNotBeforeItIsCovered(t *testing.T) {
	start := time.Unix(0, 0)
	// A full stall is seen as soon as the window is covered (5 ticks), not
	// earlier: one tick of history proves nothing.
	m := newMachine(Memory, testPolicy, start)
	tr := drive(m, start, 0, func(int) float64 { return 1 }, 10)
	if len(tr) != 1 || tr[0] != (transition{500 * time.Millisecond, Hardened}) {
		t.Fatalf("step to 100%%: %v", tr)
	}
	// After calm history, a step to 100% is seen after one tick: the
	// window's share reaches 20% at once.
	m = newMachine(Memory, testPolicy, start)
	drive(m, start, 0, func(int) float64 { return 0 }, 20)
	tr = drive(m, start, 2*time.Second, func(int) float64 { return 1 }, 10)
	if len(tr) != 1 || tr[0].at != 2100*time.Millisecond {
		t.Fatalf("step to 100%% after calm: %v", tr)
	}
	// A step to 25% takes four ticks (4 × 25% / 5 = 20%).
	m = newMachine(Memory, testPolicy, start)
	drive(m, start, 0, func(int) float64 { return 0 }, 20)
	tr = drive(m, start, 2*time.Second, func(int) float64 { return 0.25 }, 10)
	if len(tr) != 1 || tr[0].at != 2400*time.Millisecond {
		t.Fatalf("step to 25%%: %v", tr)
	}
	// A single 100 ms spike of 60% is not held: it stays relaxed.
	m = newMachine(Memory, testPolicy, start)
	tr = drive(m, start, 0, func(i int) float64 {
		if i == 30 {
			return 0.6
		}
		return 0.02
	}, 100)
	if len(tr) != 0 {
		t.Fatalf("spike: %v", tr)
	}
}

func TestMachineLeavesAfterTheLongWindowOfCalm(t *testing.T) {
	start := time.Unix(0, 0)
	m := newMachine(Memory, testPolicy, start)
	drive(m, start, 0, func(int) float64 { return 0.5 }, 10)
	if m.state != Hardened {
		t.Fatal("not hardened")
	}
	// Calm from 1 s on: the 500 ms share is ≤ 5% from 1.5 s; relaxed 10 s later.
	tr := drive(m, start, time.Second, func(int) float64 { return 0 }, 200)
	if len(tr) != 1 || tr[0] != (transition{11500 * time.Millisecond, Relaxed}) {
		t.Fatalf("leave: %v", tr)
	}
	// One tick above Leave restarts the count.
	m = newMachine(Memory, testPolicy, start)
	drive(m, start, 0, func(int) float64 { return 0.5 }, 10)
	tr = drive(m, start, time.Second, func(i int) float64 {
		if i == 80 { // at 9.1 s
			return 0.5
		}
		return 0
	}, 300)
	if len(tr) != 1 || tr[0].at != 9100*time.Millisecond+500*time.Millisecond+10*time.Second {
		t.Fatalf("leave after a blip: %v", tr)
	}
}

// The "must show": a signal that oscillates around one threshold
// must not make the state flap.
func TestMachineOscillationAroundOneThresholdDoesNotFlap(t *testing.T) {
	start := time.Unix(0, 0)
	const ticks = 6000 // ten minutes
	cases := []struct {
		name  string
		v     func(i int) float64
		max   int
		final State
	}{
		// Every other tick above and below Enter (20%), averaging just below:
		// an instantaneous comparison would flap 6000 times; the window never
		// reaches Enter.
		{"around enter, mean below", func(i int) float64 { return []float64{0.22, 0.16}[i%2] }, 0, Relaxed},
		// Averaging just above: hardens once, and never relaxes because the
		// signal never gets anywhere near Leave (5%).
		{"around enter, mean above", func(i int) float64 { return []float64{0.25, 0.17}[i%2] }, 1, Hardened},
		// Slow square wave across both levels (2 s at 30%, 2 s at 0) with a period far
		// below LeaveWindow: one transition.
		{"slow square wave", func(i int) float64 { return []float64{0.3, 0}[(i/20)%2] }, 1, Hardened},
		// Random jitter of ±10 points around Enter.
		{"noise around enter", func() func(int) float64 {
			r := rand.New(rand.NewSource(1))
			return func(int) float64 { return 0.20 + (r.Float64()-0.5)*0.2 }
		}(), 1, Hardened},
	}
	for _, c := range cases {
		m := newMachine(Memory, testPolicy, start)
		tr := drive(m, start, 0, c.v, ticks)
		if len(tr) > c.max || m.state != c.final {
			t.Errorf("%s: %d transitions %v, final %s; want at most %d, final %s", c.name, len(tr), tr, m.state, c.max, c.final)
		}
	}
	// Hardened, then oscillating around Leave (5%): never held below it, never relaxes.
	m := newMachine(Memory, testPolicy, start)
	drive(m, start, 0, func(int) float64 { return 0.5 }, 10)
	tr := drive(m, start, time.Second, func(i int) float64 { return []float64{0.03, 0.08}[i%2] }, ticks)
	if len(tr) != 0 || m.state != Hardened {
		t.Errorf("around leave: %v, final %s", tr, m.state)
	}
}

func TestMachineUsageSignalAndGaps(t *testing.T) {
	start := time.Unix(0, 0)
	p := Policy{PSI: Threshold{Enter: 0.2, Leave: 0.05}, Usage: Threshold{Enter: 0.95, Leave: 0.85},
		EnterWindow: 500 * time.Millisecond, LeaveWindow: time.Second}
	m := newMachine(Memory, p, start)
	at := func(i int) time.Time { return start.Add(time.Duration(i) * tick) }
	for i := 1; i <= 5; i++ {
		m.observe(at(i), tick, signalValue{0, true}, signalValue{0.97, true})
	}
	if m.state != Hardened {
		t.Fatal("usage at 97% of allocatable did not harden")
	}
	// Usage drops, but PSI misses a tick (a gap in the window): not known
	// to be calm, so the count towards relaxing starts only after it.
	for i := 6; i <= 9; i++ {
		m.observe(at(i), tick, signalValue{0, true}, signalValue{0.5, true})
	}
	m.observe(at(10), tick, signalValue{}, signalValue{0.5, true})
	var relaxedAt int
	for i := 11; i <= 40 && relaxedAt == 0; i++ {
		if v := m.observe(at(i), tick, signalValue{0, true}, signalValue{0.5, true}); v.changed {
			relaxedAt = i
		}
	}
	// The window holds the gap until tick 15; cool from 15, relaxed 1 s later.
	if relaxedAt != 25 {
		t.Fatalf("relaxed at tick %d, want 25", relaxedAt)
	}
	// A kernel without PSI: the signal is absent and usage alone decides.
	m = newMachine(Memory, p, start)
	for i := 1; i <= 5; i++ {
		m.observe(at(i), tick, signalValue{}, signalValue{0.97, true})
	}
	if m.state != Hardened {
		t.Fatal("usage alone did not harden")
	}
	for i := 6; i <= 30; i++ {
		m.observe(at(i), tick, signalValue{}, signalValue{0.5, true})
	}
	if m.state != Relaxed {
		t.Fatal("without PSI the node never relaxes")
	}
}

func TestPolicyValidation(t *testing.T) {
	good := DefaultDetectorConfig()
	if err := good.validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*DetectorConfig){
		"leave above enter": func(c *DetectorConfig) { c.Memory.PSI.Leave = 0.5 },
		"no window":         func(c *DetectorConfig) { c.CPU.EnterWindow = 0 },
		"slow loop":         func(c *DetectorConfig) { c.Period = time.Second },
		"no source":         func(c *DetectorConfig) { c.Source = PressureSource{} },
	} {
		c := DefaultDetectorConfig()
		mut(&c)
		if err := c.validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestEffectiveLimits(t *testing.T) {
	s := Spec{Guarantee: Amount{CPU: 0.5, Memory: 64 * mi}, Ceiling: Amount{CPU: 2, Memory: 256 * mi}, PidsMax: 10}
	if l := EffectiveLimits(s, Relaxed, Relaxed); l.Ceiling != s.Ceiling || l.Guarantee != s.Guarantee || l.PidsMax != 10 {
		t.Errorf("relaxed %+v", l)
	}
	if l := EffectiveLimits(s, Relaxed, Hardened); l.Ceiling != (Amount{CPU: 2, Memory: 64 * mi}) {
		t.Errorf("memory hardened %+v", l)
	}
	if l := EffectiveLimits(s, Hardened, Relaxed); l.Ceiling != (Amount{CPU: 0.5, Memory: 256 * mi}) {
		t.Errorf("cpu hardened %+v", l)
	}
	// No guarantee, no ceiling: hardened to the floors.
	if l := EffectiveLimits(Spec{}, Hardened, Hardened); l.Ceiling != (Amount{CPU: 0.01, Memory: 4 * mi}) {
		t.Errorf("best effort hardened %+v", l)
	}
}
