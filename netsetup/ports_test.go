package netsetup

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ferry-agent/ferry/internal/testenv"
)

func TestValidPorts(t *testing.T) {
	ok := []Port{{Proto: "tcp", HostPort: 8080, ContainerPort: 80}, {Proto: "udp", HostPort: 8080, ContainerPort: 53},
		{Proto: "tcp", HostPort: 9000, ContainerPort: 90, HostIP: netip.MustParseAddr("192.0.2.1")}}
	if err := validPorts("c", ok); err != nil {
		t.Fatal(err)
	}
	for name, ps := range map[string][]Port{
		"proto":      {{Proto: "sctp", HostPort: 1, ContainerPort: 1}},
		"zero":       {{Proto: "tcp", HostPort: 0, ContainerPort: 1}},
		"v6 host ip": {{Proto: "tcp", HostPort: 1, ContainerPort: 1, HostIP: netip.MustParseAddr("::1")}},
		"twice":      {{Proto: "tcp", HostPort: 1, ContainerPort: 1}, {Proto: "tcp", HostPort: 1, ContainerPort: 2, HostIP: netip.MustParseAddr("192.0.2.1")}},
	} {
		if err := validPorts("c", ps); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

// TestPublishedPorts: a client namespace reaches a container's port through
// host a's address; the rules live in ferry's chain inside a's namespace and
// go with the container. The machine's own tables get none of them.
func TestPublishedPorts(t *testing.T) {
	root := testRoot(t)
	ipt := testenv.RequireBinary(t, "iptables")
	// Other packages' tests may run at the same time, so look for ferry's
	// traces in the machine's own tables rather than compare them whole.
	t.Cleanup(func() {
		if tables := machineTables(t, ipt); strings.Contains(tables, "FERRY") || strings.Contains(tables, aliasPfx) {
			t.Errorf("ferry's rules reached the machine's own iptables:\n%s", tables)
		}
	})
	h := newTestHost(t, root, "a", testSubnet, rangeA)
	// A client on another link of host a: 192.0.2.2 -> a's 192.0.2.1.
	clientNS := testNetns(t, root+"/hosts", "client")
	func() {
		ns, err := netns.GetFromPath(clientNS)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = ns.Close() }()
		attrs := netlink.NewLinkAttrs()
		attrs.Name = "ext0"
		if err := h.m.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns)), PeerTxQLen: -1}); err != nil {
			t.Fatal(err)
		}
	}()
	addUp(t, h.netns, "ext0", "192.0.2.1/24")
	addUp(t, clientNS, "eth0", "192.0.2.2/24")
	waitOperUp(t, h.m.host, "ext0")
	writeSysctl(t, h.netns, "net/ipv4/ip_forward", "1") // a's namespace only

	ports := []Port{{Proto: "tcp", HostPort: 8080, ContainerPort: 80}}
	ep := h.setup(t, "web", SetupOptions{Ports: ports})
	if len(ep.Ports) != 1 || ep.Ports[0] != ports[0] {
		t.Fatalf("endpoint ports %v", ep.Ports)
	}
	ln := listenIn(t, ep.NetnsPath, "tcp4", ":80")
	if err := dialAndRead(t, clientNS, ln, "192.0.2.1:8080"); err != nil {
		t.Fatalf("client -> a:8080 -> web:80: %v", err)
	}
	if err := dialAndRead(t, h.netns, ln, "192.0.2.1:8080"); err != nil {
		t.Fatalf("a itself -> a:8080 -> web:80: %v", err)
	}

	// The same host port again: refused, nothing left.
	before := snapshot(t, h)
	if _, err := h.m.Setup(t.Context(), "web2", SetupOptions{Ports: []Port{{Proto: "tcp", HostPort: 8080, ContainerPort: 81}}}); !errors.Is(err, ErrInUse) {
		t.Fatalf("second publisher of 8080/tcp: %v, want ErrInUse", err)
	}
	if after := snapshot(t, h); after != before {
		t.Fatalf("refused Setup left:\n%s\nwas\n%s", after, before)
	}

	// A rule of a container that is gone, made by hand: Reconcile removes it.
	if _, err := h.m.iptables("-t", "nat", "-A", chainPorts, "-p", "tcp", "-m", "tcp", "--dport", "9999", "-m", "comment",
		"--comment", "ferry:ghost", "-j", "DNAT", "--to-destination", "10.199.0.9:80"); err != nil {
		t.Fatal(err)
	}
	rules, _ := h.m.iptables("-t", "nat", "-S")
	t.Logf("a's nat table:\n%s", rules)
	removed, err := h.m.Reconcile(t.Context(), []string{"web"})
	if err != nil || len(removed) != 1 || removed[0].Kind != "port" || removed[0].ID != "ghost" {
		t.Fatalf("Reconcile: %v, %v; want the ghost's port rule", removed, err)
	}

	h.teardown(t, "web")
	if rules, _ := h.m.iptables("-t", "nat", "-S", chainPorts); strings.Contains(rules, "ferry:") {
		t.Fatalf("rules left after teardown:\n%s", rules)
	}
	if err := dialAndRead(t, clientNS, ln, "192.0.2.1:8080"); err == nil {
		t.Fatalf("port still published after teardown")
	}
}

func machineTables(t *testing.T, ipt string) string {
	t.Helper()
	var b strings.Builder
	for _, table := range []string{"nat", "filter"} {
		out, err := exec.Command(ipt, "-w", "5", "-t", table, "-S").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables -t %s -S: %v: %s", table, err, out)
		}
		b.Write(out)
	}
	return b.String()
}

func addUp(t *testing.T, nsPath, link, cidr string) {
	t.Helper()
	withHandle(t, nsPath, func(h *netlink.Handle) {
		l, err := h.LinkByName(link)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipNet(netip.MustParsePrefix(cidr))}); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	})
}

// listenIn opens a listener inside the namespace at nsPath (the socket is
// made on a thread in that namespace and stays there).
func listenIn(t *testing.T, nsPath, network, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := inNetns(nsPath, func() (err error) { ln, err = net.Listen(network, addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	return ln
}

// dialAndRead connects from the namespace at nsPath to addr and expects
// ln to accept it and say hello. Bounded: 2 s.
func dialAndRead(t *testing.T, nsPath string, ln net.Listener, addr string) error {
	t.Helper()
	accepted := make(chan error, 1)
	go func() {
		_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(2 * time.Second))
		c, err := ln.Accept()
		if err == nil {
			_, err = c.Write([]byte("hello"))
			_ = c.Close()
		}
		accepted <- err
	}()
	var conn net.Conn
	err := inNetns(nsPath, func() (err error) { conn, err = net.DialTimeout("tcp4", addr, time.Second); return err })
	if err != nil {
		_ = ln.(*net.TCPListener).SetDeadline(time.Now()) // end the Accept now
		if err := <-accepted; err != nil {
			t.Logf("accept: %v", err)
		}
		return err
	}
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	got, err := io.ReadAll(conn)
	if aerr := <-accepted; aerr != nil {
		return aerr
	}
	if err != nil || string(got) != "hello" {
		return errors.Join(err, errors.New("read "+string(got)))
	}
	return nil
}
