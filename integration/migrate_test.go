package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/pki"
)

// migrationPair is two test hosts on one segment, each a network namespace
// with its own bridge and a ferryd listening with mutual TLS on its bridge
// address, and a client namespace C on A's bridge.
type migrationPair struct {
	a, b         *daemon
	addrA, addrB string
	client       string
}

func newMigrationPair(t *testing.T) *migrationPair {
	t.Helper()
	requireHost(t)
	const subnet = "10.78.0.0/24"
	now := time.Now()
	pkiDir := t.TempDir()
	ca, _, err := pki.LoadOrCreateCA(pkiDir, now)
	if err != nil {
		t.Fatal(err)
	}
	dirA, err := ca.IssueNode(pkiDir, "host-a", []string{"10.78.0.1"}, 0, now)
	if err != nil {
		t.Fatal(err)
	}
	dirB, err := ca.IssueNode(pkiDir, "host-b", []string{"10.78.0.64"}, 0, now)
	if err != nil {
		t.Fatal(err)
	}
	p := &migrationPair{addrA: "10.78.0.1:7443", addrB: "10.78.0.64:7443"}
	p.a = newDaemon(t, "host-a", "--subnet", subnet, "--ip-range", "10.78.0.0/26", "--listen", p.addrA, "--tls-dir", dirA,
		"--pressure-source", "parent")
	p.b = newDaemon(t, "host-b", "--subnet", subnet, "--ip-range", "10.78.0.64/26", "--listen", p.addrB, "--tls-dir", dirB,
		"--pressure-source", "parent")
	p.a.start()
	p.b.start()
	wire(t, p.a.netns, p.b.netns, "ferry0")

	p.client = fmt.Sprintf("ferry-it-cl-%d-%d", os.Getpid(), cgroupSeq.Add(1))
	mustIP(t, "netns", "add", p.client)
	ns := p.client
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	cv, av := fmt.Sprintf("fcl%d", cgroupSeq.Add(1)), fmt.Sprintf("fca%d", cgroupSeq.Add(1))
	mustIP(t, "link", "add", cv, "type", "veth", "peer", "name", av)
	mustIP(t, "link", "set", cv, "netns", p.client)
	mustIP(t, "link", "set", av, "netns", p.a.netns)
	mustNetns(t, p.a.netns, "ip", "link", "set", av, "master", "ferry0", "up")
	mustNetns(t, p.client, "ip", "addr", "add", "10.78.0.200/24", "dev", cv)
	mustNetns(t, p.client, "ip", "link", "set", cv, "up")
	mustNetns(t, p.client, "ip", "link", "set", "lo", "up")
	waitUp(t, p.client, cv)
	waitUp(t, p.a.netns, av)
	return p
}

// lineCollector keeps the lines a client reads, with the time each arrived.
type lineCollector struct {
	mu    sync.Mutex
	lines []string
	times []time.Time
	done  chan struct{}
}

func (l *lineCollector) snapshot() ([]string, []time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...), append([]time.Time(nil), l.times...)
}

// connect opens a TCP connection from the client namespace and collects
// what the server sends, until the test ends.
func (p *migrationPair) connect(t *testing.T, ip string, port int) *lineCollector {
	t.Helper()
	cmd := exec.Command("nsenter", "--net=/run/netns/"+p.client, busybox, "nc", ip, strconv.Itoa(port))
	// Keep the client's stdin open: at EOF nc would half-close the
	// connection and the server's nc would end.
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stdin.Close() })
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	l := &lineCollector{done: make(chan struct{})}
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			l.mu.Lock()
			l.lines = append(l.lines, sc.Text())
			l.times = append(l.times, time.Now())
			l.mu.Unlock()
		}
	}()
	return l
}

func ticks(lines []string) []int {
	var out []int
	for _, s := range lines {
		if v, ok := strings.CutPrefix(s, "tick "); ok {
			if n, err := strconv.Atoi(v); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// server counts into its log and, on port 9000, into a TCP connection.
const server = `(i=0; while true; do i=$((i+1)); echo "count $i"; sleep 0.1; done) &
j=0; while true; do j=$((j+1)); echo "tick $j"; sleep 0.05; done | nc -l -p 9000`

// TestMigrateStopAndCopy: a container with a counting process and an open
// TCP connection to a client moves from A to B. Afterwards exactly one copy
// runs, on B, with the same address; the counter went on; the connection is
// still open and carries data; logs go on; the guarantee, ceiling and
// sysctl guard came along; nothing of it is left on A.
func TestMigrateStopAndCopy(t *testing.T) {
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--mem-guarantee", "32M", "--mem-limit", "128M", "--cpu-guarantee", "0.25", "--cpu-limit", "1",
		"--", "sh", "-c", server)
	before := p.a.inspect("srv")
	time.Sleep(500 * time.Millisecond)
	conn := p.connect(t, before.IP, 9000)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if l, _ := conn.snapshot(); len(ticks(l)) >= 10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("client received no ticks before the migration")
		}
		time.Sleep(50 * time.Millisecond)
	}
	countBefore := lastCount(t, p.a, "srv")

	out, errOut, code := p.a.ctl("migrate", "srv", "--to", p.addrB)
	if code != 0 {
		t.Fatalf("migrate: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("ferryctl migrate:\n%s", out)

	// Exactly one copy, on B.
	if _, errOut, _ := p.a.ctl("inspect", "srv"); grpcCode(errOut) != "NotFound" {
		t.Errorf("A still knows srv: %q", errOut)
	}
	if pidAlive(before.Pid) {
		t.Errorf("A's init pid %d still alive", before.Pid)
	}
	after := p.b.inspect("srv")
	if after.State != "running" || after.IP != before.IP || after.MAC != before.MAC {
		t.Fatalf("on B: %s %s/%s, want running %s/%s", after.State, after.IP, after.MAC, before.IP, before.MAC)
	}
	if after.Guarantee.Memory != 32<<20 || after.Ceiling.CPU != 1 {
		t.Errorf("on B: guarantee %+v ceiling %+v", after.Guarantee, after.Ceiling)
	}
	if _, err := os.Stat(filepath.Join(p.b.bpfRoot, "srv")); err != nil {
		t.Errorf("no sysctl guard pinned for srv on B: %v", err)
	}
	// The counter went on (no restart) and the log came along.
	if c := waitCountAbove(t, p.b, "srv", countBefore, 10*time.Second); c <= countBefore {
		t.Fatalf("count on B %d, was %d on A", c, countBefore)
	}
	if logs := p.b.mustCtl("logs", "srv"); !strings.Contains(logs, "count 1\n") {
		t.Errorf("B's log lacks the output from before the migration")
	}
	// The TCP connection is still open and carries data, in sequence.
	n0 := len(ticks(func() []string { l, _ := conn.snapshot(); return l }()))
	deadline = time.Now().Add(10 * time.Second)
	for len(ticks(func() []string { l, _ := conn.snapshot(); return l }())) < n0+20 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	lines, times := conn.snapshot()
	tk := ticks(lines)
	if len(tk) < n0+20 {
		t.Fatalf("the connection carried %d ticks after the migration, want 20 more (connection lost?)", len(tk)-n0)
	}
	var maxGap time.Duration
	for i := 1; i < len(tk); i++ {
		if tk[i] != tk[i-1]+1 {
			t.Fatalf("ticks out of sequence: %d after %d", tk[i], tk[i-1])
		}
		if g := times[i].Sub(times[i-1]); g > maxGap {
			maxGap = g
		}
	}
	t.Logf("largest gap the client saw: %v", maxGap.Round(time.Millisecond))

	var ms []struct {
		State    string `json:"state"`
		FrozenMs int64  `json:"frozen_ms"`
		Bytes    int64  `json:"bytes_sent"`
	}
	if err := json.Unmarshal([]byte(p.a.mustCtl("migrations", "-o", "json")), &ms); err != nil || len(ms) != 1 || ms[0].State != "succeeded" {
		t.Fatalf("migrations on A: %+v %v", ms, err)
	}
	t.Logf("frozen %d ms, %d bytes sent", ms[0].FrozenMs, ms[0].Bytes)
	p.a.assertNoTrace(t, "srv")
	p.b.mustCtl("rm", "-f", "srv")
	p.b.assertNoTrace(t, "srv")
}
