package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/runc/libcontainer"
	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/internal/atomicfile"
	"github.com/ferry-agent/ferry/internal/criuview"
	"github.com/ferry-agent/ferry/internal/proc"
	"github.com/ferry-agent/ferry/netsetup"
	"github.com/ferry-agent/ferry/sysctlguard"
)

// Config is the agent's configuration, from ferryd's flags and config file.
type Config struct {
	Root          string // state: one directory per container
	RunDir        string // runtime state: libcontainer's root
	NodeName      string
	CgroupParent  string // absolute cgroup path under which containers are made
	DefaultRootfs string
	CriuPath      string
	LogMax        int64 // per-container log cap in bytes
	Version       string
	Self          string // the ferryd binary, re-executed as the monitor
	// SysctlAllow narrows the sysctls containers may write (patterns like
	// net.ipv4.*); nil keeps every namespaced one. It can never widen.
	SysctlAllow []string
	// BPFRoot is where the sysctl guards are pinned; its parent must be (or
	// is made) a bpffs mount.
	BPFRoot string
	// Capacity is the node's CPU and memory; zero fields are detected.
	Capacity cgroup.Amount
	// Reserved is held back for the system and ferryd; nil: the default
	// (cgroup.DefaultReservation).
	Reserved *cgroup.Amount
	// Detector configures the harden/relax loop; a zero Period means the
	// defaults (cgroup.DefaultDetectorConfig) with PressureSource.
	Detector cgroup.DetectorConfig
	// PressureSource is "host" (/proc/pressure) or "parent" (the PSI of the
	// cgroup parent's unified twin, i.e. of the containers only).
	PressureSource string
	// Network is the host bridge and address plan; an empty Bridge turns
	// networking off (containers get a network namespace with lo only).
	Network netsetup.Config
	// TLSDir holds this node's certificate, used to reach peers.
	TLSDir string
	// RemoteRootfs lists the directories under which a rootfs or bundle
	// named by a controller or a peer (over the TLS listener) must lie;
	// the default rootfs's directory is always allowed. The local socket
	// (root on this host) is not restricted.
	RemoteRootfs []string
	// StopCopyStreamMin is the memory in use from which a stop-and-copy
	// sends the pages to the peer's page server while CRIU dumps them;
	// a smaller container is dumped to disk and its images sent after.
	// Streaming overlaps dumping and sending, but CRIU's last exchange
	// with the page server waits for all that is in flight: measured
	// here, 64 MiB froze ~100 ms longer streamed, 1 GiB ~1.5 s shorter,
	// crossing near 300 MiB (ferryd's default: 256 MiB). Zero streams
	// always.
	StopCopyStreamMin int64
}

// record is ferryd's part of a container's on-disk state: the request and
// the operator's intent.
type record struct {
	Spec   Spec   `json:"spec"`
	Cgroup string `json:"cgroup"`
	IP     string `json:"ip,omitempty"`
	MAC    string `json:"mac,omitempty"`
	Netns  string `json:"netns,omitempty"`
	// Incoming names the migration bringing this container in (until restored).
	Incoming string `json:"incoming,omitempty"`
	// MigratedTo names the node the container moved to; its copy here is
	// being deleted.
	MigratedTo    string    `json:"migrated_to,omitempty"`
	CreatedAt     time.Time `json:"created_at"`
	StopRequested bool      `json:"stop_requested,omitempty"`
}

// monitorPid records the monitor process from the moment it is started, so a
// ferryd that dies during a create can find and stop it on its next start.
type monitorPid struct {
	Pid   int    `json:"pid"`
	Start uint64 `json:"start"`
}

const monitorPidFile = "monitor.pid.json"

// container is the agent's view of one container. Fields are guarded by
// Agent.mu; lifecycle operations are serialized by op.
type container struct {
	op       sync.Mutex
	name     string
	dir      string
	rec      record
	creating bool
	init     *initInfo
	exit     *exitInfo
	reason   string
	exited   chan struct{} // closed once the exit is known; nil when never started
	guard    *sysctlguard.Guard
}

// State names.
const (
	StateCreated = "created"
	StateRunning = "running"
	StateStopped = "stopped"
	StateExited  = "exited"
)

func (c *container) state() string {
	switch {
	case c.exit != nil && c.rec.StopRequested:
		return StateStopped
	case c.exit != nil:
		return StateExited
	case c.init != nil && !c.creating:
		return StateRunning
	}
	return StateCreated
}

// Agent runs and tracks containers.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	lcRoot string
	crDir  string

	mu   sync.Mutex
	ctrs map[string]*container

	criuVersion string
	criuView    *criuview.View // CRIU's /run where the host's is not a tmpfs
	checks      criuChecks
	rootfs      rootfsDigests
	watchers    sync.WaitGroup
	done        chan struct{}
	events      *eventBus

	policy *sysctlguard.Policy
	guards *sysctlguard.Manager

	net *netsetup.Manager // nil: networking off

	migrations  map[string]*api.Migration    // as the source; guarded by mu
	interrupted []*api.Migration             // running when ferryd last died; settled at Load
	incoming    map[string]*incoming         // as the destination; guarded by mu
	running     map[string]*runningMigration // as the source, until each ends; guarded by mu

	node     *cgroup.Node
	elastic  *cgroup.Controller
	refusals map[cgroup.Resource]uint64 // admission refusals, guarded by mu
	stopLoop context.CancelFunc
	loopDone chan struct{}
}

// containerNamespaces are the namespaces every ferry container has of its own.
var containerNamespaces = sysctlguard.Namespaces{IPC: true, UTS: true, Net: true}

// New prepares the agent's directories. Call Load before serving.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	if cfg.LogMax <= 0 {
		cfg.LogMax = 10 << 20
	}
	if !strings.HasPrefix(cfg.CgroupParent, "/") {
		return nil, fmt.Errorf("cgroup-parent %q: must be an absolute cgroup path: %w", cfg.CgroupParent, ErrInvalidArgument)
	}
	if cfg.Self == "" {
		self, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("find own binary: %w", err)
		}
		cfg.Self = self
	}
	a := &Agent{
		cfg: cfg, log: log,
		lcRoot:     filepath.Join(cfg.RunDir, "libcontainer"),
		crDir:      filepath.Join(cfg.Root, "containers"),
		ctrs:       map[string]*container{},
		done:       make(chan struct{}),
		events:     newEventBus(1024),
		migrations: map[string]*api.Migration{},
		incoming:   map[string]*incoming{},
		running:    map[string]*runningMigration{},
	}
	for _, d := range []string{a.crDir, a.lcRoot, filepath.Join(cfg.Root, "migrations")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("state dir: %w", err)
		}
	}
	a.criuVersion = criuVersion(cfg.CriuPath)
	if why := criuview.Problem(); why != "" {
		v, err := criuview.Setup(filepath.Join(cfg.Root, "criu-run"), cfg.RunDir)
		if err != nil {
			log.Warn("CRIU probes the kernel anew on every call (~25 ms each, several inside a migration's freeze)", "reason", why, "err", err)
		} else {
			a.criuView = v
			log.Info("CRIU keeps its kernel probes on a tmpfs of ferryd's, its /run", "reason", why, "tmpfs", v.Tmpfs())
			// The first CRIU call probes and keeps the results: now, rather
			// than in a migration's freeze.
			go a.checks.run(a.criuView, a.cfg.CriuPath)
		}
	}
	policy, err := sysctlguard.NewPolicy(cfg.SysctlAllow)
	if err != nil {
		return nil, fmt.Errorf("sysctl-allow: %w", err)
	}
	a.policy = policy
	if cfg.BPFRoot == "" {
		cfg.BPFRoot = sysctlguard.DefaultPinRoot
		a.cfg.BPFRoot = cfg.BPFRoot
	}
	fsDir := filepath.Dir(cfg.BPFRoot)
	if err := os.MkdirAll(fsDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("bpf-root %s: %w", cfg.BPFRoot, err)
	}
	if mounted, err := sysctlguard.EnsureBPFFS(fsDir); err != nil {
		return nil, fmt.Errorf("bpf-root %s: %w", cfg.BPFRoot, err)
	} else if mounted {
		log.Info("mounted bpffs for the sysctl guards", "dir", fsDir)
	}
	if a.guards, err = sysctlguard.NewManager(cfg.BPFRoot); err != nil {
		return nil, fmt.Errorf("bpf-root %s: %w", cfg.BPFRoot, err)
	}
	if err := a.newElastic(); err != nil {
		return nil, err
	}
	if cfg.Network.Bridge != "" {
		ncfg := cfg.Network
		ncfg.RunDir, ncfg.StateDir = cfg.RunDir, cfg.Root
		if a.net, err = netsetup.New(ncfg, log); err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
		nc := a.net.Config()
		log.Info("network", "bridge", nc.Bridge, "subnet", nc.Subnet, "ip_range", nc.IPRange, "gateway", nc.Gateway)
	}
	return a, nil
}

// newElastic sets up admission and the harden/relax controller.
func (a *Agent) newElastic() error {
	cfg := a.cfg
	capacity := cfg.Capacity
	if capacity.CPU == 0 || capacity.Memory == 0 {
		detected, err := cgroup.DetectCapacity("", "")
		if err != nil {
			return fmt.Errorf("node capacity: %w", err)
		}
		if capacity.CPU == 0 {
			capacity.CPU = detected.CPU
		}
		if capacity.Memory == 0 {
			capacity.Memory = detected.Memory
		}
	}
	reserved := cgroup.DefaultReservation(capacity)
	if cfg.Reserved != nil {
		reserved = *cfg.Reserved
	}
	node, err := cgroup.NewNode(capacity, reserved)
	if err != nil {
		return fmt.Errorf("node resources: %w", err)
	}
	driver, err := cgroup.NewDriver("")
	if err != nil {
		return fmt.Errorf("cgroup driver: %w", err)
	}
	det := cfg.Detector
	if det.Period == 0 {
		det = cgroup.DefaultDetectorConfig()
	}
	if det.Source.Dir == "" {
		det.Source = cgroup.HostPressure("")
	}
	switch cfg.PressureSource {
	case "", "host":
	case "parent":
		dir, err := sysctlguard.CgroupDir(cfg.CgroupParent)
		if err != nil {
			return fmt.Errorf("pressure-source parent: %w", err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("pressure-source parent: %w", err)
		}
		det.Source = cgroup.CgroupPressure(dir, cfg.CgroupParent)
	default:
		return fmt.Errorf("pressure-source %q: want host or parent: %w", cfg.PressureSource, ErrInvalidArgument)
	}
	ctl, err := cgroup.NewController(cgroup.ControllerConfig{
		Node: node, Driver: driver, Parent: cfg.CgroupParent, Detector: det, Logger: a.log,
		OnEvent: func(e cgroup.Event) {
			attrs := map[string]string{"resource": string(e.Resource), "from": string(e.From), "to": string(e.To)}
			for k, v := range e.Values {
				attrs[k] = strconv.FormatFloat(v, 'g', 4, 64)
			}
			a.events.Publish(Event{Type: "node." + string(e.To), Time: e.Time.UTC(),
				Message: fmt.Sprintf("%s %s: %s", e.Resource, e.To, e.Reason), Attrs: attrs})
		},
	})
	if err != nil {
		return fmt.Errorf("elastic controller: %w", err)
	}
	a.node, a.elastic, a.refusals = node, ctl, map[cgroup.Resource]uint64{}
	a.log.Info("node resources", "capacity_cpu", capacity.CPU, "capacity_memory", cgroup.FormatSize(capacity.Memory),
		"reserved_cpu", reserved.CPU, "reserved_memory", cgroup.FormatSize(reserved.Memory), "driver", driver.Version(),
		"pressure", det.Source.Dir)
	return nil
}

func (a *Agent) elasticContainer(c *container) cgroup.Container {
	return cgroup.Container{ID: c.name, Path: c.rec.Cgroup, Spec: c.rec.Spec.Resources}
}

// startElastic books the running containers' guarantees, re-applies their
// effective limits and starts the harden/relax loop.
func (a *Agent) startElastic(ctx context.Context) error {
	booked := map[string]cgroup.Amount{}
	var running []cgroup.Container
	for _, c := range a.ctrs {
		if c.state() == StateRunning {
			booked[c.name] = c.rec.Spec.Resources.Guarantee
			running = append(running, a.elasticContainer(c))
		}
	}
	if err := a.node.Restore(booked); err != nil {
		// Running containers are never refused; say loudly that the node is oversold.
		a.log.Error("node oversold by the containers found at start", "err", err)
	}
	if err := a.elastic.Rebuild(ctx, running); err != nil {
		a.log.Error("rebuild elastic limits", "err", err)
	}
	loopCtx, cancel := context.WithCancel(context.Background())
	a.stopLoop, a.loopDone = cancel, make(chan struct{})
	go func() {
		defer close(a.loopDone)
		if err := a.elastic.Run(loopCtx); err != nil && !errors.Is(err, context.Canceled) {
			a.log.Error("elastic loop stopped", "err", err)
		}
	}()
	return nil
}

// guardContainer attaches (or re-finds) c's sysctl guard and follows its
// denied writes. The cgroup directory in the unified hierarchy is created if
// needed, so the guard is in place before the container's first instruction.
func (a *Agent) guardContainer(ctx context.Context, c *container) error {
	dir, err := sysctlguard.CgroupDir(c.rec.Cgroup)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("sysctl guard: %w", err)
	}
	g, err := a.guards.Attach(ctx, dir, c.name, a.policy.For(containerNamespaces))
	if err != nil {
		return fmt.Errorf("sysctl guard: %w", err)
	}
	a.mu.Lock()
	c.guard = g
	a.mu.Unlock()
	a.watchGuard(c, g)
	return nil
}

// watchGuard publishes c's denied sysctl writes as events until the guard is
// detached or the agent closes.
func (a *Agent) watchGuard(c *container, g *sysctlguard.Guard) {
	ctx, cancel := context.WithCancel(context.Background())
	a.watchers.Add(1)
	go func() {
		defer a.watchers.Done()
		select {
		case <-a.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	go func() {
		defer cancel()
		err := g.Watch(ctx, func(e sysctlguard.Event) {
			a.log.Warn("sysctl write denied", "container", c.name, "key", e.Key)
			a.events.Publish(Event{Type: EventSysctlDenied, Container: c.name, Time: e.Time.UTC(),
				Message: "write to " + e.Key + " denied", Attrs: map[string]string{"key": e.Key}})
		})
		if err != nil {
			a.log.Warn("sysctl guard events", "container", c.name, "err", err)
		}
	}()
}

func criuVersion(path string) string {
	if path == "" {
		path = "criu"
	}
	out, err := exec.Command(path, "--version").Output()
	if err != nil {
		return "unavailable (" + err.Error() + ")"
	}
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "Version:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return strings.TrimSpace(string(out))
}

// Close stops the agent's watchers and loops. Containers keep running.
func (a *Agent) Close() {
	close(a.done)
	if a.stopLoop != nil {
		a.stopLoop()
		<-a.loopDone
	}
	a.watchers.Wait()
	if a.net != nil {
		a.net.Close()
	}
	if err := a.criuView.Close(); err != nil {
		a.log.Warn("unmount CRIU's /run", "err", err)
	}
}

// Load reloads every container from disk and reattaches to those running.
// Half-created containers (ferryd died before the init ran) are removed.
func (a *Agent) Load(ctx context.Context) error {
	a.loadMigrations()
	// No migration's work survives a restart: a source settles with its
	// peer without its images, a destination removes what it was receiving.
	if err := os.RemoveAll(a.workRoot()); err != nil {
		a.log.Warn("remove the work of migrations before this start", "err", err)
	}
	ents, err := os.ReadDir(a.crDir)
	if err != nil {
		return fmt.Errorf("load containers: %w", err)
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(a.crDir, e.Name())
		c, err := a.loadOne(dir)
		if err != nil {
			a.log.Warn("removing half-created container", "container", e.Name(), "reason", err)
			if terr := a.teardown(e.Name(), dir); terr != nil {
				a.log.Error("remove half-created container", "container", e.Name(), "err", terr)
			}
			continue
		}
		a.ctrs[c.name] = c
		a.log.Info("reloaded container", "container", c.name, "state", c.state(), "pid", pidOf(c))
		a.events.Publish(Event{Type: EventContainerReload, Container: c.name, Message: "reloaded from disk: " + c.state(),
			Attrs: map[string]string{"state": c.state(), "pid": strconv.Itoa(pidOf(c))}})
	}
	a.reconcileGuards(ctx)
	if a.net != nil {
		live := make([]string, 0, len(a.ctrs))
		for name := range a.ctrs {
			live = append(live, name)
		}
		orphans, err := a.net.Reconcile(ctx, live)
		if err != nil {
			a.log.Error("reconcile network", "err", err)
		}
		for _, o := range orphans {
			a.log.Warn("removed orphaned network resource", "kind", o.Kind, "name", o.Name, "container", o.ID)
		}
	}
	if err := a.startElastic(ctx); err != nil {
		return err
	}
	a.recoverMigrations()
	// libcontainer state with no ferry container is a leftover of a crash.
	lcs, _ := os.ReadDir(a.lcRoot)
	for _, e := range lcs {
		if _, ok := a.ctrs[e.Name()]; !ok && ValidateName(e.Name()) == nil {
			a.log.Warn("removing orphaned libcontainer state", "container", e.Name())
			if err := a.destroyLibcontainer(e.Name()); err != nil {
				a.log.Error("remove orphaned libcontainer state", "container", e.Name(), "err", err)
			}
		}
	}
	return nil
}

// reconcileGuards removes sysctl guards of containers that no longer exist
// and makes sure every running container has exactly one.
func (a *Agent) reconcileGuards(ctx context.Context) {
	live := map[string]string{}
	for name, c := range a.ctrs {
		if dir, err := sysctlguard.CgroupDir(c.rec.Cgroup); err == nil {
			live[name] = dir
		}
	}
	_, removed, err := a.guards.Reconcile(ctx, live)
	if err != nil {
		a.log.Error("reconcile sysctl guards", "err", err)
	}
	for _, id := range removed {
		a.log.Warn("removed the sysctl guard of a container that no longer exists", "container", id)
	}
	for _, c := range a.ctrs {
		if c.state() == StateRunning {
			if err := a.guardContainer(ctx, c); err != nil {
				a.log.Error("sysctl guard not restored", "container", c.name, "err", err)
			}
		} else if g, err := a.guards.Open(c.name); err == nil {
			c.guard = g // for its counters
		}
	}
}

func pidOf(c *container) int {
	if c.init != nil && c.exit == nil {
		return c.init.Pid
	}
	return 0
}

func (a *Agent) loadOne(dir string) (*container, error) {
	var rec record
	if err := atomicfile.ReadJSON(filepath.Join(dir, specFile), &rec); err != nil {
		return nil, fmt.Errorf("no readable %s: %w", specFile, err)
	}
	if rec.Spec.Name != filepath.Base(dir) {
		return nil, fmt.Errorf("%s names %q", specFile, rec.Spec.Name)
	}
	if rec.MigratedTo != "" {
		return nil, fmt.Errorf("migrated to %s; finishing the removal of this copy", rec.MigratedTo)
	}
	if rec.Incoming != "" {
		return nil, fmt.Errorf("incoming migration %s never restored", rec.Incoming)
	}
	c := &container{name: rec.Spec.Name, dir: dir, rec: rec}
	var ii initInfo
	if err := atomicfile.ReadJSON(filepath.Join(dir, initFile), &ii); err != nil {
		return nil, fmt.Errorf("init never recorded: %w", err)
	}
	c.init = &ii
	var ei exitInfo
	if err := atomicfile.ReadJSON(filepath.Join(dir, exitFile), &ei); err == nil {
		c.exit = &ei
		return c, nil
	}
	c.exited = make(chan struct{})
	a.watchers.Add(1)
	go a.watchReattached(c)
	return c, nil
}

// watchReattached follows a container whose monitor is not ferryd's child:
// it polls the monitor (or, with the monitor gone, the init) by pid and
// start time.
func (a *Agent) watchReattached(c *container) {
	defer a.watchers.Done()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		monitorAlive := proc.Alive(c.init.MonitorPid, c.init.MonitorStart)
		initAlive := proc.Alive(c.init.Pid, c.init.PidStart)
		if !monitorAlive && !initAlive {
			a.finishExit(c)
			return
		}
		select {
		case <-a.done:
			return
		case <-t.C:
		}
	}
}

// finishExit records the exit of c once its monitor is gone.
func (a *Agent) finishExit(c *container) {
	var ei exitInfo
	err := atomicfile.ReadJSON(filepath.Join(c.dir, exitFile), &ei)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err == nil {
		c.exit = &ei
	} else {
		c.exit = &exitInfo{ExitCode: -1, FinishedAt: time.Now().UTC()}
		c.reason = "exit status unknown: the container's monitor ended without recording it"
	}
	a.log.Info("container ended", "container", c.name, "exit_code", c.exit.ExitCode, "state", c.state())
	// An ended container holds no guarantee and needs no limits.
	if err := a.elastic.Remove(c.name); err != nil {
		a.log.Debug("elastic remove", "container", c.name, "err", err)
	}
	a.node.Release(c.name)
	a.events.Publish(Event{Type: EventContainerExited, Container: c.name,
		Message: fmt.Sprintf("%s with exit code %d", c.state(), c.exit.ExitCode),
		Attrs:   map[string]string{"exit_code": strconv.Itoa(c.exit.ExitCode), "state": c.state()}})
	if c.exited != nil {
		select {
		case <-c.exited:
		default:
			close(c.exited)
		}
	}
}

func (a *Agent) get(name string) (*container, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.ctrs[name]
	if !ok {
		return nil, fmt.Errorf("container %q: %w", name, ErrNotFound)
	}
	return c, nil
}

// Run validates spec, creates the container and starts its init. On any
// failure every step already taken is undone.
func (a *Agent) Run(ctx context.Context, spec Spec) (_ *container, retErr error) {
	if err := NormalizeSpec(&spec, a.cfg.DefaultRootfs, a.policy); err != nil {
		return nil, err
	}
	log := a.log.With("container", spec.Name)
	c := &container{name: spec.Name, dir: filepath.Join(a.crDir, spec.Name), creating: true}
	a.mu.Lock()
	if _, ok := a.ctrs[spec.Name]; ok {
		a.mu.Unlock()
		return nil, fmt.Errorf("container %q: %w", spec.Name, ErrAlreadyExists)
	}
	a.ctrs[spec.Name] = c
	a.mu.Unlock()
	c.op.Lock()
	defer c.op.Unlock()
	defer func() {
		if retErr != nil {
			a.mu.Lock()
			delete(a.ctrs, spec.Name)
			a.mu.Unlock()
		}
	}()

	if err := a.node.Admit(spec.Name, spec.Resources.Guarantee); err != nil {
		var ex *cgroup.ExhaustedError
		if errors.As(err, &ex) {
			a.mu.Lock()
			for _, sh := range ex.Shortages {
				a.refusals[sh.Resource]++
			}
			a.mu.Unlock()
		}
		log.Warn("admission refused", "err", err)
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	defer func() {
		if retErr != nil {
			_ = a.elastic.Remove(spec.Name)
			a.node.Release(spec.Name)
		}
	}()

	if err := os.Mkdir(c.dir, 0o700); err != nil {
		return nil, fmt.Errorf("container %q: state dir: %w", spec.Name, err)
	}
	defer func() {
		if retErr != nil {
			if err := a.teardown(spec.Name, c.dir); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("undo: %w", err))
			}
		}
	}()
	c.rec = record{Spec: spec, Cgroup: filepath.Join(a.cfg.CgroupParent, spec.Name), CreatedAt: time.Now().UTC()}
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, specFile), c.rec, 0o600); err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	merged, err := mountOverlay(spec.Rootfs, c.dir)
	if err != nil {
		return nil, fmt.Errorf("container %q: rootfs: %w", spec.Name, err)
	}
	netnsPath := ""
	if a.net != nil {
		var pin netip.Addr
		if spec.IP != "" {
			pin = netip.MustParseAddr(spec.IP) // validated by NormalizeSpec
		}
		ep, err := a.net.Setup(ctx, spec.Name, netsetup.SetupOptions{IP: pin, Ports: spec.Ports})
		if err != nil {
			return nil, fmt.Errorf("container %q: network: %w", spec.Name, err)
		}
		netnsPath = ep.NetnsPath
		c.rec.IP, c.rec.MAC, c.rec.Netns = ep.IP.Addr().String(), ep.MAC.String(), ep.NetnsPath
		if err := atomicfile.WriteJSON(filepath.Join(c.dir, specFile), c.rec, 0o600); err != nil {
			return nil, fmt.Errorf("container %q: %w", spec.Name, err)
		}
	} else if spec.IP != "" || len(spec.Ports) > 0 {
		return nil, fmt.Errorf("container %q: ip %q, publish %v: networking is off on this node (no --bridge): %w", spec.Name, spec.IP, spec.Publish, ErrFailedPrecondition)
	}
	oci := OCISpec(&spec, merged, c.rec.Cgroup, netnsPath)
	withCriuConf(oci, c.dir)
	if err := writeCriuConf(c.dir, criuCall{}); err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	cfg, err := LibcontainerConfig(oci, a.elastic.EffectiveSpec(spec.Resources))
	if err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, "config.json"), oci, 0o600); err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, lcConfigFile), cfg, 0o600); err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	if err := a.guardContainer(ctx, c); err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	ii, cmd, _, err := a.startMonitor(ctx, c.dir, restoreSource{})
	if err != nil {
		if strings.Contains(err.Error(), "executable file not found") || strings.Contains(err.Error(), "no such file or directory") {
			return nil, fmt.Errorf("container %q: args[0] %q: cannot be executed in the rootfs: %w", spec.Name, spec.Args[0], errors.Join(err, ErrInvalidArgument))
		}
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	a.mu.Lock()
	c.init, c.creating, c.exited = ii, false, make(chan struct{})
	a.mu.Unlock()
	if err := a.elastic.Add(ctx, a.elasticContainer(c)); err != nil {
		// The container runs with the limits it was created with; the loop retries.
		log.Error("elastic limits", "err", err)
	}
	// The monitor is our child until ferryd restarts: reap it and learn the
	// exit at once. Close does not wait for this goroutine; a ferryd that
	// exits leaves the monitor to its new parent.
	go func() {
		_ = cmd.Wait()
		a.finishExit(c)
	}()
	if a.net != nil {
		// Tell the segment where this address lives now (it may have lived
		// on another node a moment ago): gratuitous ARP, off the hot path.
		go func() { //nolint:gosec // G118: not the request's context: the announcement outlives the reply
			if err := a.net.Announce(context.Background(), c.name); err != nil {
				a.log.Warn("announce address", "container", c.name, "err", err)
			}
		}()
	}
	log.Info("container running", "pid", ii.Pid, "cgroup", c.rec.Cgroup, "ip", c.rec.IP)
	a.events.Publish(Event{Type: EventContainerStarted, Container: c.name, Message: "running",
		Attrs: map[string]string{"pid": strconv.Itoa(ii.Pid), "cgroup": c.rec.Cgroup}})
	return c, nil
}

// startMonitor starts the container's monitor and waits for its report.
// In a post-copy restore, the returned channel later yields how the page
// transfer ended.
func (a *Agent) startMonitor(ctx context.Context, dir string, restore restoreSource) (*initInfo, *exec.Cmd, <-chan error, error) {
	m, err := a.spawnMonitor(dir, restore, false)
	if err != nil {
		return nil, nil, nil, err
	}
	return m.wait(ctx)
}

// monitorProc is a monitor that ferryd started and has not heard from yet.
type monitorProc struct {
	cmd       *exec.Cmd
	replies   chan monitorReply
	lazyEnded chan error
	ctrl      *os.File // staged: the monitor waits for commands here
}

// spawnMonitor starts the container's monitor. A staged one (restores
// only) gets ready up to the restore itself and then waits for
// monitorProc.command.
func (a *Agent) spawnMonitor(dir string, restore restoreSource, staged bool) (_ *monitorProc, retErr error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("ready pipe: %w", err)
	}
	var ctrlR, ctrlW *os.File
	if staged {
		if ctrlR, ctrlW, err = os.Pipe(); err != nil {
			_ = w.Close()
			_ = r.Close()
			return nil, fmt.Errorf("control pipe: %w", err)
		}
		defer func() {
			_ = ctrlR.Close()
			if retErr != nil {
				_ = ctrlW.Close()
			}
		}()
	}
	cmd, err := monitorCommand(a.cfg.Self, dir, a.lcRoot, a.cfg.LogMax, restore, w, ctrlR)
	if err != nil {
		_ = w.Close()
		_ = r.Close()
		return nil, err
	}
	err = cmd.Start()
	_ = w.Close()
	if f, ok := cmd.Stdout.(*os.File); ok {
		_ = f.Close()
	}
	if err != nil {
		_ = r.Close()
		return nil, fmt.Errorf("start monitor: %w", err)
	}
	if st, err := proc.StartTime(cmd.Process.Pid); err == nil {
		_ = atomicfile.WriteJSON(filepath.Join(dir, monitorPidFile), monitorPid{Pid: cmd.Process.Pid, Start: st}, 0o600)
	}
	m := &monitorProc{cmd: cmd, replies: make(chan monitorReply, 1), ctrl: ctrlW}
	if restore.lazy {
		m.lazyEnded = make(chan error, 1)
	}
	go func() {
		defer func() { _ = r.Close() }()
		dec := json.NewDecoder(r)
		var rep monitorReply
		if err := dec.Decode(&rep); err != nil {
			rep.Error = "monitor ended without a report: " + tail(filepath.Join(dir, monitorLog), 512)
		}
		m.replies <- rep
		if m.lazyEnded == nil || rep.Error != "" {
			return
		}
		var end monitorReply
		switch err := dec.Decode(&end); {
		case err != nil:
			m.lazyEnded <- errors.New("the monitor ended without reporting the page transfer: " + tail(filepath.Join(dir, monitorLog), 512))
		case end.Lazy == nil:
			m.lazyEnded <- errors.New("the monitor sent no page transfer outcome")
		case end.Lazy.Error != "":
			m.lazyEnded <- errors.New(end.Lazy.Error)
		default:
			m.lazyEnded <- nil
		}
	}()
	return m, nil
}

// Commands to a staged monitor.
const (
	monitorImagesIn = 'i' // every image is in: start what needs them (criu lazy-pages)
	monitorRestore  = 'r' // restore now
)

// command sends a staged monitor one command.
func (m *monitorProc) command(c byte) error {
	if _, err := m.ctrl.Write([]byte{c}); err != nil {
		return fmt.Errorf("monitor: %w", err)
	}
	return nil
}

// wait waits for the monitor's report; on failure the monitor is gone when
// it returns.
func (m *monitorProc) wait(ctx context.Context) (_ *initInfo, _ *exec.Cmd, _ <-chan error, retErr error) {
	defer func() {
		if retErr != nil {
			m.kill()
		}
	}()
	select {
	case rep := <-m.replies:
		if rep.Error != "" {
			return nil, nil, nil, errors.New(rep.Error)
		}
		if m.ctrl != nil {
			_ = m.ctrl.Close()
		}
		return rep.Init, m.cmd, m.lazyEnded, nil
	case <-ctx.Done():
		return nil, nil, nil, ctx.Err()
	case <-time.After(60 * time.Second):
		return nil, nil, nil, errors.New("monitor did not report within 60s")
	}
}

// kill ends a monitor that did not (or will not) report success, and
// reaps it.
func (m *monitorProc) kill() {
	if m.ctrl != nil {
		_ = m.ctrl.Close()
	}
	_ = m.cmd.Process.Kill()
	_ = m.cmd.Wait()
}

// criuPath is the criu binary ferryd runs.
func (a *Agent) criuPath() string {
	if a.cfg.CriuPath == "" {
		return "criu"
	}
	return a.cfg.CriuPath
}

func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer func() { _ = f.Close() }()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		_, _ = f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return strings.TrimSpace(string(b))
}

// teardown removes everything a container has on the host: its processes,
// libcontainer state and cgroups, the overlay mount and the state directory.
func (a *Agent) teardown(name, dir string) error {
	var errs []error
	// The record may be missing (a create cut short before it was written):
	// then there is no cgroup path or migration to act on.
	var rec record
	_ = atomicfile.ReadJSON(filepath.Join(dir, specFile), &rec)
	var mp monitorPid
	if err := atomicfile.ReadJSON(filepath.Join(dir, monitorPidFile), &mp); err == nil && proc.Alive(mp.Pid, mp.Start) {
		_ = unix.Kill(mp.Pid, unix.SIGKILL)
	}
	if err := a.destroyLibcontainer(name); err != nil {
		errs = append(errs, err)
	}
	if err := a.guards.Detach(name); err != nil && !errors.Is(err, sysctlguard.ErrNotAttached) {
		errs = append(errs, err)
	}
	if a.net != nil {
		var err error
		if rec.MigratedTo != "" {
			// The address lives on elsewhere now: keep it reserved as moved.
			err = a.net.TeardownMoved(context.Background(), name, rec.MigratedTo)
		} else {
			err = a.net.Teardown(context.Background(), name)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("network: %w", err))
		}
	}
	if rec.Cgroup != "" {
		// What libcontainer did not remove: the guard's cgroup made before it
		// ran, and cgroups of a start cut short before it saved its state.
		if err := removeCgroup(rec.Cgroup); err != nil {
			errs = append(errs, err)
		}
	}
	if err := unmountOverlay(dir); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove state dir: %w", err))
	}
	return errors.Join(errs...)
}

// removeCgroup removes the cgroup at path (relative to each hierarchy's
// root) in every mounted hierarchy, killing what is left in it first.
func removeCgroup(path string) error {
	if path == "" || path == "/" {
		return nil
	}
	var dirs []string
	if cgroups.IsCgroup2UnifiedMode() {
		dirs = []string{filepath.Join("/sys/fs/cgroup", path)}
	} else {
		hs, _ := os.ReadDir("/sys/fs/cgroup")
		for _, h := range hs {
			if h.IsDir() {
				dirs = append(dirs, filepath.Join("/sys/fs/cgroup", h.Name(), path))
			}
		}
	}
	var errs []error
	for _, d := range dirs {
		if _, err := os.Stat(d); err != nil {
			continue
		}
		// Thaw first: a frozen task cannot die.
		_ = os.WriteFile(filepath.Join(d, "freezer.state"), []byte("THAWED"), 0o644)
		var err error
		for try := 0; try < 50; try++ {
			if b, rerr := os.ReadFile(filepath.Join(d, "cgroup.procs")); rerr == nil {
				for _, f := range strings.Fields(string(b)) {
					if pid, perr := strconv.Atoi(f); perr == nil {
						_ = unix.Kill(pid, unix.SIGKILL)
					}
				}
			}
			if err = os.Remove(d); err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// destroyLibcontainer kills and destroys what libcontainer still has of name.
func (a *Agent) destroyLibcontainer(name string) error {
	if _, err := os.Stat(filepath.Join(a.lcRoot, name)); err != nil {
		return nil
	}
	lc, err := libcontainer.Load(a.lcRoot, name)
	if err != nil {
		if rerr := os.RemoveAll(filepath.Join(a.lcRoot, name)); rerr != nil {
			return errors.Join(err, rerr)
		}
		return nil
	}
	if st, err := lc.Status(); err == nil && st != libcontainer.Stopped {
		_ = lc.Signal(unix.SIGKILL)
		if st == libcontainer.Paused {
			_ = lc.Resume() // a frozen task cannot die
		}
		for i := 0; i < 100; i++ {
			if st, err := lc.Status(); err != nil || st == libcontainer.Stopped {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := lc.Destroy(); err != nil {
		return fmt.Errorf("destroy container %q: %w", name, err)
	}
	return nil
}

// signalInit sends sig to c's init process, checking the pid still names it.
func signalInit(ii *initInfo, sig unix.Signal) error {
	fd, err := unix.PidfdOpen(ii.Pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fmt.Errorf("pidfd_open %d: %w", ii.Pid, err)
	}
	defer func() { _ = unix.Close(fd) }()
	if !proc.Alive(ii.Pid, ii.PidStart) {
		return nil // gone, or the pid was reused: never signal a stranger
	}
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("signal %s to pid %d: %w", unix.SignalName(sig), ii.Pid, err)
	}
	return nil
}

// kill sends SIGKILL to the init and thaws the container if it is frozen
// (a frozen task cannot die; a migration freezes the container).
func (a *Agent) kill(name string, ii *initInfo) error {
	if err := signalInit(ii, unix.SIGKILL); err != nil {
		return err
	}
	lc, err := libcontainer.Load(a.lcRoot, name)
	if err != nil {
		return nil // already destroyed by its monitor
	}
	if st, err := lc.Status(); err == nil && st == libcontainer.Paused {
		if err := lc.Resume(); err != nil {
			// On cgroup v2 a frozen task dies of SIGKILL all the same: by
			// now its monitor may have destroyed the container.
			if st, serr := lc.Status(); serr == nil && st == libcontainer.Paused {
				return fmt.Errorf("thaw to let SIGKILL through: %w", err)
			}
		}
	}
	return nil
}

// Stop sends SIGTERM, waits up to timeout, then SIGKILL.
func (a *Agent) Stop(ctx context.Context, name string, timeout time.Duration) (*container, error) {
	c, err := a.get(name)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	defer c.op.Unlock()
	a.mu.Lock()
	st, ii, exited := c.state(), c.init, c.exited
	if st == StateRunning {
		c.rec.StopRequested = true
	}
	rec := c.rec
	a.mu.Unlock()
	if st != StateRunning {
		if st == StateCreated {
			return nil, fmt.Errorf("container %q: still being created: %w", name, ErrFailedPrecondition)
		}
		return c, nil
	}
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, specFile), rec, 0o600); err != nil {
		return nil, fmt.Errorf("container %q: %w", name, err)
	}
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	if err := signalInit(ii, unix.SIGTERM); err != nil {
		return nil, fmt.Errorf("container %q: %w", name, err)
	}
	select {
	case <-exited:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(timeout):
	}
	a.log.Info("stop timeout passed, killing", "container", name, "timeout", timeout)
	if err := a.kill(name, ii); err != nil {
		return nil, fmt.Errorf("container %q: %w", name, err)
	}
	select {
	case <-exited:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(30 * time.Second):
		return nil, fmt.Errorf("container %q: init pid %d did not exit 30s after SIGKILL", name, ii.Pid)
	}
}

// Remove deletes a container that is not running; with force it kills it first.
func (a *Agent) Remove(ctx context.Context, name string, force bool) error {
	c, err := a.get(name)
	if err != nil {
		return err
	}
	c.op.Lock()
	defer c.op.Unlock()
	a.mu.Lock()
	st, ii, exited := c.state(), c.init, c.exited
	a.mu.Unlock()
	switch st {
	case StateCreated:
		return fmt.Errorf("container %q: still being created: %w", name, ErrFailedPrecondition)
	case StateRunning:
		if !force {
			return fmt.Errorf("container %q: running (stop it first, or use force): %w", name, ErrFailedPrecondition)
		}
		if err := a.kill(name, ii); err != nil {
			return fmt.Errorf("container %q: %w", name, err)
		}
		select {
		case <-exited:
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(30 * time.Second):
			return fmt.Errorf("container %q: init pid %d did not exit 30s after SIGKILL", name, ii.Pid)
		}
	}
	if err := a.teardown(name, c.dir); err != nil {
		return fmt.Errorf("container %q: remove: %w", name, err)
	}
	a.mu.Lock()
	delete(a.ctrs, name)
	a.mu.Unlock()
	a.log.Info("container removed", "container", name)
	a.events.Publish(Event{Type: EventContainerRemoved, Container: name, Message: "removed"})
	return nil
}

// List returns every container in name order.
func (a *Agent) List() []*container {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*container, 0, len(a.ctrs))
	for _, c := range a.ctrs {
		if !c.creating {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// Get returns one container.
func (a *Agent) Get(name string) (*container, error) { return a.get(name) }

// ExecIO receives an exec'd process's output.
type ExecIO struct {
	Stdout, Stderr io.Writer
}

// Exec runs args in the running container and returns its exit code.
func (a *Agent) Exec(ctx context.Context, name string, args, env []string, out ExecIO) (int, error) {
	if len(args) == 0 {
		return 0, fmt.Errorf("args: empty command: %w", ErrInvalidArgument)
	}
	for _, e := range env {
		k, _, ok := strings.Cut(e, "=")
		if !ok || !envKeyRE.MatchString(k) {
			return 0, fmt.Errorf("env %q: want KEY=VALUE: %w", e, ErrInvalidArgument)
		}
	}
	c, err := a.get(name)
	if err != nil {
		return 0, err
	}
	a.mu.Lock()
	st, spec := c.state(), c.rec.Spec
	a.mu.Unlock()
	if st != StateRunning {
		return 0, fmt.Errorf("container %q: %s, not running: %w", name, st, ErrFailedPrecondition)
	}
	lc, err := libcontainer.Load(a.lcRoot, name)
	if err != nil {
		return 0, fmt.Errorf("container %q: load: %w", name, err)
	}
	or, ow, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	er, ew, err := os.Pipe()
	if err != nil {
		_ = or.Close()
		_ = ow.Close()
		return 0, err
	}
	p := &libcontainer.Process{Args: args, Env: append(spec.processEnv(), env...), Cwd: "/", Stdout: ow, Stderr: ew}
	runErr := lc.Run(p)
	_ = ow.Close()
	_ = ew.Close()
	var copies sync.WaitGroup
	copies.Add(2)
	go func() { defer copies.Done(); _, _ = io.Copy(out.Stdout, or); _ = or.Close() }()
	go func() { defer copies.Done(); _, _ = io.Copy(out.Stderr, er); _ = er.Close() }()
	if runErr != nil {
		copies.Wait()
		if strings.Contains(runErr.Error(), "executable file not found") || strings.Contains(runErr.Error(), "no such file or directory") {
			return 0, fmt.Errorf("container %q: exec %q: %w", name, args[0], errors.Join(runErr, ErrInvalidArgument))
		}
		return 0, fmt.Errorf("container %q: exec %q: %w", name, args[0], runErr)
	}
	waited := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			_ = p.Signal(unix.SIGKILL)
		case <-waited:
		}
	}()
	ps, werr := p.Wait()
	close(waited)
	copies.Wait()
	if ps == nil {
		return 0, fmt.Errorf("container %q: exec %q: wait: %w", name, args[0], werr)
	}
	code := ps.ExitCode()
	if ws, ok := ps.Sys().(unix.WaitStatus); ok && ws.Signaled() {
		code = 128 + int(ws.Signal())
	}
	return code, nil
}

// Logs writes the container's captured output to w; with follow it keeps
// writing new output until the container has ended or ctx is done.
func (a *Agent) Logs(ctx context.Context, name string, follow bool, w io.Writer) error {
	c, err := a.get(name)
	if err != nil {
		return err
	}
	path := filepath.Join(c.dir, logFile)
	if b, err := os.ReadFile(path + ".1"); err == nil {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("container %q: logs: %w", name, err)
	}
	defer func() { _ = f.Close() }()
	buf := make([]byte, 64<<10)
	drain := func() error {
		for {
			n, err := f.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return werr
				}
			}
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
		}
	}
	if err := drain(); err != nil || !follow {
		return err
	}
	a.mu.Lock()
	exited := c.exited
	a.mu.Unlock()
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		ended := false
		select {
		case <-ctx.Done():
			return nil
		case <-exited:
			ended = true
		case <-t.C:
		}
		if err := drain(); err != nil {
			return err
		}
		// Rotated: the file we read is now path.1; continue with the new one.
		if cur, err := os.Stat(path); err == nil {
			if old, err := f.Stat(); err == nil && !os.SameFile(cur, old) {
				nf, err := os.Open(path)
				if err == nil {
					_ = f.Close()
					f = nf
					if err := drain(); err != nil {
						return err
					}
				}
			}
		}
		if ended || exited == nil {
			return nil
		}
	}
}

// VersionInfo is what Version reports.
type VersionInfo struct {
	Agent, Node, Criu, CgroupMode string
}

// Version reports the agent's build and host features.
func (a *Agent) Version() VersionInfo {
	return VersionInfo{Agent: a.cfg.Version, Node: a.cfg.NodeName, Criu: a.criuVersion, CgroupMode: cgroup.Mode()}
}

// SubscribeEvents returns recent events (with replay) and a channel of new ones.
func (a *Agent) SubscribeEvents(ctx context.Context, replay bool) ([]Event, <-chan Event) {
	return a.events.Subscribe(ctx, replay)
}

// PublishEvent publishes an event from another part of the agent.
func (a *Agent) PublishEvent(e Event) Event { return a.events.Publish(e) }

// SysctlDenied returns how many sysctl writes c's guard refused.
func (a *Agent) sysctlDenied(c *container) uint64 {
	a.mu.Lock()
	g := c.guard
	a.mu.Unlock()
	if g == nil {
		return 0
	}
	n, err := g.Denied()
	if err != nil {
		return 0
	}
	return n
}

// effectiveCeiling is the ceiling in force for c now.
func (a *Agent) effectiveCeiling(c *container) cgroup.Amount {
	if l, _, ok := a.elastic.Effective(c.name); ok {
		return l.Ceiling
	}
	return a.elastic.EffectiveSpec(c.rec.Spec.Resources).Ceiling
}

// NodeReport is the node's elastic state.
func (a *Agent) NodeReport() cgroup.NodeReport { return a.elastic.Report() }

// ElasticMetrics returns the controller's counters and the admission refusals.
func (a *Agent) ElasticMetrics() (cgroup.Metrics, map[cgroup.Resource]uint64) {
	a.mu.Lock()
	ref := make(map[cgroup.Resource]uint64, len(a.refusals))
	for k, v := range a.refusals {
		ref[k] = v
	}
	a.mu.Unlock()
	return a.elastic.Metrics(), ref
}

// checkRemoteRootfs refuses a rootfs or bundle path sent by a controller or
// peer outside the allowed directories: a remote caller must not make this
// node use, say, its own / as a container's root.
func (a *Agent) checkRemoteRootfs(field, p string) error {
	if p == "" {
		return nil
	}
	clean := filepath.Clean(p)
	allowed := append([]string{filepath.Dir(a.cfg.DefaultRootfs)}, a.cfg.RemoteRootfs...)
	for _, dir := range allowed {
		dir = filepath.Clean(dir)
		if dir != "/" && (clean == dir || strings.HasPrefix(clean, dir+"/")) {
			return nil
		}
	}
	return fmt.Errorf("%s %q: not under a directory allowed for remote callers (%s; ferryd --remote-rootfs): %w",
		field, p, strings.Join(allowed, ", "), ErrFailedPrecondition)
}
