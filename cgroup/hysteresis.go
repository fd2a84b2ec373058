package cgroup

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// State is a resource's elastic state on the node.
type State string

const (
	// Relaxed: containers may burst up to their ceilings.
	Relaxed State = "relaxed"
	// Hardened: every container's effective ceiling is its guarantee.
	Hardened State = "hardened"
)

// Threshold is the pair of levels of one signal, as shares in [0, 1]
// (0.1 = 10%). Enter <= 0 disables the signal. Leave must be below Enter:
// the gap is the hysteresis.
type Threshold struct {
	Enter float64 `json:"enter"`
	Leave float64 `json:"leave"`
}

func (t Threshold) enabled() bool { return t.Enter > 0 }

// Policy is the state machine of one resource.
//
// relaxed → hardened when any enabled signal's mean over the last
// EnterWindow is at or above its Enter level. For PSI the mean over a window
// is exactly the share of that window in which some task stalled (it comes
// from the kernel's cumulative "total" counter), so a brief dip does not
// reset it and a brief spike alone reaches it only if severe.
//
// hardened → relaxed when every enabled signal's mean over EnterWindow has
// stayed at or below its Leave level, at every tick, for LeaveWindow. A
// signal that oscillates around one threshold can therefore cross it at most
// once: around Enter it never gets down to Leave, around Leave it never
// stays below it for LeaveWindow.
//
// A signal with no sample in the last EnterWindow (no PSI on this kernel, a
// source that cannot be read) is ignored, so a host without PSI runs on
// usage alone; a shorter read gap keeps that signal from hardening and
// holds the hardened state until its window is whole again.
type Policy struct {
	PSI         Threshold     `json:"psi"`   // PSI "some" share of wall time
	Usage       Threshold     `json:"usage"` // share of allocatable used by the containers
	EnterWindow time.Duration `json:"enter_window"`
	LeaveWindow time.Duration `json:"leave_window"`
}

func (p Policy) validate(r Resource) error {
	for _, s := range []struct {
		name string
		t    Threshold
	}{{"psi", p.PSI}, {"usage", p.Usage}} {
		if !s.t.enabled() {
			continue
		}
		if s.t.Leave < 0 || s.t.Leave >= s.t.Enter || math.IsNaN(s.t.Enter) || math.IsNaN(s.t.Leave) {
			return fmt.Errorf("%s %s threshold enter %v leave %v: leave must be in [0, enter): %w", r, s.name, s.t.Enter, s.t.Leave, ErrInvalid)
		}
	}
	if p.EnterWindow <= 0 || p.LeaveWindow <= 0 {
		return fmt.Errorf("%s windows enter %v leave %v: must be positive: %w", r, p.EnterWindow, p.LeaveWindow, ErrInvalid)
	}
	return nil
}

// sample is one signal value that held over (end−dt, end].
type sample struct {
	end time.Time
	dt  time.Duration
	v   float64
}

// window keeps the recent samples of one signal.
type window struct{ s []sample }

func (w *window) add(s sample, keep time.Duration) {
	w.s = append(w.s, s)
	cut := s.end.Add(-keep)
	i := 0
	for i < len(w.s) && !w.s[i].end.After(cut) {
		i++
	}
	if i > 0 {
		w.s = append(w.s[:0], w.s[i:]...)
	}
}

// mean is the time-weighted mean over (now−d, now] and how much of that
// span the samples cover.
func (w *window) mean(now time.Time, d time.Duration) (float64, time.Duration) {
	start := now.Add(-d)
	var sum float64
	var cov time.Duration
	for _, s := range w.s {
		b, e := s.end.Add(-s.dt), s.end
		if b.Before(start) {
			b = start
		}
		if e.After(now) {
			e = now
		}
		if !e.After(b) {
			continue
		}
		cov += e.Sub(b)
		sum += s.v * e.Sub(b).Seconds()
	}
	if cov <= 0 {
		return 0, 0
	}
	return sum / cov.Seconds(), cov
}

func (w *window) reset() { w.s = w.s[:0] }

// machine is the hysteresis state machine of one resource.
type machine struct {
	r         Resource
	p         Policy
	state     State
	since     time.Time
	psi       window
	usage     window
	coolSince time.Time // zero while some signal is above its Leave level
	last      map[string]float64
}

func newMachine(r Resource, p Policy, now time.Time) *machine {
	return &machine{r: r, p: p, state: Relaxed, since: now}
}

// verdict is the outcome of one observation.
type verdict struct {
	changed  bool
	from, to State
	reason   string
	values   map[string]float64
}

// signalValue is a signal's value over the last tick; ok is false when it
// could not be measured (the window then has a gap and cannot be covered).
type signalValue struct {
	v  float64
	ok bool
}

// set forces the state (at restart, from what the kernel shows) and clears
// the history, so a forced hardened state needs a full LeaveWindow of calm.
func (m *machine) set(s State, now time.Time) {
	m.state, m.since, m.coolSince = s, now, time.Time{}
	m.psi.reset()
	m.usage.reset()
}

func (m *machine) observe(now time.Time, dt time.Duration, psi, usage signalValue) verdict {
	keep := m.p.EnterWindow + dt
	if psi.ok {
		m.psi.add(sample{now, dt, psi.v}, keep)
	}
	if usage.ok {
		m.usage.add(sample{now, dt, usage.v}, keep)
	}
	vals := map[string]float64{}
	type sig struct {
		name string
		t    Threshold
		w    *window
	}
	sigs := []sig{{"psi", m.p.PSI, &m.psi}, {"usage", m.p.Usage, &m.usage}}
	// A signal is covered when its samples span the whole window, absent
	// when none fall in it (no PSI on this kernel, a source that cannot be
	// read): absent signals neither harden nor hold the hardened state, so
	// a host without PSI still runs on usage. A partly covered signal (a
	// read gap) cannot harden and holds the hardened state.
	means := map[string]float64{}
	covered, absent := map[string]bool{}, map[string]bool{}
	for _, s := range sigs {
		if !s.t.enabled() {
			continue
		}
		mean, cov := s.w.mean(now, m.p.EnterWindow)
		means[s.name], covered[s.name], absent[s.name] = mean, cov+time.Millisecond >= m.p.EnterWindow, cov == 0
		if absent[s.name] {
			continue
		}
		vals[s.name] = mean
		vals[s.name+"_enter"], vals[s.name+"_leave"] = s.t.Enter, s.t.Leave
	}
	m.last = vals
	v := verdict{from: m.state, to: m.state, values: vals}
	switch m.state {
	case Relaxed:
		for _, s := range sigs {
			if s.t.enabled() && covered[s.name] && means[s.name] >= s.t.Enter {
				v.changed, v.to = true, Hardened
				v.reason = fmt.Sprintf("%s %s %.1f%% over %v ≥ %.1f%%", m.r, signalLabel(s.name), 100*means[s.name], m.p.EnterWindow, 100*s.t.Enter)
				break
			}
		}
	case Hardened:
		cool, anySignal := true, false
		for _, s := range sigs {
			if !s.t.enabled() || absent[s.name] {
				continue
			}
			anySignal = true
			if !covered[s.name] || means[s.name] > s.t.Leave {
				cool = false
			}
		}
		switch {
		case !cool || !anySignal:
			m.coolSince = time.Time{}
		case m.coolSince.IsZero():
			m.coolSince = now
		}
		if cool && anySignal && now.Sub(m.coolSince) >= m.p.LeaveWindow {
			var parts []string
			for _, s := range sigs {
				if s.t.enabled() && !absent[s.name] {
					parts = append(parts, fmt.Sprintf("%s ≤ %.1f%%", signalLabel(s.name), 100*s.t.Leave))
				}
			}
			v.changed, v.to = true, Relaxed
			v.reason = fmt.Sprintf("%s %s for %v", m.r, strings.Join(parts, " and "), m.p.LeaveWindow)
		}
	}
	if v.changed {
		m.state, m.since, m.coolSince = v.to, now, time.Time{}
	}
	return v
}

func signalLabel(name string) string {
	if name == "psi" {
		return "psi some"
	}
	return "usage of allocatable"
}
