package cgroup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"sort"
	"sync"
	"time"
)

// Container is what the controller tracks of one container.
type Container struct {
	ID   string `json:"id"`
	Path string `json:"path"` // cgroup path, e.g. "/ferry/web"
	Spec Spec   `json:"spec"`
}

// Event is one state transition of a resource. Values holds the signals
// that decided it: "psi" and "usage" (windowed shares, 0..1) with their
// "_enter" and "_leave" levels, "apply_seconds" (time to write every
// container's limits) and "containers" (how many were written); a
// transition found at Rebuild carries "clamped_containers".
type Event struct {
	Time     time.Time          `json:"time"`
	Resource Resource           `json:"resource"`
	From     State              `json:"from"`
	To       State              `json:"to"`
	Reason   string             `json:"reason"`
	Values   map[string]float64 `json:"values"`
}

// ControllerConfig wires a Controller.
type ControllerConfig struct {
	Node     *Node  // admission book: allocatable and guarantees for signals and the report
	Driver   Driver // writes and reads the containers' cgroups
	Parent   string // cgroup parent of all containers ("" for none): v2 memory.min of the parent
	Detector DetectorConfig
	Clock    Clock        // nil: SystemClock()
	Logger   *slog.Logger // nil: discard
	// OnEvent is called for every transition, after the new limits were
	// written, from the goroutine that runs Tick. It must not block.
	OnEvent func(Event)
}

// Controller is the harden/relax loop: it tracks the containers, samples
// pressure and usage every Period, runs the per-resource state machines and,
// on a transition, writes every container's effective ceiling through the
// driver. It is safe for concurrent use; Tick and Run must not run
// concurrently with each other.
type Controller struct {
	cfg   ControllerConfig
	clock Clock
	log   *slog.Logger

	applyMu sync.Mutex // serializes kernel writes (Tick, Add, Update, Rebuild)

	mu         sync.Mutex
	containers map[string]*tracked
	machines   map[Resource]*machine
	prevAt     time.Time
	prevSrc    map[Resource]Pressure
	lastSrc    map[Resource]Pressure
	used       Amount // last usage sums (CPU in cores over the last tick)
	m          Metrics
	lastErr    string
}

// tracked is one container and what the controller last did to it.
type tracked struct {
	c       Container
	gen     uint64 // bumped by Update so a stale apply is not recorded
	target  Limits
	applied Applied
	ok      bool // the last Apply of target succeeded
	tried   time.Time
	prev    *Stats // stats at the previous tick, for deltas
	last    *Stats
}

// Metrics are the controller's counters for the agent's metrics endpoint
// (suggested names: ferry_elastic_transitions_total{resource,to},
// ferry_elastic_state{resource}, ferry_elastic_apply_seconds{resource}, ...).
type Metrics struct {
	Ticks       uint64                          `json:"ticks"`
	ReadErrors  uint64                          `json:"read_errors"`  // failed reads of the source or of a container
	ApplyErrors uint64                          `json:"apply_errors"` // failed writes
	Transitions map[string]uint64               `json:"transitions"`  // "memory:hardened" → count of entries
	States      map[Resource]State              `json:"states"`
	Since       map[Resource]time.Time          `json:"since"`
	LastApply   map[Resource]time.Duration      `json:"last_apply"` // time to write all limits at the last transition
	Pending     int                             `json:"pending"`    // containers whose memory step-down is pending
	Signals     map[Resource]map[string]float64 `json:"signals"`    // last windowed signal values
}

// NewController checks cfg and returns a controller in the relaxed state
// with no containers; call Rebuild at ferryd start, then Run.
func NewController(cfg ControllerConfig) (*Controller, error) {
	if cfg.Node == nil || cfg.Driver == nil {
		return nil, fmt.Errorf("controller: node and driver are required: %w", ErrInvalid)
	}
	if err := cfg.Detector.validate(); err != nil {
		return nil, err
	}
	c := &Controller{cfg: cfg, clock: cfg.Clock, log: cfg.Logger, containers: map[string]*tracked{}}
	if c.clock == nil {
		c.clock = SystemClock()
	}
	if c.log == nil {
		c.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	now := c.clock.Now()
	c.machines = map[Resource]*machine{}
	for _, r := range AllResources {
		c.machines[r] = newMachine(r, cfg.Detector.policy(r), now)
	}
	c.m = Metrics{Transitions: map[string]uint64{}, LastApply: map[Resource]time.Duration{}}
	return c, nil
}

// State is the current state of r.
func (c *Controller) State(r Resource) State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.machines[r].state
}

func (c *Controller) statesLocked() (cpu, mem State) {
	return c.machines[CPU].state, c.machines[Memory].state
}

// EffectiveSpec returns s with its ceiling replaced by the effective ceiling
// in the current states, for creating a container already clamped when the
// node is hardened (pass its Resources() to libcontainer).
func (c *Controller) EffectiveSpec(s Spec) Spec {
	c.mu.Lock()
	cpu, mem := c.statesLocked()
	c.mu.Unlock()
	l := EffectiveLimits(s, cpu, mem)
	s.Ceiling = l.Ceiling
	return s
}

// Effective returns the limits the controller wants for container id and
// what the last Apply left in place.
func (c *Controller) Effective(id string) (Limits, Applied, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.containers[id]
	if !ok {
		return Limits{}, Applied{}, false
	}
	return t.target, t.applied, true
}

// Add starts tracking a running container and writes its limits for the
// current states (so a container started while hardened is clamped at
// once). Adding a known id replaces it (as Update).
func (c *Controller) Add(ctx context.Context, ct Container) error {
	if err := checkContainer(&ct); err != nil {
		return err
	}
	c.applyMu.Lock()
	defer c.applyMu.Unlock()
	c.mu.Lock()
	t := c.containers[ct.ID]
	if t == nil {
		t = &tracked{}
		c.containers[ct.ID] = t
	}
	t.c, t.prev, t.last = ct, nil, nil
	t.gen++
	cpu, mem := c.statesLocked()
	t.target = EffectiveLimits(ct.Spec, cpu, mem)
	plan := []applyItem{{id: ct.ID, gen: t.gen, path: ct.Path, l: t.target}}
	c.mu.Unlock()
	return errors.Join(c.apply(ctx, plan), c.applyParent())
}

// Update changes a tracked container's spec (a resize) and rewrites its limits.
func (c *Controller) Update(ctx context.Context, ct Container) error {
	c.mu.Lock()
	_, ok := c.containers[ct.ID]
	c.mu.Unlock()
	if !ok {
		return fmt.Errorf("update container %q: not tracked: %w", ct.ID, os.ErrNotExist)
	}
	return c.Add(ctx, ct)
}

// Remove stops tracking id (its cgroup is going away) and updates the parent.
func (c *Controller) Remove(id string) error {
	c.applyMu.Lock()
	defer c.applyMu.Unlock()
	c.mu.Lock()
	_, ok := c.containers[id]
	delete(c.containers, id)
	c.mu.Unlock()
	if !ok {
		return nil
	}
	return c.applyParent()
}

func checkContainer(ct *Container) error {
	if ct.ID == "" || ct.Path == "" {
		return fmt.Errorf("container %q path %q: id and cgroup path are required: %w", ct.ID, ct.Path, ErrInvalid)
	}
	if err := ct.Spec.Normalize(); err != nil {
		return fmt.Errorf("container %q: %w", ct.ID, err)
	}
	return nil
}

// Rebuild replaces the tracked set with the containers that exist at ferryd
// start. The states are not kept on disk: they are read back from the
// kernel. A resource starts hardened if some container's limit in place is
// below its relaxed ceiling (ferryd died while hardened); the detector then
// needs a full LeaveWindow of calm before relaxing, rather than letting every
// container burst at once after a restart. Rebuild then writes every
// container's limits for those states (finishing any pending step-down) and
// returns the errors of the containers it could not read or write; the rest
// are tracked and applied regardless.
func (c *Controller) Rebuild(ctx context.Context, cs []Container) error {
	c.applyMu.Lock()
	defer c.applyMu.Unlock()
	var errs []error
	next := map[string]*tracked{}
	clamped := map[Resource][]string{}
	for _, ct := range cs {
		if err := checkContainer(&ct); err != nil {
			errs = append(errs, err)
			continue
		}
		t := &tracked{c: ct, gen: 1}
		next[ct.ID] = t
		st, err := c.cfg.Driver.Stats(ct.Path)
		if err != nil {
			errs = append(errs, fmt.Errorf("rebuild container %q: %w", ct.ID, err))
			continue
		}
		t.last = &st
		if ceil := ct.Spec.Ceiling.Memory; st.MemoryLimit != 0 && (ceil == 0 || st.MemoryLimit < ceil) {
			clamped[Memory] = append(clamped[Memory], ct.ID)
		}
		if ceil := ct.Spec.Ceiling.CPU; st.CPUQuota != 0 && (ceil == 0 || st.CPUQuota < ceil-0.0005) {
			clamped[CPU] = append(clamped[CPU], ct.ID)
		}
	}
	now := c.clock.Now()
	var events []Event
	c.mu.Lock()
	c.containers = next
	c.prevAt, c.prevSrc = time.Time{}, nil
	for _, r := range AllResources {
		m := c.machines[r]
		want := Relaxed
		if len(clamped[r]) > 0 {
			want = Hardened
		}
		if m.state != want {
			events = append(events, Event{Time: now, Resource: r, From: m.state, To: want,
				Reason: fmt.Sprintf("rebuild: %s limits of %d container(s) found below their ceilings (%v)", r, len(clamped[r]), clamped[r]),
				Values: map[string]float64{"clamped_containers": float64(len(clamped[r]))}})
			c.m.Transitions[string(r)+":"+string(want)]++
		}
		m.set(want, now)
	}
	cpu, mem := c.statesLocked()
	var plan []applyItem
	for id, t := range next {
		t.target = EffectiveLimits(t.c.Spec, cpu, mem)
		plan = append(plan, applyItem{id: id, gen: t.gen, path: t.c.Path, l: t.target})
	}
	c.mu.Unlock()
	sort.Slice(plan, func(i, j int) bool { return plan[i].id < plan[j].id })
	errs = append(errs, c.apply(ctx, plan), c.applyParent())
	for _, e := range events {
		c.emit(ctx, e)
	}
	return errors.Join(errs...)
}

// applyItem is one container's write, planned under mu and done outside it.
type applyItem struct {
	id     string
	gen    uint64
	path   string
	l      Limits
	excess int64 // working set above the new memory ceiling: the biggest go first
}

// apply writes the plan through the driver (without mu: a v1 limit write
// reclaims synchronously and may take a while) and records the results.
func (c *Controller) apply(ctx context.Context, plan []applyItem) error {
	var errs []error
	now := c.clock.Now()
	for _, it := range plan {
		a, err := c.cfg.Driver.Apply(it.path, it.l)
		var before Applied
		c.mu.Lock()
		if t := c.containers[it.id]; t != nil && t.gen == it.gen {
			before = t.applied
			t.applied, t.ok, t.tried = a, err == nil, now
		}
		if err != nil {
			c.m.ApplyErrors++
		}
		c.mu.Unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("apply limits of container %q: %w", it.id, err))
			c.log.WarnContext(ctx, "cannot apply elastic limits", "container", it.id, "cgroup", it.path, "err", err)
		}
		switch {
		case a.MemoryPending && (!before.MemoryPending || before.MemoryLimit != a.MemoryLimit):
			c.log.InfoContext(ctx, "memory step-down pending: the kernel cannot reclaim down to the ceiling yet; limit held above usage",
				"container", it.id, "ceiling", it.l.Ceiling.Memory, "held_at", a.MemoryLimit)
		case before.MemoryPending && !a.MemoryPending && err == nil:
			c.log.InfoContext(ctx, "memory step-down complete", "container", it.id, "limit", a.MemoryLimit)
		}
	}
	return errors.Join(errs...)
}

// applyParent writes what the parent needs (v2: memory.min = sum of guarantees).
func (c *Controller) applyParent() error {
	if c.cfg.Parent == "" {
		return nil
	}
	c.mu.Lock()
	var sum Amount
	for _, t := range c.containers {
		sum.CPU += t.c.Spec.Guarantee.CPU
		sum.Memory += t.c.Spec.Guarantee.Memory
	}
	c.mu.Unlock()
	if err := c.cfg.Driver.ApplyParent(c.cfg.Parent, sum); err != nil {
		return fmt.Errorf("apply parent cgroup %s: %w", c.cfg.Parent, err)
	}
	return nil
}

// Run calls Tick every Detector.Period until ctx ends. Read errors are
// logged (once per distinct message) and do not stop the loop.
func (c *Controller) Run(ctx context.Context) error {
	t := c.clock.NewTicker(c.cfg.Detector.Period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
			if err := c.Tick(ctx); err != nil {
				c.mu.Lock()
				repeat := err.Error() == c.lastErr
				c.lastErr = err.Error()
				c.mu.Unlock()
				if !repeat {
					c.log.WarnContext(ctx, "elastic tick", "err", err)
				}
			}
		}
	}
}

// containerRead is one container's reading in a tick.
type containerRead struct {
	id   string
	gen  uint64
	path string
	st   Stats
	err  error
}

// Tick samples once, runs the state machines and, on a transition, writes
// every container's new effective limits; it also retries pending memory
// step-downs. It returns the read and write errors of this tick.
func (c *Controller) Tick(ctx context.Context) error {
	c.applyMu.Lock()
	defer c.applyMu.Unlock()
	now := c.clock.Now()

	c.mu.Lock()
	reads := make([]containerRead, 0, len(c.containers))
	for id, t := range c.containers {
		reads = append(reads, containerRead{id: id, gen: t.gen, path: t.c.Path})
	}
	c.mu.Unlock()

	var errs []error
	src := map[Resource]Pressure{}
	for _, r := range AllResources {
		p, err := c.cfg.Detector.Source.Read(r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		src[r] = p
	}
	for i := range reads {
		reads[i].st, reads[i].err = c.cfg.Driver.Stats(reads[i].path)
		if reads[i].err != nil {
			errs = append(errs, fmt.Errorf("read container %q: %w", reads[i].id, reads[i].err))
		}
	}

	c.mu.Lock()
	c.m.ReadErrors += uint64(len(errs))
	verdicts := c.observeLocked(now, src, reads)
	var events []Event
	changed := false
	for _, r := range AllResources {
		v := verdicts[r]
		if !v.changed {
			continue
		}
		changed = true
		c.m.Transitions[string(r)+":"+string(v.to)]++
		events = append(events, Event{Time: now, Resource: r, From: v.from, To: v.to, Reason: v.reason, Values: copyMap(v.values)})
	}
	plan := c.planLocked(now, changed)
	c.mu.Unlock()

	start := time.Now()
	errs = append(errs, c.apply(ctx, plan))
	took := time.Since(start)
	for _, e := range events {
		c.mu.Lock()
		c.m.LastApply[e.Resource] = took
		c.mu.Unlock()
		e.Values["apply_seconds"] = took.Seconds()
		e.Values["containers"] = float64(len(plan))
		c.emit(ctx, e)
	}
	c.mu.Lock()
	c.m.Ticks++ // completed ticks: a waiter sees the limits written
	c.mu.Unlock()
	return errors.Join(errs...)
}

// emit logs a transition and hands it to OnEvent.
func (c *Controller) emit(ctx context.Context, e Event) {
	args := []any{"resource", e.Resource, "from", e.From, "to", e.To, "reason", e.Reason}
	keys := make([]string, 0, len(e.Values))
	for k := range e.Values {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, k, e.Values[k])
	}
	c.log.InfoContext(ctx, "elastic state transition", args...)
	if c.cfg.OnEvent != nil {
		c.cfg.OnEvent(e)
	}
}

// observeLocked turns this tick's readings into signals and feeds the
// state machines.
func (c *Controller) observeLocked(now time.Time, src map[Resource]Pressure, reads []containerRead) map[Resource]verdict {
	alloc := c.cfg.Node.Allocatable()
	first := c.prevAt.IsZero()
	dt := now.Sub(c.prevAt)
	var memUsed int64
	var cpuUsed time.Duration // new containers count from their second tick
	discount := map[Resource]time.Duration{}
	for _, rd := range reads {
		t := c.containers[rd.id]
		if t == nil || t.gen != rd.gen {
			continue
		}
		if rd.err != nil {
			t.prev, t.last = nil, nil
			continue
		}
		st := rd.st
		t.prev, t.last = t.last, &st
		memUsed += st.MemoryWorkingSet
		if t.prev == nil {
			continue
		}
		cpuUsed += st.CPUUsage - t.prev.CPUUsage
		if c.cfg.Detector.CountSelfLimited || !c.cfg.Detector.Source.covers(t.c.Path) {
			continue
		}
		if st.MemoryLimitHits > t.prev.MemoryLimitHits && st.MemoryPressure.Present && t.prev.MemoryPressure.Present {
			discount[Memory] += st.MemoryPressure.Some.Total - t.prev.MemoryPressure.Some.Total
		}
		if st.ThrottledPeriods > t.prev.ThrottledPeriods && st.CPUPressure.Present && t.prev.CPUPressure.Present {
			discount[CPU] += st.CPUPressure.Some.Total - t.prev.CPUPressure.Some.Total
		}
	}
	c.lastSrc = src
	prevSrc := c.prevSrc
	c.prevAt, c.prevSrc = now, src
	if first || dt <= 0 {
		c.used = Amount{Memory: memUsed}
		return nil
	}
	c.used = Amount{CPU: cpuUsed.Seconds() / dt.Seconds(), Memory: memUsed}
	out := map[Resource]verdict{}
	for _, r := range AllResources {
		var psi, usage signalValue
		cur, okNow := src[r]
		old, okOld := prevSrc[r]
		if okNow && okOld {
			raw := (cur.Some.Total - old.Some.Total).Seconds() / dt.Seconds()
			psi = signalValue{v: clamp01(raw - discount[r].Seconds()/dt.Seconds()), ok: true}
		}
		switch r {
		case Memory:
			if alloc.Memory > 0 {
				usage = signalValue{v: float64(memUsed) / float64(alloc.Memory), ok: true}
			}
		case CPU:
			if alloc.CPU > 0 {
				usage = signalValue{v: c.used.CPU / alloc.CPU, ok: true}
			}
		}
		out[r] = c.machines[r].observe(now, dt, psi, usage)
	}
	return out
}

func clamp01(v float64) float64 { return math.Min(math.Max(v, 0), 1) }

// planLocked lists the writes of this tick: every container when a state
// changed, else the pending step-downs and failed writes due for a retry.
func (c *Controller) planLocked(now time.Time, changed bool) []applyItem {
	cpu, mem := c.statesLocked()
	var plan []applyItem
	pending := 0
	for id, t := range c.containers {
		want := EffectiveLimits(t.c.Spec, cpu, mem)
		due := now.Sub(t.tried) >= c.cfg.Detector.RetryInterval
		if t.applied.MemoryPending {
			pending++
		}
		switch {
		case changed || want != t.target:
			t.target = want
		case (t.applied.MemoryPending || !t.ok) && due:
		default:
			continue
		}
		it := applyItem{id: id, gen: t.gen, path: t.c.Path, l: want}
		if t.last != nil && want.Ceiling.Memory > 0 {
			it.excess = t.last.MemoryWorkingSet - want.Ceiling.Memory
		}
		plan = append(plan, it)
	}
	c.m.Pending = pending
	// Biggest offenders first: their reclaim frees the most, soonest.
	sort.Slice(plan, func(i, j int) bool {
		if plan[i].excess != plan[j].excess {
			return plan[i].excess > plan[j].excess
		}
		return plan[i].id < plan[j].id
	})
	return plan
}

// Metrics returns a snapshot of the counters.
func (c *Controller) Metrics() Metrics {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.m
	m.Transitions = copyMap(c.m.Transitions)
	m.LastApply = copyMap(c.m.LastApply)
	m.States, m.Since, m.Signals = map[Resource]State{}, map[Resource]time.Time{}, map[Resource]map[string]float64{}
	for r, mc := range c.machines {
		m.States[r], m.Since[r], m.Signals[r] = mc.state, mc.since, copyMap(mc.last)
	}
	return m
}

func copyMap[K comparable, V any](in map[K]V) map[K]V {
	out := make(map[K]V, len(in))
	for k, v := range in {
		out[k] = v
	}
	return out
}
