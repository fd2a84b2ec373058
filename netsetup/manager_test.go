package netsetup

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// The segment every test uses: host a hands out 10.199.0.0/26 (gateway .1),
// host b 10.199.0.64/26 (gateway .64). It exists only inside the tests'
// own namespaces.
const (
	testSubnet = "10.199.0.0/24"
	rangeA     = "10.199.0.0/26"
	rangeB     = "10.199.0.64/26"
)

func TestSetupTeardown(t *testing.T) {
	root := testRoot(t)
	h := newTestHost(t, root, "a", testSubnet, rangeA)

	br := h.link(t, "fbr-a")
	if br.Type() != "bridge" || br.Attrs().Flags&net.FlagUp == 0 || br.Attrs().HardwareAddr.String() != MACFor(h.cfg.Gateway).String() {
		t.Fatalf("bridge: type %s flags %v mac %s", br.Type(), br.Attrs().Flags, br.Attrs().HardwareAddr)
	}
	assertAddrs(t, h.m.host, br, "10.199.0.1/24")

	ep := h.setup(t, "web", SetupOptions{})
	if ep.IP.String() != "10.199.0.2/24" || ep.MAC.String() != "02:42:0a:c7:00:02" || ep.Gateway.String() != "10.199.0.1" ||
		ep.NetnsPath != filepath.Join(h.cfg.RunDir, "netns", "web") || ep.HostVeth != VethName("web") || ep.Interface != "eth0" {
		t.Fatalf("endpoint %+v", ep)
	}
	if !isNetnsMount(ep.NetnsPath) {
		t.Fatalf("%s is not a netns mount", ep.NetnsPath)
	}
	// Inside: lo and eth0 up, MAC, address, default route via the gateway.
	withHandle(t, ep.NetnsPath, func(c *netlink.Handle) {
		lo, _ := c.LinkByName("lo")
		eth, err := c.LinkByName("eth0")
		if err != nil || lo == nil || lo.Attrs().Flags&net.FlagUp == 0 || eth.Attrs().Flags&net.FlagUp == 0 {
			t.Fatalf("lo %v, eth0 %v: %v", lo, eth, err)
		}
		if eth.Attrs().HardwareAddr.String() != ep.MAC.String() || eth.Attrs().MTU != 1500 {
			t.Fatalf("eth0 mac %s mtu %d", eth.Attrs().HardwareAddr, eth.Attrs().MTU)
		}
		assertAddrs(t, c, eth, "10.199.0.2/24")
		routes, err := c.RouteList(eth, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		var def bool
		for _, r := range routes {
			def = def || (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == "10.199.0.1"
		}
		if !def {
			t.Fatalf("no default route via the gateway: %v", routes)
		}
	})
	hv := h.link(t, ep.HostVeth)
	if hv.Type() != "veth" || hv.Attrs().MasterIndex != br.Attrs().Index || hv.Attrs().Flags&net.FlagUp == 0 || hv.Attrs().Alias != "ferry:web" {
		t.Fatalf("host veth: %s master %d flags %v alias %q", hv.Type(), hv.Attrs().MasterIndex, hv.Attrs().Flags, hv.Attrs().Alias)
	}
	// Another process joins the namespace by its path, as libcontainer's
	// nsexec does (open + setns): what it sees is the container's eth0.
	nsenter, ipBin := testenv.RequireBinary(t, "nsenter"), testenv.RequireBinary(t, "ip")
	out, err := exec.Command(nsenter, "--net="+ep.NetnsPath, ipBin, "-o", "-4", "addr", "show", "dev", "eth0").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "10.199.0.2/24") {
		t.Fatalf("nsenter --net=%s ip addr: %v: %s", ep.NetnsPath, err, out)
	}
	mustPing(t, newPinger(t, ep.NetnsPath), h.cfg.Gateway, "container to gateway")
	mustPing(t, newPinger(t, h.netns), ep.IP.Addr(), "host to container")
	if err := h.m.Announce(t.Context(), "web"); err != nil {
		t.Fatalf("Announce: %v", err)
	}

	// A restarted manager (same dirs, existing bridge) knows the endpoint and
	// never hands its address out again.
	m2, err := New(h.cfg, testLog(t))
	if err != nil {
		t.Fatalf("New on an existing bridge: %v", err)
	}
	defer m2.Close()
	if got, err := m2.Endpoint("web"); err != nil || got.IP != ep.IP || got.MAC.String() != ep.MAC.String() {
		t.Fatalf("after restart: %+v, %v", got, err)
	}
	db, err := m2.Setup(t.Context(), "db", SetupOptions{})
	if err != nil || db.IP.Addr() == ep.IP.Addr() {
		t.Fatalf("after restart: db got %v, %v", db, err)
	}
	if err := m2.Teardown(t.Context(), "db"); err != nil {
		t.Fatal(err)
	}

	h.teardown(t, "web")
	if _, err := os.Lstat(ep.NetnsPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("netns file after teardown: %v", err)
	}
	if _, err := h.m.host.LinkByName(ep.HostVeth); !isNotFound(err) {
		t.Fatalf("veth after teardown: %v", err)
	}
	if _, err := h.m.Endpoint("web"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Endpoint after teardown: %v", err)
	}
	h.teardown(t, "web") // idempotent
	h.teardown(t, "never-there")
}

func TestNewRefusesNonBridgeLinkAndBadConfig(t *testing.T) {
	root := testRoot(t)
	ns := testNetns(t, filepath.Join(root, "hosts"), "x")
	withHandle(t, ns, func(h *netlink.Handle) {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = "fbr-x"
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "fbr-x-peer", PeerTxQLen: -1}); err != nil {
			t.Fatal(err)
		}
	})
	cfg := Config{Bridge: "fbr-x", Subnet: netip.MustParsePrefix(testSubnet),
		RunDir: filepath.Join(root, "run"), StateDir: filepath.Join(root, "state"), HostNetns: ns}
	t.Cleanup(func() { _ = os.RemoveAll(cfg.RunDir) })
	netnsDir := filepath.Join(cfg.RunDir, "netns")
	t.Cleanup(func() { _ = unmountIfMounted(netnsDir) })
	_, err := New(cfg, testLog(t))
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), `fbr-x`) || !strings.Contains(err.Error(), "veth") {
		t.Fatalf("New over a dummy link: %v; want ErrInUse naming the link and its type", err)
	}
	t.Logf("refused: %v", err)
	bad := cfg
	bad.IPRange = netip.MustParsePrefix("10.200.0.0/26")
	if _, err := New(bad, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("range outside subnet: %v", err)
	}
	withHandle(t, ns, func(h *netlink.Handle) {
		if l, err := h.LinkByName("fbr-x"); err != nil || l.Type() != "veth" {
			t.Fatalf("the veth must be left alone: %v %v", l, err)
		}
	})
}

func TestTwoHostsOnOneSegment(t *testing.T) {
	root := testRoot(t)
	a := newTestHost(t, root, "a", testSubnet, rangeA)
	b := newTestHost(t, root, "b", testSubnet, rangeB)
	wire(t, a, b)
	if a.cfg.Gateway == b.cfg.Gateway {
		t.Fatalf("both hosts claim gateway %s", a.cfg.Gateway)
	}
	ea := a.setup(t, "web", SetupOptions{})
	eb := b.setup(t, "db", SetupOptions{})
	defer a.teardown(t, "web")
	defer b.teardown(t, "db")
	if !a.cfg.IPRange.Contains(ea.IP.Addr()) || !b.cfg.IPRange.Contains(eb.IP.Addr()) {
		t.Fatalf("addresses %s, %s not from their hosts' ranges", ea.IP, eb.IP)
	}
	pa, pb := newPinger(t, ea.NetnsPath), newPinger(t, eb.NetnsPath)
	mustPing(t, pa, eb.IP.Addr(), "a's container to b's")
	mustPing(t, pb, ea.IP.Addr(), "b's container to a's")
	mustPing(t, pa, a.cfg.Gateway, "a's container to its gateway")
	mustPing(t, pb, b.cfg.Gateway, "b's container to its gateway")
}

// TestMigrationMovesAddress moves a container's address from host a to
// host b the way a live migration does, with a neighbour c next to b that
// has been talking to the container on a. The MAC moves with the address,
// so c's ARP entry stays right; what must change is b's bridge, which
// still forwards that MAC to the wire towards a. The control shows that
// without the announcement c gets no answer for a full second; with it,
// the answer comes within 1 s (measured).
func TestMigrationMovesAddress(t *testing.T) {
	root := testRoot(t)
	a := newTestHost(t, root, "a", testSubnet, rangeA)
	b := newTestHost(t, root, "b", testSubnet, rangeB)
	wire(t, a, b)
	cNS := neighbour(t, root, b, "c", "10.199.0.250")
	c := newPinger(t, cNS)

	// The container runs on a; c talks to it through b's bridge and the wire.
	src := a.setup(t, "web", SetupOptions{})
	ip := src.IP.Addr()
	mustPing(t, c, ip, "c to web on a")
	if port := b.fdbPort(t, src.MAC); port != "wire-a" {
		t.Fatalf("b's bridge forwards %s to %q, want the wire", src.MAC, port)
	}
	cMAC := neighMAC(t, cNS, ip)
	if cMAC != src.MAC.String() {
		t.Fatalf("c's neighbour entry for %s: %q, want %s", ip, cMAC, src.MAC)
	}

	// Destination prepares early: same address (from a's range), same MAC,
	// on standby. The source keeps running undisturbed meanwhile.
	dst := b.setup(t, "web", SetupOptions{IP: ip, Standby: true})
	if dst.IP != src.IP || dst.MAC.String() != src.MAC.String() || !dst.Pinned || !dst.Standby {
		t.Fatalf("destination endpoint %+v, source %+v", dst, src)
	}
	time.Sleep(300 * time.Millisecond) // long enough for DAD or an ARP to leak, if one did
	mustPing(t, c, ip, "c to web on a while b stands by")
	if port := b.fdbPort(t, src.MAC); port != "wire-a" {
		t.Fatalf("standby leaked: b's bridge forwards %s to %q", src.MAC, port)
	}
	if err := b.m.Announce(t.Context(), "web"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Announce on standby: %v, want ErrInvalid", err)
	}

	// Final dump on a: the source goes quiet.
	if err := a.m.Deactivate(t.Context(), "web"); err != nil {
		t.Fatal(err)
	}
	if ok := c.ping(ip, 200*time.Millisecond); ok {
		t.Fatalf("web on a still answers after Deactivate")
	}

	// Control: the destination's link comes up but nothing is announced. With
	// IPv6 off in its netns (no DAD, no MLD) it stays silent, and b's bridge
	// keeps sending c's frames to the wire: no answer for a whole second.
	writeSysctl(t, dst.NetnsPath, "net/ipv6/conf/all/disable_ipv6", "1")
	if err := b.m.activateLink(t.Context(), "web"); err != nil { // no locks needed: nothing runs concurrently here
		t.Fatal(err)
	}
	if d, ok := c.firstReply(ip, time.Second, 20*time.Millisecond); ok {
		t.Fatalf("control: answered after %s without an announcement; the test would prove nothing", d)
	}

	// The announcement: b's bridge learns the MAC's new port at once. c
	// pings every 5 ms from the moment Announce starts (its later rounds
	// are only repeats against loss).
	start := time.Now()
	announced := make(chan error, 1)
	var took time.Duration
	go func() { err := b.m.Announce(t.Context(), "web"); took = time.Since(start); announced <- err }()
	_, ok := c.firstReply(ip, time.Second, time.Millisecond)
	d := c.lastReply.Sub(start) // from Announce's start, however the goroutines were scheduled
	if err := <-announced; err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Fatalf("no answer within 1 s of the announcement")
	}
	t.Logf("re-announce: first reply from the moved address %s after Announce started (Announce itself took %s)",
		d.Round(time.Microsecond), took.Round(time.Millisecond))
	if port := b.fdbPort(t, src.MAC); port != dst.HostVeth {
		t.Fatalf("b's bridge forwards %s to %q, want %s", src.MAC, port, dst.HostVeth)
	}
	if got := neighMAC(t, cNS, ip); got != cMAC {
		t.Fatalf("c's neighbour entry changed from %s to %s; the MAC should have moved with the address", cMAC, got)
	}

	// Destination confirmed: the source tears down, keeping the address
	// reserved (it is from a's range and lives on the segment, on b).
	if err := a.m.TeardownMoved(t.Context(), "web", "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.m.Setup(t.Context(), "other", SetupOptions{IP: ip}); !errors.Is(err, ErrInUse) {
		t.Fatalf("a handed out the moved address: %v", err)
	}
	mustPing(t, c, ip, "c to web on b after the source's teardown")

	// And back to a, with the public API only: Activate announces.
	back := a.setup(t, "web", SetupOptions{IP: ip, Standby: true})
	if err := b.m.Deactivate(t.Context(), "web"); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	activated := make(chan error, 1)
	go func() { err := a.m.Activate(t.Context(), "web"); took = time.Since(start); activated <- err }()
	_, ok = c.firstReply(ip, time.Second, time.Millisecond)
	d = c.lastReply.Sub(start)
	if err := <-activated; err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Fatalf("moving back: no answer within 1 s of Activate")
	}
	t.Logf("moving back: first reply %s after Activate started (Activate took %s)", d.Round(time.Microsecond), took.Round(time.Millisecond))
	if err := b.m.TeardownMoved(t.Context(), "web", "a"); err != nil {
		t.Fatal(err)
	}
	if s, _ := b.m.st.read(); len(s.Moved) != 0 {
		t.Fatalf("b reserved a's address: %v", s.Moved)
	}
	if back.MAC.String() != src.MAC.String() {
		t.Fatalf("MAC changed on the way back")
	}
	mustPing(t, c, ip, "c to web back on a")
	a.teardown(t, "web")
}

func TestSetupRefusesBadInputAndLeavesNothing(t *testing.T) {
	root := testRoot(t)
	h := newTestHost(t, root, "a", testSubnet, rangeA)
	web := h.setup(t, "web", SetupOptions{})
	defer h.teardown(t, "web")

	before := snapshot(t, h)
	for _, tc := range []struct {
		id   string
		pin  string
		want error
	}{
		{"../x", "", ErrInvalid},
		{"", "", ErrInvalid},
		{"p1", "10.200.0.5", ErrInvalid},         // outside the subnet
		{"p2", "10.199.0.0", ErrInvalid},         // network address
		{"p3", "10.199.0.255", ErrInvalid},       // broadcast
		{"p4", "10.199.0.1", ErrInUse},           // this node's gateway
		{"p5", web.IP.Addr().String(), ErrInUse}, // taken
		{"web", "", ErrInUse},                    // the id has an endpoint
	} {
		var pin netip.Addr
		if tc.pin != "" {
			pin = netip.MustParseAddr(tc.pin)
		}
		_, err := h.m.Setup(t.Context(), tc.id, SetupOptions{IP: pin})
		if !errors.Is(err, tc.want) {
			t.Errorf("Setup(%q, pin %q) = %v, want %v", tc.id, tc.pin, err, tc.want)
		} else {
			t.Logf("refused: %v", err)
		}
		if after := snapshot(t, h); after != before {
			t.Fatalf("Setup(%q, %q) left something:\n%s\nwas\n%s", tc.id, tc.pin, after, before)
		}
	}

	// Failures in the middle: every earlier step is undone.
	// 1. The veth name is taken by a link that is not ours.
	attrs := netlink.NewLinkAttrs()
	attrs.Name = VethName("clash")
	if err := h.m.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "clash-peer", PeerTxQLen: -1}); err != nil {
		t.Fatal(err)
	}
	if err := h.m.host.LinkSetAlias(h.link(t, attrs.Name), "someone-else"); err != nil {
		t.Fatal(err)
	}
	_, err := h.m.Setup(t.Context(), "clash", SetupOptions{})
	if !errors.Is(err, ErrInUse) {
		t.Fatalf("Setup over a taken veth name: %v", err)
	}
	t.Logf("refused: %v", err)
	if err := h.m.host.LinkDel(h.link(t, attrs.Name)); err != nil {
		t.Fatalf("the foreign link must be left alone: %v", err)
	}
	if after := snapshot(t, h); after != before {
		t.Fatalf("failed Setup left:\n%s\nwas\n%s", after, before)
	}
	// 2. After the last step.
	testHookSetupDone = func(string) error { return errors.New("injected") }
	_, err = h.m.Setup(t.Context(), "late", SetupOptions{})
	testHookSetupDone = nil
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("injected failure: %v", err)
	}
	if after := snapshot(t, h); after != before {
		t.Fatalf("failed Setup left:\n%s\nwas\n%s", after, before)
	}
	// 3. A cancelled context.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := h.m.Setup(ctx, "cancelled", SetupOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Setup: %v", err)
	}
	if after := snapshot(t, h); after != before {
		t.Fatalf("cancelled Setup left:\n%s\nwas\n%s", after, before)
	}
	if _, err := h.m.Endpoint("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Endpoint(nope): %v", err)
	}
	if err := h.m.Announce(t.Context(), "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Announce(nope): %v", err)
	}
	mustPing(t, newPinger(t, web.NetnsPath), h.cfg.Gateway, "web still works")
}

func TestReconcileRemovesOrphans(t *testing.T) {
	root := testRoot(t)
	h := newTestHost(t, root, "a", testSubnet, rangeA)
	alive := h.setup(t, "alive", SetupOptions{})
	h.setup(t, "gone", SetupOptions{}) // its container died while ferryd was down
	away := h.setup(t, "away", SetupOptions{})
	if err := h.m.TeardownMoved(t.Context(), "away", "node-b"); err != nil { // migrated to node-b
		t.Fatal(err)
	}
	// A netns file without any record (a crash between mount and record).
	stray := filepath.Join(h.cfg.RunDir, "netns", "stray")
	if err := createNetns(stray); err != nil {
		t.Fatal(err)
	}
	// A veth with ferry's alias and no record.
	attrs := netlink.NewLinkAttrs()
	attrs.Name = VethName("ghost")
	if err := h.m.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "ghost-peer", PeerTxQLen: -1}); err != nil {
		t.Fatal(err)
	}
	if err := h.m.host.LinkSetAlias(h.link(t, attrs.Name), "ferry:ghost"); err != nil {
		t.Fatal(err)
	}
	// A veth by ferry's naming scheme that a crash left without its alias.
	attrs = netlink.NewLinkAttrs()
	attrs.Name = VethName("crashed")
	if err := h.m.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "crashed-peer", PeerTxQLen: -1}); err != nil {
		t.Fatal(err)
	}
	// Not ferry's: a veth without the alias, even with a matching prefix.
	attrs = netlink.NewLinkAttrs()
	attrs.Name = "fr-not-ours"
	if err := h.m.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "not-ours-peer", PeerTxQLen: -1}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = h.m.host.LinkDel(h.link(t, "fr-not-ours")) }()
	// The bridge was recreated: alive's veth lost its master.
	if err := h.m.host.LinkSetNoMaster(h.link(t, alive.HostVeth)); err != nil {
		t.Fatal(err)
	}

	removed, err := h.m.Reconcile(t.Context(), []string{"alive"})
	if err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	got := map[string]bool{}
	for _, o := range removed {
		got[o.String()] = true
	}
	t.Logf("removed: %v", removed)
	for _, want := range []Orphan{
		{"veth", VethName("gone"), "gone"}, {"netns", filepath.Join(h.cfg.RunDir, "netns", "gone"), "gone"},
		{"address", "10.199.0.3", "gone"}, {"netns", stray, "stray"}, {"veth", VethName("ghost"), "ghost"},
		{"veth", VethName("crashed"), ""},
	} {
		if !got[want.String()] {
			t.Errorf("not reported: %s", want)
		}
	}
	if len(removed) != 6 {
		t.Errorf("removed %d things, want 6", len(removed))
	}
	if l := h.link(t, alive.HostVeth); l.Attrs().MasterIndex != h.link(t, h.cfg.Bridge).Attrs().Index {
		t.Errorf("alive's veth not re-attached to the bridge")
	}
	mustPing(t, newPinger(t, alive.NetnsPath), h.cfg.Gateway, "alive after Reconcile")
	if again, err := h.m.Reconcile(t.Context(), []string{"alive"}); err != nil || len(again) != 0 {
		t.Fatalf("second Reconcile: %v, %v", again, err)
	}
	// The moved container's address is kept: it lives on node-b.
	if _, err := h.m.Setup(t.Context(), "newcomer", SetupOptions{IP: away.IP.Addr()}); !errors.Is(err, ErrInUse) {
		t.Fatalf("moved address after Reconcile: %v, want ErrInUse", err)
	}
	if err := h.m.ReleaseMoved(t.Context(), "away"); err != nil {
		t.Fatal(err)
	}
	h.teardown(t, "alive")
}

func TestConcurrentSetups(t *testing.T) {
	root := testRoot(t)
	h := newTestHost(t, root, "a", testSubnet, rangeA)
	const n = 12
	eps := make([]*Endpoint, n)
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			eps[i], errs[i] = h.m.Setup(t.Context(), "c"+string(rune('a'+i)), SetupOptions{})
		}()
	}
	wg.Wait()
	seen := map[netip.Prefix]bool{}
	for i, ep := range eps {
		if errs[i] != nil {
			t.Fatalf("Setup %d: %v", i, errs[i])
		}
		if seen[ep.IP] {
			t.Fatalf("%s handed out twice", ep.IP)
		}
		seen[ep.IP] = true
	}
	mustPing(t, newPinger(t, eps[0].NetnsPath), eps[n-1].IP.Addr(), "first to last")
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = h.m.Teardown(context.Background(), eps[i].ID)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}

// snapshot describes what a host has: endpoints, netns files, links.
func snapshot(t *testing.T, h *testHost) string {
	t.Helper()
	s, err := h.m.st.read()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, id := range sortedKeys(s.Endpoints) {
		b.WriteString("endpoint " + id + " " + s.Endpoints[id].IP.String() + "\n")
	}
	ents, _ := os.ReadDir(filepath.Join(h.cfg.RunDir, "netns"))
	for _, e := range ents {
		b.WriteString("netns " + e.Name() + "\n")
	}
	for _, l := range h.links(t) {
		b.WriteString("link " + l.Attrs().Name + "\n")
	}
	return b.String()
}

func withHandle(t *testing.T, nsPath string, fn func(*netlink.Handle)) {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ns.Close() }()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	fn(h)
}

func assertAddrs(t *testing.T, h *netlink.Handle, l netlink.Link, want string) {
	t.Helper()
	addrs, err := h.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range addrs {
		got = append(got, a.IPNet.String())
	}
	if strings.Join(got, ",") != want {
		t.Fatalf("%s addresses %v, want %s", l.Attrs().Name, got, want)
	}
}

// neighMAC is the MAC of ip in the ARP table of the namespace at nsPath.
func neighMAC(t *testing.T, nsPath string, ip netip.Addr) string {
	t.Helper()
	var mac string
	withHandle(t, nsPath, func(h *netlink.Handle) {
		ns, err := h.NeighList(0, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range ns {
			if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip {
				mac = n.HardwareAddr.String()
			}
		}
	})
	return mac
}

func unmountIfMounted(p string) error {
	if err := unmount(p); err != nil && !errors.Is(err, errNotMounted) {
		return err
	}
	return nil
}

// TestAnnouncementRepeatsInBackground: Announce returns once its first round
// (a request and a reply) is out; the two repeats follow announceGap apart
// on their own. The frames are caught, with the kernel's receive
// timestamps, on the host end of the container's veth.
func TestAnnouncementRepeatsInBackground(t *testing.T) {
	root := testRoot(t)
	h := newTestHost(t, root, "a", testSubnet, rangeA)
	ep := h.setup(t, "web", SetupOptions{})
	defer h.teardown(t, "web")
	ip := ep.IP.Addr()

	var fd int
	if err := inNetns(h.netns, func() error {
		var err error
		// ETH_P_ALL: a bridge port's frames go to the bridge before any
		// handler of a single protocol could see them.
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Close(fd) }()
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: h.link(t, ep.HostVeth).Attrs().Index}); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100_000}); err != nil {
		t.Fatal(err)
	}

	if err := h.m.Announce(t.Context(), "web"); err != nil {
		t.Fatal(err)
	}
	returned := time.Now()
	// Every gratuitous frame for ip (sender = target = ip) within 1 s.
	var at []time.Time
	buf, oob := make([]byte, 1500), make([]byte, 128)
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if n < 42 || buf[12] != 0x08 || buf[13] != 0x06 { // not ARP
			continue
		}
		a := buf[14:n]
		if netip.AddrFrom4([4]byte(a[14:18])) != ip || netip.AddrFrom4([4]byte(a[24:28])) != ip {
			continue
		}
		cms, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(cms) == 0 || cms[0].Header.Type != unix.SO_TIMESTAMPNS {
			t.Fatalf("no receive timestamp: %v %v", cms, err)
		}
		ts := *(*unix.Timespec)(unsafe.Pointer(&cms[0].Data[0]))
		at = append(at, time.Unix(ts.Unix()))
	}
	if len(at) != 2*announceRounds {
		t.Fatalf("%d gratuitous ARP frames, want %d (%d rounds of a request and a reply)", len(at), 2*announceRounds, announceRounds)
	}
	for r := 1; r < announceRounds; r++ {
		if gap := at[2*r].Sub(at[2*(r-1)]); gap < announceGap*9/10 {
			t.Errorf("round %d came %s after round %d, want about %s", r+1, gap, r, announceGap)
		}
	}
	if !at[2].After(returned) {
		t.Errorf("Announce returned at %s, after its second round (%s): it waited for the repeats",
			returned.Format("15:04:05.000000"), at[2].Format("15:04:05.000000"))
	}
}
