package sysctlguard

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// Pins of one guard, under <pin root>/<id>/.
const (
	pinLink    = "link"
	pinProg    = "prog"
	pinPolicy  = "policy"
	pinStats   = "stats"
	pinEvents  = "events"
	pinNewLink = "link_new"
	tmpPrefix  = "_tmp-"
)

// idRE accepts ferry's container names and a little more. bpffs refuses
// names with a dot, so a pin directory's name is the id with dots as colons
// (pinName); the leading letter or digit keeps ids apart from "_tmp-" dirs.
var idRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$`)

// pinName and idOfPin convert between an id and its pin directory's name.
func pinName(id string) string   { return strings.ReplaceAll(id, ".", ":") }
func idOfPin(name string) string { return strings.ReplaceAll(name, ":", ".") }

// Manager attaches, finds and removes the guards pinned under one root on a
// BPF filesystem. Several processes may use the same root (ferryd and its
// container monitors): every change holds an flock on the root directory.
type Manager struct {
	root string
}

// NewManager uses pinRoot ("" means DefaultPinRoot), creating it on the BPF
// filesystem that must already be mounted at or above it (see EnsureBPFFS).
func NewManager(pinRoot string) (*Manager, error) {
	if pinRoot == "" {
		pinRoot = DefaultPinRoot
	}
	pinRoot = filepath.Clean(pinRoot)
	existing := pinRoot
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}
	ok, err := IsBPFFS(existing)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("sysctl guard pin root %s: %s is not on a BPF filesystem (mount one, e.g. EnsureBPFFS(%q)): %w",
			pinRoot, existing, "/sys/fs/bpf", ErrNoBPFFS)
	}
	if err := os.MkdirAll(pinRoot, 0o700); err != nil {
		return nil, kerr("create pin root", "", pinRoot, err)
	}
	return &Manager{root: pinRoot}, nil
}

// ErrNoBPFFS says the pin root is not on a BPF filesystem.
var ErrNoBPFFS = errors.New("no BPF filesystem")

// PinRoot returns the directory the guards are pinned under.
func (m *Manager) PinRoot() string { return m.root }

func (m *Manager) pinDir(id string) string { return filepath.Join(m.root, pinName(id)) }

// lock takes the root's flock, shared with other processes using the root.
func (m *Manager) lock() (unlock func(), err error) {
	f, err := os.Open(m.root)
	if err != nil {
		return nil, kerr("open pin root", "", m.root, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		_ = f.Close()
		return nil, kerr("lock pin root", "", m.root, err)
	}
	return func() { _ = f.Close() }, nil // closing drops the lock
}

func checkID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("sysctl guard: container id %q: want %s: %w", id, idRE, ErrInvalid)
	}
	return nil
}

// Attach guards the cgroup at cgroupDir (in the unified hierarchy, see
// CgroupDir) for container id with policy, which must be bound with
// Policy.For. From then on a write to any sysctl policy does not allow, by any
// process in that cgroup or below it, fails with EPERM. It is idempotent: if
// id's guard is pinned already, it is reused (its rules are brought to policy,
// and it is moved to cgroupDir if it was attached elsewhere or its cgroup is
// gone, as after a restore), so a cgroup never gets the program twice. The
// returned Guard holds file descriptors until Close or Detach; the pins keep
// the guard attached without them.
func (m *Manager) Attach(ctx context.Context, cgroupDir, id string, policy *Policy) (*Guard, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	if !policy.Bound() {
		return nil, fmt.Errorf("sysctl guard of %q: policy not bound to the container's namespaces (use Policy.For): %w", id, ErrInvalid)
	}
	rules := policy.rules()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sysctl guard of %q: %w", id, err)
	}
	cgID, err := cgroupDirID(cgroupDir)
	if err != nil {
		return nil, fmt.Errorf("sysctl guard of %q: %w", id, err)
	}
	unlock, err := m.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()

	if _, err := os.Stat(m.pinDir(id)); err == nil {
		g, oerr := m.open(id)
		if oerr == nil {
			if err := g.ensureAttached(cgroupDir, cgID); err != nil {
				return nil, errors.Join(err, g.Close())
			}
			if err := g.syncPolicy(rules); err != nil {
				return nil, errors.Join(err, g.Close())
			}
			return g, nil
		}
		// A pin set this version cannot use (half removed, or another
		// layout): create() attaches a fresh one before removing it.
	}
	return m.create(id, cgroupDir, cgID, rules)
}

// Open returns id's pinned guard without changing it, for reading its counter
// and events (ferryd after a restart, when the monitor attached it).
func (m *Manager) Open(id string) (*Guard, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	if _, err := os.Stat(m.pinDir(id)); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("sysctl guard of %q: %w", id, ErrNotAttached)
	}
	return m.open(id)
}

// Detach removes id's guard (link and pins) if there is one; the cgroup's
// writes are no longer filtered. It is what `rm` calls when ferryd holds no
// Guard for the container.
func (m *Manager) Detach(id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	unlock, err := m.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return m.removeDir(id, m.pinDir(id))
}

// Reconcile is for ferryd's start. live maps the id of every container that
// is still running to its cgroup directory. Guards pinned for other ids (and
// leftovers of an interrupted Attach) are detached and their pins removed:
// removed lists those ids. Each live id with a usable pinned guard is checked
// to be attached to its live cgroup, and re-attached there if not (its cgroup
// was recreated, e.g. by a restore): reattached lists those ids, whether or
// not they had to move. A live id missing from reattached has no guard:
// ferryd must call Attach for it. Errors for single ids are joined; the
// others are still processed.
func (m *Manager) Reconcile(ctx context.Context, live map[string]string) (reattached, removed []string, err error) {
	unlock, err := m.lock()
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	entries, err := os.ReadDir(m.root)
	if err != nil {
		return nil, nil, kerr("read pin root", "", m.root, err)
	}
	var errs []error
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
		dir := filepath.Join(m.root, e.Name())
		name := idOfPin(e.Name())
		if strings.HasPrefix(e.Name(), tmpPrefix) || checkID(name) != nil {
			errs = append(errs, m.removeDir("", dir))
			continue
		}
		cgroupDir, ok := live[name]
		if !ok {
			if err := m.removeDir(name, dir); err != nil {
				errs = append(errs, err)
				continue
			}
			removed = append(removed, name)
			continue
		}
		cgID, err := cgroupDirID(cgroupDir)
		if err != nil {
			errs = append(errs, fmt.Errorf("sysctl guard of %q: %w", name, err))
			continue
		}
		g, err := m.open(name)
		if err != nil {
			// Unusable: drop it so that Attach builds a new one.
			errs = append(errs, m.removeDir(name, dir))
			continue
		}
		err = g.ensureAttached(cgroupDir, cgID)
		errs = append(errs, err, g.Close())
		if err == nil {
			reattached = append(reattached, name)
		}
	}
	sort.Strings(reattached)
	sort.Strings(removed)
	return reattached, removed, errors.Join(errs...)
}

// create builds, attaches and pins a new guard in a temporary directory and
// renames it into place; a guard already at the final place is detached and
// removed only after the new one is attached, so the cgroup is never
// unguarded.
func (m *Manager) create(id, cgroupDir string, cgID uint64, rules []rule) (_ *Guard, retErr error) {
	tmp, err := os.MkdirTemp(m.root, tmpPrefix+pinName(id)+"-")
	if err != nil {
		return nil, kerr("create pin dir", id, m.root, err)
	}
	g := &Guard{m: m, id: id, dir: m.pinDir(id), cgroupID: cgID}
	defer func() {
		if retErr != nil {
			// Unlinking the link's pin and closing its fd detaches it.
			retErr = errors.Join(retErr, g.Close(), kerr("remove pin dir", id, tmp, os.RemoveAll(tmp)))
		}
	}()
	if g.policy, err = ebpf.NewMap(policySpec()); err != nil {
		return nil, kerr("create policy map", id, cgroupDir, err)
	}
	if g.stats, err = ebpf.NewMap(statsSpec()); err != nil {
		return nil, kerr("create stats map", id, cgroupDir, err)
	}
	if g.events, err = ebpf.NewMap(eventsSpec()); err != nil {
		return nil, kerr("create events ring", id, cgroupDir, err)
	}
	if err := g.syncPolicy(rules); err != nil {
		return nil, err
	}
	if g.prog, err = ebpf.NewProgram(programSpec(g.policy, g.stats, g.events)); err != nil {
		return nil, kerr("load program", id, cgroupDir, err)
	}
	for name, obj := range map[string]interface{ Pin(string) error }{
		pinProg: g.prog, pinPolicy: g.policy, pinStats: g.stats, pinEvents: g.events,
	} {
		p := filepath.Join(tmp, name)
		if err := obj.Pin(p); err != nil {
			return nil, kerr("pin", id, p, err)
		}
	}
	if g.link, err = attach(cgroupDir, g.prog); err != nil {
		return nil, kerr("attach program to cgroup", id, cgroupDir, err)
	}
	linkPin := filepath.Join(tmp, pinLink)
	if err := g.link.Pin(linkPin); err != nil {
		return nil, kerr("pin", id, linkPin, err)
	}
	if err := m.removeDir(id, g.dir); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, g.dir); err != nil {
		return nil, kerr("rename pin dir", id, tmp+" -> "+g.dir, err)
	}
	return g, nil
}

func attach(cgroupDir string, prog *ebpf.Program) (link.Link, error) {
	return link.AttachCgroup(link.CgroupOptions{Path: cgroupDir, Attach: ebpf.AttachCGroupSysctl, Program: prog})
}

// open loads id's pins and checks they are what this version creates.
func (m *Manager) open(id string) (_ *Guard, retErr error) {
	g := &Guard{m: m, id: id, dir: m.pinDir(id)}
	defer func() {
		if retErr != nil {
			retErr = errors.Join(retErr, g.Close())
		}
	}()
	var err error
	p := filepath.Join(g.dir, pinLink)
	if g.link, err = link.LoadPinnedLink(p, nil); err != nil {
		return nil, kerr("load pinned link", id, p, err)
	}
	p = filepath.Join(g.dir, pinProg)
	if g.prog, err = ebpf.LoadPinnedProgram(p, nil); err != nil {
		return nil, kerr("load pinned program", id, p, err)
	}
	for _, x := range []struct {
		name string
		m    **ebpf.Map
		spec *ebpf.MapSpec
	}{{pinPolicy, &g.policy, policySpec()}, {pinStats, &g.stats, statsSpec()}, {pinEvents, &g.events, eventsSpec()}} {
		p := filepath.Join(g.dir, x.name)
		mp, err := ebpf.LoadPinnedMap(p, nil)
		if err != nil {
			return nil, kerr("load pinned map", id, p, err)
		}
		*x.m = mp
		if mp.Type() != x.spec.Type || mp.KeySize() != x.spec.KeySize || mp.ValueSize() != x.spec.ValueSize || mp.MaxEntries() != x.spec.MaxEntries {
			return nil, fmt.Errorf("sysctl guard of %q: pinned map %s has another layout (%s key %d value %d entries %d)",
				id, p, mp.Type(), mp.KeySize(), mp.ValueSize(), mp.MaxEntries())
		}
	}
	info, err := g.link.Info()
	if err != nil {
		return nil, kerr("link info", id, filepath.Join(g.dir, pinLink), err)
	}
	pinfo, err := g.prog.Info()
	if err != nil {
		return nil, kerr("program info", id, filepath.Join(g.dir, pinProg), err)
	}
	pid, _ := pinfo.ID()
	if info.Cgroup() == nil || info.Program != pid {
		return nil, fmt.Errorf("sysctl guard of %q: pinned link %d is not a cgroup link of program %d", id, info.ID, pid)
	}
	g.cgroupID = info.Cgroup().CgroupId
	return g, nil
}

// removeDir detaches the link pinned in dir, even if another process still
// holds it, and removes the pins. A missing dir is no error.
func (m *Manager) removeDir(id, dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	for _, name := range []string{pinLink, pinNewLink} {
		p := filepath.Join(dir, name)
		l, err := link.LoadPinnedLink(p, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, kerr("load pinned link", id, p, err))
			continue
		}
		errs = append(errs, detachLink(id, p, l), l.Close())
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, kerr("remove pins", id, dir, err))
	}
	return errors.Join(errs...)
}

// detachLink detaches l from its cgroup now (BPF_LINK_DETACH): closing our
// descriptor is not enough while another process holds one.
func detachLink(id, path string, l link.Link) error {
	fd := uint32(l.(interface{ FD() int }).FD())
	attr := struct{ linkFD uint32 }{fd}
	// cilium/ebpf v0.17.3 has no wrapper for BPF_LINK_DETACH: its attr is
	// one u32, passed by pointer as bpf(2) wants.
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_LINK_DETACH, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr)) //nolint:gosec // G103: see above
	if errno != 0 {
		return kerr("detach link", id, path, errno)
	}
	return nil
}

// Guard is one container's attached program with its maps.
type Guard struct {
	m        *Manager
	id, dir  string
	cgroupID uint64 // of the cgroup the link was attached to when loaded

	link                  link.Link
	prog                  *ebpf.Program
	policy, stats, events *ebpf.Map

	mu      sync.Mutex
	closed  bool
	readers map[*ringbuf.Reader]struct{}
}

// ID returns the container id the guard was attached for.
func (g *Guard) ID() string { return g.id }

// ensureAttached makes the guard's link point at the cgroup cgID: if it is
// attached elsewhere, or its cgroup was removed, the pinned program is
// attached to cgroupDir, the new link takes the pin, and the old one is
// detached.
func (g *Guard) ensureAttached(cgroupDir string, cgID uint64) error {
	if g.cgroupID == cgID {
		return nil
	}
	nl, err := attach(cgroupDir, g.prog)
	if err != nil {
		return kerr("attach program to cgroup", g.id, cgroupDir, err)
	}
	tmp, final := filepath.Join(g.dir, pinNewLink), filepath.Join(g.dir, pinLink)
	if err := nl.Pin(tmp); err != nil {
		return errors.Join(kerr("pin", g.id, tmp, err), nl.Close())
	}
	if err := os.Rename(tmp, final); err != nil {
		return errors.Join(kerr("rename pin", g.id, tmp+" -> "+final, err), os.Remove(tmp), nl.Close())
	}
	old := g.link
	g.link, g.cgroupID = nl, cgID
	return errors.Join(detachLink(g.id, final, old), old.Close())
}

// syncPolicy makes the policy map hold exactly rules, writing only what
// differs: new and changed entries first, stale ones last, so that a key
// both policies allow stays allowed throughout.
func (g *Guard) syncPolicy(rules []rule) error {
	have, err := trieEntries(g.policy)
	if err != nil {
		return kerr("read policy map", g.id, g.dir, err)
	}
	want := make(map[string]bool, len(rules))
	for _, r := range rules {
		want[r.prefix] = r.allow
		if v, ok := have[r.prefix]; ok && v == r.allow {
			continue
		}
		k, err := trieKey(r.prefix)
		if err != nil {
			return err
		}
		var v uint32
		if r.allow {
			v = 1
		}
		if err := g.policy.Put(k, v); err != nil {
			return kerr("update policy map", g.id, g.dir, fmt.Errorf("rule %s: %w", r, err))
		}
	}
	for prefix := range have {
		if _, ok := want[prefix]; ok {
			continue
		}
		k, err := trieKey(prefix)
		if err != nil {
			return err
		}
		if err := g.policy.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return kerr("update policy map", g.id, g.dir, err)
		}
	}
	return nil
}

// Denied returns how many sysctl writes the guard has refused since it was
// first attached (it survives ferryd restarts and re-attachment).
func (g *Guard) Denied() (uint64, error) { return g.stat(statDenied) }

// Lost returns how many refused writes produced no event because the ring
// was full (they are counted by Denied all the same).
func (g *Guard) Lost() (uint64, error) { return g.stat(statLost) }

func (g *Guard) stat(i uint32) (uint64, error) {
	var v uint64
	if err := g.stats.Lookup(i, &v); err != nil {
		return 0, kerr("read stats map", g.id, filepath.Join(g.dir, pinStats), err)
	}
	return v, nil
}

// Rules returns the guard's trie in key form ("allow net.*", "deny
// net.bridge.*", "allow kernel.shmmax"), sorted: what the kernel enforces.
func (g *Guard) Rules() ([]string, error) {
	es, err := trieEntries(g.policy)
	if err != nil {
		return nil, kerr("read policy map", g.id, filepath.Join(g.dir, pinPolicy), err)
	}
	var out []string
	for p, allow := range es {
		out = append(out, rule{p, allow}.String())
	}
	sort.Strings(out)
	return out, nil
}

// Info identifies the kernel objects behind a guard.
type Info struct {
	ProgramID ebpf.ProgramID
	LinkID    link.ID
	CgroupID  uint64 // 0 when the cgroup was removed (the link is defunct)
	PinDir    string
}

// Info reports the guard's program, link and cgroup as the kernel sees them now.
func (g *Guard) Info() (Info, error) {
	li, err := g.link.Info()
	if err != nil {
		return Info{}, kerr("link info", g.id, filepath.Join(g.dir, pinLink), err)
	}
	in := Info{ProgramID: li.Program, LinkID: li.ID, PinDir: g.dir}
	if c := li.Cgroup(); c != nil {
		in.CgroupID = c.CgroupId
	}
	return in, nil
}

// Event is one refused sysctl write.
type Event struct {
	ID   string    // container id
	Key  string    // sysctl key, "kernel.panic"
	Time time.Time // when the kernel refused it
}

// Watch calls fn for each refused write, oldest first, starting with those
// still in the ring from before (including while ferryd was down), until ctx
// is done or the guard is closed; then it returns nil. Only one Watch per
// container should run at a time: the ring has one consumer position.
func (g *Guard) Watch(ctx context.Context, fn func(Event)) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return fmt.Errorf("sysctl guard of %q: watch: guard closed", g.id)
	}
	rd, err := ringbuf.NewReader(g.events)
	if err != nil {
		g.mu.Unlock()
		return kerr("read events ring", g.id, filepath.Join(g.dir, pinEvents), err)
	}
	if g.readers == nil {
		g.readers = map[*ringbuf.Reader]struct{}{}
	}
	g.readers[rd] = struct{}{}
	g.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { _ = rd.Close() })
	defer func() {
		stop()
		g.mu.Lock()
		delete(g.readers, rd)
		g.mu.Unlock()
		_ = rd.Close()
	}()
	var rec ringbuf.Record
	for {
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, os.ErrClosed) || errors.Is(err, ringbuf.ErrClosed) {
				return nil
			}
			return kerr("read events ring", g.id, filepath.Join(g.dir, pinEvents), err)
		}
		ev, err := decodeEvent(rec.RawSample)
		if err != nil {
			return fmt.Errorf("sysctl guard of %q: %w", g.id, err)
		}
		fn(Event{ID: g.id, Key: NameToKey(ev.name), Time: monoToTime(ev.ktime)})
	}
}

// monoToTime converts a CLOCK_MONOTONIC reading (bpf_ktime_get_ns) to wall time.
func monoToTime(ns uint64) time.Time {
	var ts unix.Timespec
	now := time.Now()
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return now
	}
	return now.Add(-time.Duration(ts.Nano() - int64(ns)))
}

// Close releases the guard's descriptors and stops its watchers; the guard
// stays attached through its pins. Closing twice is harmless.
func (g *Guard) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	for rd := range g.readers {
		_ = rd.Close()
	}
	var errs []error
	if g.link != nil {
		errs = append(errs, g.link.Close())
	}
	errs = append(errs, g.prog.Close(), g.policy.Close(), g.stats.Close(), g.events.Close())
	return errors.Join(errs...)
}

// Detach removes the guard: the link is detached from the cgroup (even if
// another process still holds it) and every pin is removed. Call it when the
// container is removed.
func (g *Guard) Detach() error {
	unlock, err := g.m.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return errors.Join(g.m.removeDir(g.id, g.dir), g.Close())
}
