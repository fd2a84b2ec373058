package netsetup

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// Root integration tests never touch the machine's own network namespace:
// every "host" is a network namespace the test creates (bind-mounted under
// the test's temp dir, not /run/netns), with its own bridge, and traffic
// only flows between namespaces the test made. Every loop is bounded.

// testRoot needs root and returns a temp dir whose mounts, netns threads
// and namespace fds are checked at the very end: nothing may be left.
func testRoot(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t)
	root := t.TempDir()
	netFDs := netnsFDs(t)
	t.Cleanup(func() { // runs after every cleanup registered later
		if ms := mountsUnder(t, root); len(ms) > 0 {
			t.Errorf("mounts left under %s: %v", root, ms)
		}
		if extra := slices.DeleteFunc(netnsFDs(t), func(s string) bool { return slices.Contains(netFDs, s) }); len(extra) > 0 {
			t.Errorf("network namespace fds left open: %v", extra)
		}
		var th []string
		for i := 0; i < 50; i++ { // a discarded thread may take a moment to exit
			if th = threadsInOtherNetns(t); len(th) == 0 {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if len(th) > 0 {
			t.Errorf("threads left in another netns: %v", th)
		}
	})
	return root
}

// testNetns creates a network namespace bound at dir/name and removes it
// in t.Cleanup, also when the test fails.
func testNetns(t *testing.T, dir, name string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := createNetns(p); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := removeNetns(p); err != nil {
			t.Errorf("remove test netns: %v", err)
		}
	})
	return p
}

type testHost struct {
	name  string
	netns string
	cfg   Config
	m     *Manager
}

// newTestHost makes a "host": a netns with a Manager working in it, a bridge
// "fbr-<name>" and its own run and state dirs. At cleanup it checks that the
// test left no endpoint, netns file, ferry veth or address behind (and, if
// the test failed, removes whatever is left before the netns goes).
func newTestHost(t *testing.T, root, name, subnet, ipRange string) *testHost {
	t.Helper()
	h := &testHost{name: name, netns: testNetns(t, filepath.Join(root, "hosts"), name)}
	h.cfg = Config{
		Bridge: "fbr-" + name, Subnet: netip.MustParsePrefix(subnet),
		RunDir: filepath.Join(root, name, "run"), StateDir: filepath.Join(root, name, "state"),
		HostNetns: h.netns,
	}
	if ipRange != "" {
		h.cfg.IPRange = netip.MustParsePrefix(ipRange)
	}
	netnsDir := filepath.Join(h.cfg.RunDir, netnsSubdir)
	t.Cleanup(func() { // New made the dir a (shared) mount point
		if err := unix.Unmount(netnsDir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			t.Errorf("unmount %s: %v", netnsDir, err)
		}
	})
	m, err := New(h.cfg, testLog(t))
	if err != nil {
		t.Fatalf("host %s: New: %v", name, err)
	}
	h.m, h.cfg = m, m.Config()
	t.Cleanup(m.Close)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		if o, err := m.Reconcile(context.Background(), nil); err != nil || len(o) > 0 {
			t.Logf("host %s: after failure removed %v (err %v)", name, o, err)
		}
		_ = m.st.update(func(s *state) error { clear(s.Moved); return nil })
	})
	t.Cleanup(func() { h.assertClean(t) })
	return h
}

// assertClean: no endpoint or reservation in the state, no file under the
// netns dir, no veth of ferry's in the host namespace.
func (h *testHost) assertClean(t *testing.T) {
	t.Helper()
	s, err := h.m.st.read()
	if err != nil {
		t.Errorf("host %s: %v", h.name, err)
		return
	}
	if len(s.Endpoints) > 0 || len(s.Moved) > 0 {
		t.Errorf("host %s: left in state: endpoints %v moved %v", h.name, sortedKeys(s.Endpoints), s.Moved)
	}
	if ents, _ := os.ReadDir(filepath.Join(h.cfg.RunDir, netnsSubdir)); len(ents) > 0 {
		t.Errorf("host %s: netns files left: %v", h.name, ents)
	}
	for _, l := range h.links(t) {
		if strings.HasPrefix(l.Attrs().Name, vethPrefix) || strings.HasPrefix(l.Attrs().Alias, aliasPfx) {
			t.Errorf("host %s: link left: %s (%s, alias %q)", h.name, l.Attrs().Name, l.Type(), l.Attrs().Alias)
		}
	}
}

func (h *testHost) links(t *testing.T) []netlink.Link {
	t.Helper()
	ls, err := retryDump(h.m.host.LinkList)
	if err != nil {
		t.Fatalf("host %s: list links: %v", h.name, err)
	}
	return ls
}

func (h *testHost) link(t *testing.T, name string) netlink.Link {
	t.Helper()
	l, err := h.m.host.LinkByName(name)
	if err != nil {
		t.Fatalf("host %s: link %s: %v", h.name, name, err)
	}
	return l
}

func (h *testHost) setup(t *testing.T, id string, opts SetupOptions) *Endpoint {
	t.Helper()
	ep, err := h.m.Setup(t.Context(), id, opts)
	if err != nil {
		t.Fatalf("host %s: Setup %s: %v", h.name, id, err)
	}
	return ep
}

func (h *testHost) teardown(t *testing.T, id string) {
	t.Helper()
	if err := h.m.Teardown(context.Background(), id); err != nil {
		t.Errorf("host %s: Teardown %s: %v", h.name, id, err)
	}
}

// wire joins two hosts' bridges with a veth pair: one L2 segment.
func wire(t *testing.T, a, b *testHost) {
	t.Helper()
	nb, err := netns.GetFromPath(b.netns)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = nb.Close() }()
	attrs := netlink.NewLinkAttrs()
	attrs.Name = "wire-" + b.name
	err = a.m.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "wire-" + a.name, PeerNamespace: netlink.NsFd(int(nb)), PeerTxQLen: -1})
	if err != nil {
		t.Fatalf("wire: %v", err)
	}
	for _, end := range []struct {
		h    *testHost
		name string
	}{{a, "wire-" + b.name}, {b, "wire-" + a.name}} {
		l := end.h.link(t, end.name)
		if err := end.h.m.host.LinkSetMaster(l, end.h.link(t, end.h.cfg.Bridge)); err != nil {
			t.Fatal(err)
		}
		if err := end.h.m.host.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	// The two ends have the same ifindex in their namespaces, which makes
	// the kernel treat their carrier changes as not urgent: linkwatch may
	// take up to a second to set them (and the bridge ports) operational.
	waitOperUp(t, a.m.host, "wire-"+b.name)
	waitOperUp(t, b.m.host, "wire-"+a.name)
}

// waitOperUp waits (at most 3 s) until link name is operationally up.
func waitOperUp(t *testing.T, h *netlink.Handle, name string) {
	t.Helper()
	for i := 0; i < 300; i++ {
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if l.Attrs().OperState == netlink.OperUp {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("link %s not operational after 3 s", name)
}

// neighbour makes a plain namespace attached to host h's bridge with
// address addr: another machine on the segment, next to h.
func neighbour(t *testing.T, root string, h *testHost, name, addr string) string {
	t.Helper()
	p := testNetns(t, filepath.Join(root, "hosts"), name)
	ns, err := netns.GetFromPath(p)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ns.Close() }()
	nh, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	attrs := netlink.NewLinkAttrs()
	attrs.Name = "nbr-" + name
	if err := h.m.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns)), PeerTxQLen: -1}); err != nil {
		t.Fatal(err)
	}
	l := h.link(t, attrs.Name)
	if err := errors.Join(h.m.host.LinkSetMaster(l, h.link(t, h.cfg.Bridge)), h.m.host.LinkSetUp(l)); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"lo", "eth0"} {
		l, err := nh.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if n == "eth0" {
			pfx := netip.PrefixFrom(netip.MustParseAddr(addr), h.cfg.Subnet.Bits())
			if err := nh.AddrAdd(l, &netlink.Addr{IPNet: ipNet(pfx)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := nh.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	waitOperUp(t, nh, "eth0")
	waitOperUp(t, h.m.host, attrs.Name)
	return p
}

// pinger sends ICMP echo requests from inside a network namespace.
type pinger struct {
	fd        int
	id        uint16
	seq       uint16
	lastReply time.Time // when the last reply arrived
}

func newPinger(t *testing.T, nsPath string) *pinger {
	t.Helper()
	p := &pinger{id: uint16(os.Getpid()) ^ uint16(time.Now().UnixNano())}
	err := inNetns(nsPath, func() error {
		var err error
		p.fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		return err
	})
	if err != nil {
		t.Fatalf("ping socket in %s: %v", nsPath, err)
	}
	t.Cleanup(func() { _ = unix.Close(p.fd) })
	return p
}

// ping sends one echo request and waits up to timeout for its reply.
func (p *pinger) ping(dst netip.Addr, timeout time.Duration) bool {
	p.seq++
	msg := make([]byte, 16)
	msg[0] = 8 // echo request
	binary.BigEndian.PutUint16(msg[4:], p.id)
	binary.BigEndian.PutUint16(msg[6:], p.seq)
	binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
	if err := unix.Sendto(p.fd, msg, 0, &unix.SockaddrInet4{Addr: dst.As4()}); err != nil {
		// EHOSTUNREACH and friends: no reply. Sleep so a caller's loop keeps its pace.
		time.Sleep(timeout)
		return false
	}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 1500)
	for i := 0; i < 1000; i++ {
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		// poll, not SO_RCVTIMEO: socket timeouts count in jiffies (4 ms at
		// HZ=250) and would blur the measurement.
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(fds, int((left+time.Millisecond-1)/time.Millisecond)); err != nil || n == 0 {
			continue
		}
		n, from, err := unix.Recvfrom(p.fd, buf, unix.MSG_DONTWAIT)
		if err != nil {
			continue
		}
		src, ok := from.(*unix.SockaddrInet4)
		if !ok || netip.AddrFrom4(src.Addr) != dst || n < 20 {
			continue
		}
		icmp := buf[int(buf[0]&0x0f)*4 : n]
		if len(icmp) >= 8 && icmp[0] == 0 && binary.BigEndian.Uint16(icmp[4:]) == p.id && binary.BigEndian.Uint16(icmp[6:]) == p.seq {
			p.lastReply = time.Now()
			return true
		}
	}
	return false
}

// firstReply pings dst every interval until a reply or until limit; it
// returns the time to the first reply.
func (p *pinger) firstReply(dst netip.Addr, limit, interval time.Duration) (time.Duration, bool) {
	start := time.Now()
	for i := 0; i < int(limit/interval)+1; i++ {
		if p.ping(dst, interval) {
			return time.Since(start), true
		}
		if time.Since(start) >= limit {
			break
		}
	}
	return time.Since(start), false
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func mustPing(t *testing.T, p *pinger, dst netip.Addr, what string) {
	t.Helper()
	if _, ok := p.firstReply(dst, 2*time.Second, 100*time.Millisecond); !ok {
		t.Fatalf("%s: no reply from %s within 2 s", what, dst)
	}
}

// writeSysctl writes a /proc/sys/net key inside the namespace at nsPath.
func writeSysctl(t *testing.T, nsPath, key, val string) {
	t.Helper()
	err := inNetns(nsPath, func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(val), 0o644)
	})
	if err != nil {
		t.Fatalf("sysctl %s=%s in %s: %v", key, val, nsPath, err)
	}
}

// fdbPort returns the name of the bridge port h's bridge forwards mac to.
func (h *testHost) fdbPort(t *testing.T, mac net.HardwareAddr) string {
	t.Helper()
	br := h.link(t, h.cfg.Bridge)
	ns, err := retryDump(func() ([]netlink.Neigh, error) { return h.m.host.NeighList(0, unix.AF_BRIDGE) })
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if n.HardwareAddr.String() == mac.String() && n.MasterIndex == br.Attrs().Index {
			if l, err := h.m.host.LinkByIndex(n.LinkIndex); err == nil {
				return l.Attrs().Name
			}
		}
	}
	return ""
}

func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 4 && (fs[4] == dir || strings.HasPrefix(fs[4], dir+"/")) {
			out = append(out, fs[4])
		}
	}
	return out
}

func netnsFDs(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "net:[") {
			out = append(out, e.Name()+"->"+l)
		}
	}
	return out
}

func threadsInOtherNetns(t *testing.T) []string {
	t.Helper()
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	var out []string
	for _, tk := range tasks {
		if l, err := os.Readlink(fmt.Sprintf("/proc/self/task/%s/ns/net", tk.Name())); err == nil && l != self {
			out = append(out, tk.Name()+":"+l)
		}
	}
	return out
}

var errNotMounted = errors.New("not mounted")

func unmount(p string) error {
	err := unix.Unmount(p, unix.MNT_DETACH)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return errNotMounted
	}
	return err
}
