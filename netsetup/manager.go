package netsetup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Manager sets up and tears down container endpoints on one node.
// Its methods are safe for concurrent use; Reconcile excludes the others.
type Manager struct {
	cfg      Config
	log      *slog.Logger
	hostNS   netns.NsHandle
	host     *netlink.Handle // netlink in the host namespace
	st       *store
	netnsDir string

	all sync.RWMutex // Reconcile takes it exclusively, every other operation shared
	ids keyedMutex   // one operation per container id at a time

	bg      sync.WaitGroup // announcement repeats
	closing chan struct{}  // closed by Close
}

// Endpoint is a container's network attachment.
type Endpoint struct {
	ID        string
	NetnsPath string           // give to libcontainer: configs.Namespace{Type: configs.NEWNET, Path: NetnsPath}
	IP        netip.Prefix     // the address with the subnet's prefix length
	MAC       net.HardwareAddr // MACFor(IP.Addr())
	Gateway   netip.Addr
	HostVeth  string // host-side veth, a port of the bridge
	Interface string // the container-side interface, "eth0"
	MTU       int
	Pinned    bool // the address was chosen by the caller
	Standby   bool // host end down until Activate (migration destination)
	Ports     []Port
}

// SetupOptions are Setup's choices.
type SetupOptions struct {
	// IP pins the address (a migration, or a controller with its own IPAM).
	// It must be a host address of the subnet that this node does not hold
	// yet; it may lie outside this node's ip-range. Zero: allocate one.
	IP netip.Addr
	// Standby plumbs everything but keeps the host end of the veth down, so
	// the address's MAC is not seen on the segment (no IPv6 DAD, no ARP)
	// while the migration source still runs with it. Activate brings it up.
	Standby bool
	// Ports to publish on the host (DNAT rules in ferry's own iptables chain).
	Ports []Port
}

// New validates cfg, opens the host namespace and ensures the bridge: it
// exists, is a bridge, is up and carries the gateway address (created with
// cfg.MTU and the gateway's derived MAC when missing).
func New(cfg Config, log *slog.Logger) (_ *Manager, retErr error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{
		cfg:      cfg,
		log:      log,
		st:       &store{dir: cfg.StateDir},
		netnsDir: filepath.Join(cfg.RunDir, netnsSubdir),
		closing:  make(chan struct{}),
	}
	nsPath := cfg.HostNetns
	if nsPath == "" {
		nsPath = "/proc/self/ns/net"
	}
	var err error
	if m.hostNS, err = netns.GetFromPath(nsPath); err != nil {
		return nil, &OpError{Op: "open host netns", Netns: nsPath, Err: err}
	}
	defer func() {
		if retErr != nil {
			m.Close()
		}
	}()
	if m.host, err = netlink.NewHandleAt(m.hostNS, unix.NETLINK_ROUTE); err != nil {
		return nil, &OpError{Op: "open netlink", Netns: nsPath, Err: err}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, &OpError{Op: "create state dir", Err: err}
	}
	s, err := m.st.read()
	if err != nil {
		return nil, err
	}
	for id, r := range s.Endpoints {
		if !cfg.Subnet.Contains(r.IP) {
			log.Warn("netsetup: endpoint address outside the configured subnet (subnet changed?)",
				"container", id, "ip", r.IP, "subnet", cfg.Subnet)
		}
	}
	if err := ensureSharedDir(m.netnsDir); err != nil {
		return nil, err
	}
	if err := m.ensureBridge(); err != nil {
		return nil, err
	}
	return m, nil
}

// Close stops the announcement repeats and releases the manager's handles.
// It leaves every endpoint and the bridge in place.
func (m *Manager) Close() {
	select {
	case <-m.closing:
	default:
		close(m.closing)
	}
	m.bg.Wait()
	if m.host != nil {
		m.host.Close()
		m.host = nil
	}
	if m.hostNS.IsOpen() {
		_ = m.hostNS.Close()
	}
}

// Config returns the validated configuration, defaults filled in.
func (m *Manager) Config() Config { return m.cfg }

func (m *Manager) ensureBridge() error {
	name := m.cfg.Bridge
	l, err := m.host.LinkByName(name)
	if isNotFound(err) {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.MTU = m.cfg.MTU
		// A bridge takes the lowest MAC of its ports unless one is set; a
		// fixed one keeps neighbours' entries for the gateway valid.
		attrs.HardwareAddr = MACFor(m.cfg.Gateway)
		err = m.host.LinkAdd(&netlink.Bridge{LinkAttrs: attrs})
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return &OpError{Op: "create bridge", Link: name, Err: err}
		}
		m.log.Info("netsetup: created bridge", "bridge", name, "mtu", m.cfg.MTU)
		l, err = m.host.LinkByName(name)
	}
	if err != nil {
		return &OpError{Op: "look up bridge", Link: name, Err: err}
	}
	if l.Type() != "bridge" {
		return &OpError{Op: "use bridge", Link: name,
			Err: fmt.Errorf("existing link is a %s, not a bridge: %w", l.Type(), ErrInUse)}
	}
	want := netip.PrefixFrom(m.cfg.Gateway, m.cfg.Subnet.Bits())
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return m.host.AddrList(l, netlink.FAMILY_V4) })
	if err != nil {
		return &OpError{Op: "list bridge addresses", Link: name, Err: err}
	}
	found := false
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if ok && p.Addr() == want.Addr() {
			if p.Bits() != want.Bits() {
				return &OpError{Op: "check bridge address", Link: name, Addr: p.String(),
					Err: fmt.Errorf("gateway present with another prefix length, want %s: %w", want, ErrInvalid)}
			}
			found = true
		}
	}
	if !found {
		if err := m.host.AddrAdd(l, &netlink.Addr{IPNet: ipNet(want)}); err != nil && !errors.Is(err, unix.EEXIST) {
			return &OpError{Op: "add gateway address", Link: name, Addr: want.String(), Err: err}
		}
	}
	if err := m.host.LinkSetUp(l); err != nil {
		return &OpError{Op: "set bridge up", Link: name, Err: err}
	}
	return nil
}

func (m *Manager) netnsPath(id string) string { return filepath.Join(m.netnsDir, id) }

func (m *Manager) endpoint(r *record) *Endpoint {
	return &Endpoint{
		ID: r.ID, NetnsPath: r.Netns, IP: netip.PrefixFrom(r.IP, m.cfg.Subnet.Bits()), MAC: MACFor(r.IP),
		Gateway: m.cfg.Gateway, HostVeth: r.HostVeth, Interface: containerIf, MTU: m.cfg.MTU,
		Pinned: r.Pinned, Standby: r.Standby, Ports: slices.Clone(r.Ports),
	}
}

// Endpoint returns the endpoint of container id (ErrNotFound if none).
func (m *Manager) Endpoint(id string) (*Endpoint, error) {
	s, err := m.st.read()
	if err != nil {
		return nil, err
	}
	r := s.Endpoints[id]
	if r == nil {
		return nil, fmt.Errorf("endpoint %q: %w", id, ErrNotFound)
	}
	return m.endpoint(r), nil
}

// testHookSetupDone lets tests fail Setup after its last step, to check
// that every step is undone.
var testHookSetupDone func(id string) error

// Setup gives container id its network: the address (allocated, or pinned
// by opts.IP) recorded first, then a netns at RunDir/netns/<id> with lo up,
// a veth pair whose container end is eth0 (MAC derived from the address,
// the address, a default route via the gateway) and whose host end is a
// port of the bridge, up unless opts.Standby. On any failure every step
// done so far is undone: no netns, no veth, no allocation is left.
func (m *Manager) Setup(ctx context.Context, id string, opts SetupOptions) (_ *Endpoint, retErr error) {
	if err := validID(id); err != nil {
		return nil, err
	}
	if err := validPorts(id, opts.Ports); err != nil {
		return nil, err
	}
	m.all.RLock()
	defer m.all.RUnlock()
	defer m.ids.lock(id)()

	rec := &record{ID: id, HostVeth: VethName(id), Netns: m.netnsPath(id), Standby: opts.Standby,
		Ports: slices.Clone(opts.Ports), Created: time.Now().UTC()}
	if err := m.st.reserve(&m.cfg, rec, opts.IP); err != nil {
		return nil, err
	}
	log := m.log.With("container", id, "ip", rec.IP)
	defer func() {
		if retErr == nil {
			return
		}
		if err := m.st.update(func(s *state) error { delete(s.Endpoints, id); return nil }); err != nil {
			retErr = errors.Join(retErr, fmt.Errorf("undo: release %s: %w", rec.IP, err))
		}
		log.Warn("netsetup: setup failed, undone", "err", retErr)
	}()

	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("setup %q: %w", id, err)
	}
	if err := createNetns(rec.Netns); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if _, err := removeNetns(rec.Netns); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("setup %q: %w", id, err)
	}
	if err := m.plumb(rec); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if _, err := m.deleteVeth(rec.HostVeth, id); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("setup %q: %w", id, err)
	}
	if err := m.publish(rec); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if err := m.unpublish(rec); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	if !rec.Standby {
		// Usable when Setup returns: until the kernel has made both ends
		// operational, the bridge port forwards nothing and the container's
		// queue drops what it sends (usually well under a millisecond).
		if err := m.waitOperUp(ctx, rec); err != nil {
			return nil, err
		}
	}
	if testHookSetupDone != nil {
		if err := testHookSetupDone(id); err != nil {
			return nil, err
		}
	}
	log.Info("netsetup: endpoint ready", "veth", rec.HostVeth, "netns", rec.Netns, "pinned", rec.Pinned, "standby", rec.Standby)
	return m.endpoint(rec), nil
}

// plumb creates the veth pair with its container end directly inside the
// container's netns and configures both ends. The veth is deleted on
// failure here, so the caller's undo only covers later steps.
func (m *Manager) plumb(rec *record) (retErr error) {
	ns, err := netns.GetFromPath(rec.Netns)
	if err != nil {
		return &OpError{Op: "open netns", ID: rec.ID, Netns: rec.Netns, Err: err}
	}
	defer func() { _ = ns.Close() }()
	ctr, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return &OpError{Op: "open netlink", ID: rec.ID, Netns: rec.Netns, Err: err}
	}
	defer ctr.Close()

	bridge, err := m.host.LinkByName(m.cfg.Bridge)
	if err != nil {
		return &OpError{Op: "look up bridge", ID: rec.ID, Link: m.cfg.Bridge, Err: err}
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = rec.HostVeth
	attrs.MTU = m.cfg.MTU
	veth := &netlink.Veth{
		LinkAttrs: attrs, PeerName: containerIf, PeerHardwareAddr: MACFor(rec.IP),
		PeerNamespace: netlink.NsFd(int(ns)), PeerTxQLen: -1,
	}
	if err := m.host.LinkAdd(veth); err != nil {
		if errors.Is(err, unix.EEXIST) {
			// Not ours to delete in this call.
			return &OpError{Op: "create veth", ID: rec.ID, Link: rec.HostVeth,
				Err: fmt.Errorf("%w (left over? Reconcile removes orphans): %w", err, ErrInUse)}
		}
		// LinkAdd may fail after the kernel made the link (it looks the
		// new link up in a second request), so clean up by name.
		if _, derr := m.deleteVeth(rec.HostVeth, rec.ID); derr != nil {
			err = errors.Join(err, derr)
		}
		return &OpError{Op: "create veth", ID: rec.ID, Link: rec.HostVeth, Err: err}
	}
	defer func() {
		if retErr != nil {
			if _, err := m.deleteVeth(rec.HostVeth, rec.ID); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	hv, err := m.host.LinkByName(rec.HostVeth)
	if err != nil {
		return &OpError{Op: "look up veth", ID: rec.ID, Link: rec.HostVeth, Err: err}
	}
	// The kernel ignores an alias given at creation; set it now. It names
	// the container for Reconcile and for anyone reading `ip link`.
	if err := m.host.LinkSetAlias(hv, aliasPfx+rec.ID); err != nil {
		return &OpError{Op: "set alias", ID: rec.ID, Link: rec.HostVeth, Err: err}
	}

	// Container side: lo, eth0 with its address, the default route.
	lo, err := ctr.LinkByName("lo")
	if err == nil {
		err = ctr.LinkSetUp(lo)
	}
	if err != nil {
		return &OpError{Op: "set lo up", ID: rec.ID, Netns: rec.Netns, Err: err}
	}
	eth, err := ctr.LinkByName(containerIf)
	if err != nil {
		return &OpError{Op: "look up container interface", ID: rec.ID, Link: containerIf, Netns: rec.Netns, Err: err}
	}
	ipn := netip.PrefixFrom(rec.IP, m.cfg.Subnet.Bits())
	if err := ctr.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(ipn)}); err != nil {
		return &OpError{Op: "add address", ID: rec.ID, Link: containerIf, Netns: rec.Netns, Addr: ipn.String(), Err: err}
	}
	if err := ctr.LinkSetUp(eth); err != nil {
		return &OpError{Op: "set link up", ID: rec.ID, Link: containerIf, Netns: rec.Netns, Err: err}
	}
	route := &netlink.Route{LinkIndex: eth.Attrs().Index, Gw: net.IP(m.cfg.Gateway.AsSlice())}
	if err := ctr.RouteAdd(route); err != nil {
		return &OpError{Op: "add default route", ID: rec.ID, Link: containerIf, Netns: rec.Netns, Addr: m.cfg.Gateway.String(), Err: err}
	}

	// Host side: a port of the bridge; up unless standby.
	if err := m.host.LinkSetMaster(hv, bridge); err != nil {
		return &OpError{Op: "attach veth to bridge " + m.cfg.Bridge, ID: rec.ID, Link: rec.HostVeth, Err: err}
	}
	if !rec.Standby {
		if err := m.host.LinkSetUp(hv); err != nil {
			return &OpError{Op: "set link up", ID: rec.ID, Link: rec.HostVeth, Err: err}
		}
	}
	return nil
}

// deleteVeth deletes the host-side veth of id (and with it the container
// end). A missing link is not an error; a link of that name that is not
// ferry's veth for id is refused. removed reports whether it existed.
func (m *Manager) deleteVeth(name, id string) (removed bool, err error) {
	l, err := m.host.LinkByName(name)
	if isNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, &OpError{Op: "look up veth", ID: id, Link: name, Err: err}
	}
	// Ours: a veth with our alias, or without any if a crash came between
	// creating it and setting the alias.
	if alias := l.Attrs().Alias; l.Type() != "veth" || (alias != aliasPfx+id && !(alias == "" && name == VethName(id))) {
		return false, &OpError{Op: "delete veth", ID: id, Link: name,
			Err: fmt.Errorf("link is a %s with alias %q, not ferry's veth for this container: %w", l.Type(), l.Attrs().Alias, ErrInUse)}
	}
	if err := m.host.LinkDel(l); err != nil && !isNotFound(err) {
		return false, &OpError{Op: "delete veth", ID: id, Link: name, Err: err}
	}
	return true, nil
}

// Teardown removes container id's veth and netns, then releases its
// address. It is idempotent: a container without an endpoint is no error.
// The address is released only once the kernel objects are gone, so a
// failed teardown never lets the address be handed out while in use.
func (m *Manager) Teardown(ctx context.Context, id string) error {
	if err := validID(id); err != nil {
		return err
	}
	m.all.RLock()
	defer m.all.RUnlock()
	defer m.ids.lock(id)()
	_, err := m.teardown(ctx, id, "", false)
	return err
}

// TeardownMoved is Teardown for a container that now runs on peer (the
// migration destination has confirmed): the veth and netns go, but an
// address from this node's own range stays reserved as moved, so it is
// never handed out here while it lives on the segment. ReleaseMoved frees
// it; the same container pinning it again (moving back) reclaims it.
func (m *Manager) TeardownMoved(ctx context.Context, id, peer string) error {
	if err := validID(id); err != nil {
		return err
	}
	m.all.RLock()
	defer m.all.RUnlock()
	defer m.ids.lock(id)()
	_, err := m.teardown(ctx, id, peer, true)
	return err
}

// ReleaseMoved frees the addresses reserved for container id after it
// moved away, once it is gone from the segment. Idempotent.
func (m *Manager) ReleaseMoved(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("release moved %q: %w", id, err)
	}
	return m.st.update(func(s *state) error {
		for a, mv := range s.Moved {
			if mv.ID == id {
				delete(s.Moved, a)
				m.log.Info("netsetup: released moved address", "container", id, "ip", a)
			}
		}
		return nil
	})
}

// teardown returns the orphans it removed (for Reconcile's report).
func (m *Manager) teardown(ctx context.Context, id, peer string, moved bool) ([]Orphan, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("teardown %q: %w", id, err)
	}
	s, err := m.st.read()
	if err != nil {
		return nil, err
	}
	rec := s.Endpoints[id]
	vethName, nsPath := VethName(id), m.netnsPath(id)
	if rec != nil {
		vethName, nsPath = rec.HostVeth, rec.Netns
	}
	var out []Orphan
	if rec != nil {
		if err := m.unpublish(rec); err != nil {
			return nil, err
		}
	}
	vethGone, errV := m.deleteVeth(vethName, id)
	if vethGone {
		out = append(out, Orphan{Kind: "veth", Name: vethName, ID: id})
	}
	nsGone, errN := removeNetns(nsPath)
	if nsGone {
		out = append(out, Orphan{Kind: "netns", Name: nsPath, ID: id})
	}
	if err := errors.Join(errV, errN); err != nil {
		return out, err
	}
	if rec == nil {
		return out, nil
	}
	if err := m.st.release(&m.cfg, id, moved, peer); err != nil {
		return out, err
	}
	out = append(out, Orphan{Kind: "address", Name: rec.IP.String(), ID: id})
	m.log.Info("netsetup: endpoint removed", "container", id, "ip", rec.IP, "moved_to", peer)
	return out, nil
}

// Activate brings the host end of a standby endpoint up, waits until both
// ends are operational (the bridge forwards and the container's queue
// sends), and announces the address with gratuitous ARP. The migration
// destination calls it right after the restore; the source calls it when a
// migration is rolled back after Deactivate.
func (m *Manager) Activate(ctx context.Context, id string) error {
	m.all.RLock()
	defer m.all.RUnlock()
	defer m.ids.lock(id)()
	if err := m.activateLink(ctx, id); err != nil {
		return err
	}
	return m.announce(ctx, id)
}

// activateLink is Activate without the announcement; the caller holds the
// locks.
func (m *Manager) activateLink(ctx context.Context, id string) error {
	rec, err := m.setStandby(id, false)
	if err != nil {
		return err
	}
	hv, err := m.host.LinkByName(rec.HostVeth)
	if err == nil {
		err = m.host.LinkSetUp(hv)
	}
	if err != nil {
		return &OpError{Op: "set link up", ID: id, Link: rec.HostVeth, Err: err}
	}
	return m.waitOperUp(ctx, rec)
}

// Deactivate takes the host end of id's veth down: the container keeps its
// address but nothing enters or leaves its netns. The migration source
// calls it right after the final dump, so the emptied netns neither answers
// ARP for the address nor resets connections that now belong to the
// destination.
func (m *Manager) Deactivate(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("deactivate %q: %w", id, err)
	}
	m.all.RLock()
	defer m.all.RUnlock()
	defer m.ids.lock(id)()
	rec, err := m.setStandby(id, true)
	if err != nil {
		return err
	}
	hv, err := m.host.LinkByName(rec.HostVeth)
	if err == nil {
		err = m.host.LinkSetDown(hv)
	}
	if err != nil {
		return &OpError{Op: "set link down", ID: id, Link: rec.HostVeth, Err: err}
	}
	return nil
}

func (m *Manager) setStandby(id string, standby bool) (*record, error) {
	var rec *record
	err := m.st.update(func(s *state) error {
		rec = s.Endpoints[id]
		if rec == nil {
			return fmt.Errorf("endpoint %q: %w", id, ErrNotFound)
		}
		rec.Standby = standby
		return nil
	})
	return rec, err
}

// waitOperUp polls until the host veth and the container's eth0 are
// operationally up (bounded: 2 s). Until then the container's queue drops
// what is sent, an announcement included.
func (m *Manager) waitOperUp(ctx context.Context, rec *record) error {
	ns, err := netns.GetFromPath(rec.Netns)
	if err != nil {
		return &OpError{Op: "open netns", ID: rec.ID, Netns: rec.Netns, Err: err}
	}
	defer func() { _ = ns.Close() }()
	ctr, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return &OpError{Op: "open netlink", ID: rec.ID, Netns: rec.Netns, Err: err}
	}
	defer ctr.Close()
	const step, limit = 2 * time.Millisecond, 2 * time.Second
	for i := 0; i < int(limit/step); i++ {
		hv, err1 := m.host.LinkByName(rec.HostVeth)
		eth, err2 := ctr.LinkByName(containerIf)
		if err := errors.Join(err1, err2); err != nil {
			return &OpError{Op: "wait for link up", ID: rec.ID, Link: rec.HostVeth, Err: err}
		}
		if hv.Attrs().OperState == netlink.OperUp && eth.Attrs().OperState == netlink.OperUp {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %q to come up: %w", rec.ID, ctx.Err())
		case <-time.After(step):
		}
	}
	return &OpError{Op: "wait for link up", ID: rec.ID, Link: rec.HostVeth, Err: fmt.Errorf("not operational after %s", limit)}
}

// Orphan is something Reconcile removed.
type Orphan struct {
	Kind string // "veth", "netns", "address" or "port"
	Name string // link name, netns path or address
	ID   string // the container id it belonged to
}

func (o Orphan) String() string { return fmt.Sprintf("%s %s (container %q)", o.Kind, o.Name, o.ID) }

// Reconcile removes what belongs to no live container: endpoints
// (allocations) whose id is not in live, netns files under RunDir/netns,
// veths in the host namespace that carry ferry's alias or name, and
// published-port rules in ferry's chain. It returns
// what it removed. Addresses reserved for containers that moved away are
// kept. For live containers it re-attaches a host veth that lost its
// bridge (e.g. the bridge was deleted and recreated by New). ferryd calls
// it at start, before serving.
func (m *Manager) Reconcile(ctx context.Context, live []string) ([]Orphan, error) {
	m.all.Lock()
	defer m.all.Unlock()
	isLive := make(map[string]bool, len(live))
	for _, id := range live {
		isLive[id] = true
	}
	var out []Orphan
	var errs []error

	s, err := m.st.read()
	if err != nil {
		return nil, err
	}
	// 1. Endpoints of containers that are gone.
	for _, id := range sortedKeys(s.Endpoints) {
		if isLive[id] {
			continue
		}
		o, err := m.teardown(ctx, id, "", false)
		out = append(out, o...)
		errs = append(errs, err)
	}
	// 2. Netns files without a live container.
	ents, err := os.ReadDir(m.netnsDir)
	if err != nil {
		errs = append(errs, &OpError{Op: "list netns dir", Netns: m.netnsDir, Err: err})
	}
	for _, e := range ents {
		if isLive[e.Name()] {
			continue
		}
		p := filepath.Join(m.netnsDir, e.Name())
		gone, err := removeNetns(p)
		if gone {
			out = append(out, Orphan{Kind: "netns", Name: p, ID: e.Name()})
		}
		errs = append(errs, err)
	}
	// 3. ferry's veths without a live container, and repairs for live ones.
	links, err := retryDump(m.host.LinkList)
	if err != nil {
		errs = append(errs, &OpError{Op: "list links", Err: err})
	}
	bridge, berr := m.host.LinkByName(m.cfg.Bridge)
	liveByVeth := make(map[string]string, len(live))
	for _, id := range live {
		liveByVeth[VethName(id)] = id
	}
	for _, l := range links {
		a := l.Attrs()
		id, ours := strings.CutPrefix(a.Alias, aliasPfx)
		if a.Alias == "" && vethNameRE.MatchString(a.Name) {
			// Created, but a crash came before the alias: ours by name.
			id, ours = liveByVeth[a.Name], true
		}
		if !ours || l.Type() != "veth" || !vethNameRE.MatchString(a.Name) {
			continue
		}
		if !isLive[id] {
			if err := m.host.LinkDel(l); err != nil && !isNotFound(err) {
				errs = append(errs, &OpError{Op: "delete orphan veth", ID: id, Link: a.Name, Err: err})
				continue
			}
			out = append(out, Orphan{Kind: "veth", Name: a.Name, ID: id})
			continue
		}
		if berr == nil && a.MasterIndex != bridge.Attrs().Index {
			m.log.Warn("netsetup: re-attaching veth to bridge", "container", id, "veth", a.Name, "bridge", m.cfg.Bridge)
			if err := m.host.LinkSetMaster(l, bridge); err != nil {
				errs = append(errs, &OpError{Op: "re-attach veth to bridge " + m.cfg.Bridge, ID: id, Link: a.Name, Err: err})
			}
		}
	}
	// 4. Published-port rules of containers that are gone.
	ports, err := m.reconcilePorts(isLive)
	out = append(out, ports...)
	errs = append(errs, err)

	for _, id := range live {
		if _, ok := s.Endpoints[id]; !ok {
			continue
		}
		if !isNetnsMount(m.netnsPath(id)) {
			m.log.Warn("netsetup: live container lost its netns mount", "container", id, "netns", m.netnsPath(id))
		}
	}
	for _, o := range out {
		m.log.Info("netsetup: removed orphan", "kind", o.Kind, "name", o.Name, "container", o.ID)
	}
	return out, errors.Join(errs...)
}

func sortedKeys[V any](mp map[string]V) []string {
	keys := make([]string, 0, len(mp))
	for k := range mp {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return err != nil && (errors.As(err, &nf) || errors.Is(err, unix.ENODEV))
}

// retryDump repeats a netlink dump that the kernel interrupted (a
// concurrent change), a bounded number of times.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var (
		out []T
		err error
	)
	for i := 0; i < 5; i++ {
		out, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return out, err
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// keyedMutex serialises operations per key.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyedEntry{}
	}
	e := k.locks[key]
	if e == nil {
		e = &keyedEntry{}
		k.locks[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}
