package integration

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

var busybox = defaultRootfs + "/bin/busybox"

// inNetns runs a command in a network namespace under /run/netns.
func inNetns(ns string, args ...string) (string, error) {
	out, err := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns}, args...)...).CombinedOutput()
	return string(out), err
}

func mustNetns(t testing.TB, ns string, args ...string) {
	t.Helper()
	if out, err := inNetns(ns, args...); err != nil {
		t.Fatalf("in %s: %v: %v\n%s", ns, args, err, out)
	}
}

func mustIP(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %v: %v\n%s", args, err, out)
	}
}

// wire joins the bridges of two test hosts (network namespaces) with a veth
// pair, making one L2 segment, and returns the pair's names (in A, in B).
func wire(t testing.TB, nsA, nsB, bridge string) (string, string) {
	t.Helper()
	a, b := fmt.Sprintf("fwa%d", cgroupSeq.Add(1)), fmt.Sprintf("fwb%d", cgroupSeq.Add(1))
	mustIP(t, "link", "add", a, "type", "veth", "peer", "name", b)
	mustIP(t, "link", "set", a, "netns", nsA)
	mustIP(t, "link", "set", b, "netns", nsB)
	mustNetns(t, nsA, "ip", "link", "set", a, "master", bridge, "up")
	mustNetns(t, nsB, "ip", "link", "set", b, "master", bridge, "up")
	waitUp(t, nsA, a)
	waitUp(t, nsB, b)
	return a, b
}

func waitUp(t testing.TB, ns, link string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if out, _ := inNetns(ns, "ip", "-br", "link", "show", link); strings.Contains(out, " UP ") {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s in %s not up within 5s", link, ns)
}

// TestNetworkTwoHosts: containers on two hosts of one segment reach each
// other; an address and MAC survive a ferryd restart; an address released
// on A and re-created on B answers a third namespace within 1 s; bad
// addresses are refused; nothing is left behind.
func TestNetworkTwoHosts(t *testing.T) {
	requireHost(t)
	const subnet = "10.77.0.0/24"
	a := newDaemon(t, "a", "--subnet", subnet, "--ip-range", "10.77.0.0/26")
	b := newDaemon(t, "b", "--subnet", subnet, "--ip-range", "10.77.0.64/26")
	a.start()
	b.start()
	wire(t, a.netns, b.netns, "ferry0")

	a.mustCtl("run", "ca", "--", "sleep", "1000")
	b.mustCtl("run", "cb", "--", "sleep", "1000")
	ca, cb := a.inspect("ca"), b.inspect("cb")
	if !strings.HasPrefix(ca.IP, "10.77.0.") || !strings.HasPrefix(cb.IP, "10.77.0.") || ca.MAC == "" {
		t.Fatalf("addresses: ca %s/%s cb %s/%s", ca.IP, ca.MAC, cb.IP, cb.MAC)
	}
	ping := func(d *daemon, ctr, ip string) error {
		_, errOut, code := d.ctl("exec", ctr, "--", "ping", "-c", "1", "-W", "2", ip)
		if code != 0 {
			return fmt.Errorf("ping %s from %s: exit %d %s", ip, ctr, code, errOut)
		}
		return nil
	}
	if err := ping(a, "ca", cb.IP); err != nil {
		t.Fatal(err)
	}
	if err := ping(b, "cb", ca.IP); err != nil {
		t.Fatal(err)
	}

	// Address and MAC survive a ferryd crash and restart.
	a.kill9()
	a.start()
	if ca2 := a.inspect("ca"); ca2.IP != ca.IP || ca2.MAC != ca.MAC {
		t.Fatalf("after restart ca is %s/%s, was %s/%s", ca2.IP, ca2.MAC, ca.IP, ca.MAC)
	}
	if out := a.mustCtl("exec", "ca", "--", "ip", "-o", "link", "show", "eth0"); !strings.Contains(out, ca.MAC) {
		t.Errorf("ca's eth0 does not carry MAC %s: %s", ca.MAC, out)
	}
	if err := ping(b, "cb", ca.IP); err != nil {
		t.Fatal(err)
	}

	// A third namespace C on B's bridge talks to ca (on A) ...
	c := fmt.Sprintf("ferry-it-c-%d-%d", os.Getpid(), cgroupSeq.Add(1))
	mustIP(t, "netns", "add", c)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", c).Run() })
	cv, bv := fmt.Sprintf("fcc%d", cgroupSeq.Add(1)), fmt.Sprintf("fcb%d", cgroupSeq.Add(1))
	mustIP(t, "link", "add", cv, "type", "veth", "peer", "name", bv)
	mustIP(t, "link", "set", cv, "netns", c)
	mustIP(t, "link", "set", bv, "netns", b.netns)
	mustNetns(t, b.netns, "ip", "link", "set", bv, "master", "ferry0", "up")
	mustNetns(t, c, "ip", "addr", "add", "10.77.0.200/24", "dev", cv)
	mustNetns(t, c, "ip", "link", "set", cv, "up")
	mustNetns(t, c, "ip", "link", "set", "lo", "up")
	waitUp(t, c, cv)
	waitUp(t, b.netns, bv)
	if out, err := inNetns(c, busybox, "ping", "-c", "1", "-W", "2", ca.IP); err != nil {
		t.Fatalf("C -> ca before the move: %v %s", err, out)
	}
	// ... then the address moves: released on A, re-created on B.
	a.mustCtl("rm", "-f", "ca")
	b.mustCtl("run", "moved", "--ip", ca.IP, "--", "sleep", "1000")
	created := time.Now()
	var answered time.Duration
	for i := 0; i < 10 && answered == 0; i++ {
		if _, err := inNetns(c, busybox, "ping", "-c", "1", "-W", "1", ca.IP); err == nil {
			answered = time.Since(created)
		}
	}
	if answered == 0 || answered > time.Second {
		t.Fatalf("address %s re-created on B answered C after %v, want within 1s", ca.IP, answered)
	}
	t.Logf("address %s answered from its new host %v after ferryctl run returned", ca.IP, answered.Round(time.Millisecond))
	if m := b.inspect("moved"); m.MAC != ca.MAC {
		t.Errorf("moved MAC %s, want %s (derived from the address)", m.MAC, ca.MAC)
	}

	// Bad addresses.
	for _, tc := range []struct{ ip, code, want string }{
		{"10.99.0.5", "InvalidArgument", "10.99.0.5"},
		{cb.IP, "AlreadyExists", cb.IP},
		{"10.77.0.999", "InvalidArgument", "not an IPv4 address"},
	} {
		_, errOut, code := b.ctl("run", "badip", "--ip", tc.ip, "--", "true")
		if code == 0 || grpcCode(errOut) != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("--ip %s: exit %d %q, want %s naming %s", tc.ip, code, errOut, tc.code, tc.want)
		}
		b.assertNoTrace(t, "badip")
	}

	b.mustCtl("rm", "-f", "cb", "moved")
	for _, d := range []*daemon{a, b} {
		out, _ := inNetns(d.netns, "ip", "-br", "link")
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "fr") && !strings.HasPrefix(f[0], "ferry0") {
				t.Errorf("host %s: link %s left behind", d.name, f[0])
			}
		}
		if ents, _ := os.ReadDir(d.runDir + "/netns"); len(ents) > 0 {
			t.Errorf("host %s: netns files left: %d", d.name, len(ents))
		}
	}
}

// TestBridgeNameInUse: a bridge name held by a link that is not a bridge (a veth here)
// stops ferryd with an error naming it.
func TestBridgeNameInUse(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a", "--bridge", "notabridge")
	mustNetns(t, d.netns, "ip", "link", "add", "notabridge", "type", "veth", "peer", "name", "notabridge-p")
	out, err := runCmd("nsenter", "--net=/run/netns/"+d.netns, binDir+"/ferryd", "--root", d.root, "--run-dir", d.runDir,
		"--socket", d.socket, "--cgroup-parent", d.cgParent, "--bpf-root", d.bpfRoot, "--bridge", "notabridge")
	if err == nil || !strings.Contains(out, "notabridge") {
		t.Fatalf("ferryd with a dummy link as bridge: err %v, output %q", err, out)
	}
}

// TestPublishedPort: a published port reaches the container from another
// namespace on the segment, and its rules go with the container.
func TestPublishedPort(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a", "--subnet", "10.79.0.0/24")
	d.start()
	// Forwarding in the test host's own namespace (never the machine's).
	mustNetns(t, d.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	d.mustCtl("run", "web", "--publish", "8080:9000", "--", "sh", "-c", "while true; do echo hello-from-web | nc -l -p 9000; done")
	c := fmt.Sprintf("ferry-it-p-%d-%d", os.Getpid(), cgroupSeq.Add(1))
	mustIP(t, "netns", "add", c)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", c).Run() })
	cv, hv := fmt.Sprintf("fpc%d", cgroupSeq.Add(1)), fmt.Sprintf("fph%d", cgroupSeq.Add(1))
	mustIP(t, "link", "add", cv, "type", "veth", "peer", "name", hv)
	mustIP(t, "link", "set", cv, "netns", c)
	mustIP(t, "link", "set", hv, "netns", d.netns)
	mustNetns(t, d.netns, "ip", "link", "set", hv, "master", "ferry0", "up")
	mustNetns(t, c, "ip", "addr", "add", "10.79.0.200/24", "dev", cv)
	mustNetns(t, c, "ip", "link", "set", cv, "up")
	waitUp(t, c, cv)
	var out string
	var err error
	for i := 0; i < 20; i++ {
		out, err = inNetns(c, "timeout", "3", busybox, "nc", "10.79.0.1", "8080")
		if strings.Contains(out, "hello-from-web") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(out, "hello-from-web") {
		t.Fatalf("published port 8080 of the gateway did not reach the container: %v %q", err, out)
	}
	if rules, _ := inNetns(d.netns, "iptables-save"); !strings.Contains(rules, "FERRY-PORTS") || !strings.Contains(rules, "9000") {
		t.Errorf("no DNAT rule for the published port:\n%s", rules)
	}
	d.mustCtl("rm", "-f", "web")
	if rules, _ := inNetns(d.netns, "iptables-save"); strings.Contains(rules, "--dport 8080") {
		t.Errorf("the published port's rule outlived the container:\n%s", rules)
	}
	d.assertNoTrace(t, "web")
	if _, errOut, code := d.ctl("run", "bad", "--publish", "99999:80"); code == 0 || grpcCode(errOut) != "InvalidArgument" || !strings.Contains(errOut, `"99999:80"`) {
		t.Errorf("bad --publish: exit %d %q", code, errOut)
	}
}
