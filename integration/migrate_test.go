package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/agent/client"
	"github.com/ferry-agent/ferry/internal/pki"
	"github.com/ferry-agent/ferry/internal/privnet"
	"github.com/ferry-agent/ferry/internal/testenv"
)

// migrationPair is two test hosts on one segment, each a network namespace
// with its own bridge and a ferryd listening with mutual TLS on its bridge
// address, and a client namespace C on A's bridge.
type migrationPair struct {
	a, b         *daemon
	addrA, addrB string
	client       string
	wireA        string // A's end of the wire between the hosts
	ca           *pki.CA
	pkiDir       string
	afterRun     func(t testing.TB) // migrateLive: after the container starts on A
}

func newMigrationPair(t testing.TB) *migrationPair {
	t.Helper()
	return newMigrationPairWith(t, true)
}

// newMigrationPairWith makes the pair; smallB makes B the small node
// newMigrationPair has (the benchmarks want it as large as A), and extraB
// adds flags to B's ferryd.
func newMigrationPairWith(t testing.TB, smallB bool, extraB ...string) *migrationPair {
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
	p := &migrationPair{addrA: "10.78.0.1:7443", addrB: "10.78.0.64:7443", ca: ca, pkiDir: pkiDir}
	p.a = newDaemon(t, "host-a", "--subnet", subnet, "--ip-range", "10.78.0.0/26", "--listen", p.addrA, "--tls-dir", dirA,
		"--pressure-source", "parent")
	// B is a small node in ferry's accounting (124 MiB allocatable), so a
	// test can make it refuse a guarantee A admitted.
	flagsB := []string{"--subnet", subnet, "--ip-range", "10.78.0.64/26", "--listen", p.addrB, "--tls-dir", dirB, "--pressure-source", "parent"}
	if smallB {
		flagsB = append(flagsB, "--capacity-memory", "1G", "--reserve-memory", "900M", "--reserve-cpu", "0.1")
	}
	p.b = newDaemon(t, "host-b", append(flagsB, extraB...)...)
	p.a.start()
	p.b.start()
	p.wireA, _ = wire(t, p.a.netns, p.b.netns, "ferry0")

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

// cutWire takes A's end of the wire between the hosts down and returns
// what brings it up again, once; that also runs when t ends, so that a
// test that fails with the wire cut leaves it up for the next.
func (p *migrationPair) cutWire(t testing.TB) (heal func()) {
	t.Helper()
	mustNetns(t, p.a.netns, "ip", "link", "set", p.wireA, "down")
	var once sync.Once
	heal = func() { once.Do(func() { mustNetns(t, p.a.netns, "ip", "link", "set", p.wireA, "up") }) }
	t.Cleanup(heal)
	return heal
}

// waitRunning waits until d runs name (d may not know it yet).
func waitRunning(t testing.TB, d *daemon, name string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if _, _, code := d.ctl("inspect", name); code == 0 && d.inspect(name).State == "running" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never ran on %s", name, d.name)
		}
		time.Sleep(50 * time.Millisecond)
	}
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
func (p *migrationPair) connect(t testing.TB, ip string, port int) *lineCollector {
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
//
// Both ways a stop-and-copy moves pages: a small container (this one, ~45
// MiB) is dumped to disk and its images sent after; from
// --stopcopy-stream-min on, the pages stream to the peer's page server
// during the dump.
func TestMigrateStopAndCopy(t *testing.T) {
	p := newMigrationPair(t)
	for _, streamed := range []bool{false, true} {
		name := "dumped, then sent"
		if streamed {
			name = "streamed during the dump"
			defer streamStopCopy(p.a)()
		}
		t.Run(name, func(t *testing.T) {
			rec := migrateLive(t, p, "stopcopy")
			if rec.PostcopyMs != 0 {
				t.Errorf("stop-and-copy recorded post-copy figures: %+v", rec)
			}
			// The 16 MiB blob is ~22 MB of base64 in memory; what moved
			// is that and little more, counted once.
			if rec.BytesSent < 16<<20 || rec.BytesSent > 32<<20 {
				t.Errorf("%d bytes sent, want the blob's ~22 MB and a little more", rec.BytesSent)
			}
			if got := strings.Contains(rec.ModeReason, "pages stream to the peer during the dump"); got != streamed {
				t.Errorf("mode reason %q: streamed %v, want %v", rec.ModeReason, got, streamed)
			}
		})
	}
}

// streamStopCopy restarts d so that its stop-and-copies stream every
// container's pages during the dump (--stopcopy-stream-min 0); the
// returned func restarts it as it was.
func streamStopCopy(d *daemon) (undo func()) {
	n := len(d.extra)
	d.extra = append(d.extra[:n:n], "--stopcopy-stream-min", "0")
	d.restartWith(d.failpoints)
	return func() {
		d.extra = d.extra[:n]
		d.restartWith(d.failpoints)
	}
}

// TestMigratePostCopy: the same story in post-copy. The container's memory
// stays on A while it already runs on B, which fetches each page on fault
// (and the rest in the background) through the tunnel in the mutual-TLS
// channel; a 16 MiB random blob held in the shell's memory keeps its
// checksum across the move.
func TestMigratePostCopy(t *testing.T) {
	raisePipeMax(t)
	p := newMigrationPair(t)
	rec := migrateLive(t, p, "postcopy")
	if rec.PostcopyMs <= 0 || rec.PostcopyBytes < 16<<20 {
		t.Errorf("post-copy figures: %d ms, %d page bytes through the tunnel; want > 0 ms and the blob's 16 MiB at least", rec.PostcopyMs, rec.PostcopyBytes)
	}
	// B read the pages ahead of CRIU's lazy-pages daemon: most of the blob
	// came in requests of B's own, and the daemon found most of its pages
	// there when it asked.
	re := regexp.MustCompile(`msg="post-copy page tunnel ended".* err=<nil> daemon_requests=(\d+) .*found_here=(\d+) .*ahead_mib=(\d+)`)
	var m [][]byte
	for deadline := time.Now().Add(5 * time.Second); m == nil; time.Sleep(50 * time.Millisecond) {
		b, err := os.ReadFile(p.b.logPath)
		if err != nil {
			t.Fatal(err)
		}
		if m = re.FindSubmatch(b); m == nil && time.Now().After(deadline) {
			t.Fatalf("B's log has no successful page tunnel:\n%s", lastLines(string(b), 20))
		}
	}
	asked, _ := strconv.Atoi(string(m[1]))
	here, _ := strconv.Atoi(string(m[2]))
	ahead, _ := strconv.Atoi(string(m[3]))
	if ahead < 12 || here < asked/2 {
		t.Errorf("read-ahead: %d MiB ahead, the daemon found %d of its %d requests' pages waiting; want 12 MiB and half at least", ahead, here, asked)
	}
}

// TestMigratePostCopyWithoutCriuConf: a container made before ferry named a
// CRIU configuration file of its own (no org.criu.config label in its
// libcontainer state) migrates in post-copy all the same, through
// libcontainer's own options (and CRIU's own network lock).
func TestMigratePostCopyWithoutCriuConf(t *testing.T) {
	raisePipeMax(t)
	p := newMigrationPair(t)
	p.afterRun = func(t testing.TB) {
		f := filepath.Join(p.a.runDir, "libcontainer", "srv", "state.json")
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var st map[string]any
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatal(err)
		}
		cfg, _ := st["config"].(map[string]any)
		labels, _ := cfg["labels"].([]any)
		var kept []any
		for _, l := range labels {
			if s, _ := l.(string); !strings.HasPrefix(s, "org.criu.config=") {
				kept = append(kept, l)
			}
		}
		if len(kept) == len(labels) {
			t.Fatalf("srv's libcontainer state has no org.criu.config label: %v", labels)
		}
		cfg["labels"] = kept
		if b, err = json.Marshal(st); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	rec := migrateLive(t, p, "postcopy")
	if rec.PostcopyMs <= 0 || rec.PostcopyBytes < 16<<20 {
		t.Errorf("post-copy figures: %d ms, %d page bytes through the tunnel", rec.PostcopyMs, rec.PostcopyBytes)
	}
}

// TestVMMigratePreCopy (the VM tier: it needs soft-dirty) is the story in
// pre-copy: pre-dump rounds while the container runs, then a short freeze.
// The workload writes a 2 MiB random blob once and otherwise dirties little
// (counters), and sums the blob when asked (a file made by ferryctl exec),
// so the rounds see a low dirty rate. With a 1 ms target no round's
// prediction fits, so the rounds go on while they shrink, up to
// --max-rounds 3: at least two run, the second writes fewer pages than the
// first and skips pages of it, and the final dump leaves pages to its
// parents (pages_skipped_parent > 0: not a silent full dump). Afterwards
// one copy runs, on B, with its address, its TCP connection, its counter
// and its blob intact.
func TestVMMigratePreCopy(t *testing.T) {
	requireSoftDirty(t)
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--mem-guarantee", "32M", "--mem-limit", "128M", "--cpu-guarantee", "0.25", "--cpu-limit", "1",
		"--", "sh", "-c", onDemandBlobServer)
	before := p.a.inspect("srv")
	sum := waitFirstSum(t, p.a, "srv", 90*time.Second)
	conn := p.connect(t, before.IP, 9000)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if l, _ := conn.snapshot(); len(ticks(l)) >= 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("client received no ticks before the migration")
		}
	}
	countBefore := lastCount(t, p.a, "srv")

	out, errOut, code := p.a.ctlWithin(10*time.Minute, "migrate", "srv", "--to", p.addrB, "--mode", "precopy",
		"--max-downtime", "1ms", "--max-rounds", "3")
	if code != 0 {
		t.Fatalf("migrate: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("ferryctl migrate:\n%s", out)
	rec := lastMigration(t, p.a)
	if rec.State != "succeeded" || rec.Mode != "precopy" {
		t.Fatalf("migration: %+v", rec)
	}
	r := rec.PrecopyRounds
	if len(r) < 2 {
		t.Fatalf("%d pre-copy rounds, want at least 2", len(r))
	}
	if r[1].PagesWritten >= r[0].PagesWritten {
		t.Errorf("round 2 wrote %d pages, round 1 %d: not shrinking at a low dirty rate", r[1].PagesWritten, r[0].PagesWritten)
	}
	if r[1].PagesSkippedParent == 0 {
		t.Errorf("round 2 skipped no pages of round 1: its parent was not used")
	}
	if rec.FinalPagesSkippedParent == 0 {
		t.Errorf("the final dump left no pages to its parents: a full dump")
	}

	// One copy, on B, with its address, counter, connection and blob.
	if _, errOut, _ := p.a.ctl("inspect", "srv"); grpcCode(errOut) != "NotFound" {
		t.Errorf("A still knows srv: %q", errOut)
	}
	after := p.b.inspect("srv")
	if after.State != "running" || after.IP != before.IP {
		t.Fatalf("on B: %+v", after)
	}
	waitCountAbove(t, p.b, "srv", countBefore, 30*time.Second)
	n0 := len(ticks(func() []string { l, _ := conn.snapshot(); return l }()))
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		l, _ := conn.snapshot()
		if tk := ticks(l); len(tk) >= n0+10 {
			for i := 1; i < len(tk); i++ {
				if tk[i] != tk[i-1]+1 {
					t.Fatalf("ticks out of sequence: %d after %d", tk[i], tk[i-1])
				}
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the TCP connection carried no data after the migration")
		}
	}
	askSum(t, p.b, "srv", sum)
	p.a.assertNoTrace(t, "srv")
	p.b.mustCtl("rm", "-f", "srv")
	p.b.assertNoTrace(t, "srv")
}

// onDemandBlobServer is server plus a 2 MiB random blob whose checksum is
// printed once, then whenever /sum-now appears (ferryctl exec): light
// enough for the emulated CPU of the VM tier, where summing blobServer's
// blob every second under a clamped CPU takes longer than the tests wait.
const onDemandBlobServer = `(x=$(head -c 2097152 /dev/urandom | base64); echo "sum $(echo "$x" | md5sum)"
while true; do sleep 1; if [ -e /sum-now ]; then rm -f /sum-now; echo "sum $(echo "$x" | md5sum)"; fi; done) &
` + server

// TestVMMigratePreCopyFaults (VM tier: it needs soft-dirty): faults while
// pre-copy rounds run, before any freeze: B's ferryd killed -9, the wire
// cut, A's ferryd killed -9, and A's CRIU failing. Each time the migration fails without
// ever freezing the container (frozen_ms 0): it ran on A throughout with
// its memory intact, and nothing is left on B.
func TestVMMigratePreCopyFaults(t *testing.T) {
	requireSoftDirty(t)
	p := newMigrationPair(t)
	// A CPU guarantee, as in TestVMMigratePreCopy: the emulated guest's CPU
	// gets scarce while a migration runs, and the elastic controller then
	// clamps a container without one to almost nothing.
	p.a.mustCtl("run", "srv", "--mem-guarantee", "32M", "--mem-limit", "128M", "--cpu-guarantee", "0.25", "--cpu-limit", "1",
		"--", "sh", "-c", onDemandBlobServer)
	before := p.a.inspect("srv")
	sum := waitFirstSum(t, p.a, "srv", 90*time.Second)
	// Slow rounds (1 MiB/s), so the fault lands in one.
	flags := []string{"--mode", "precopy", "--max-downtime", "1ms", "--max-rounds", "8", "--bandwidth", "1M"}
	failedUnfrozen := func(t *testing.T, out string) {
		t.Helper()
		rec := lastMigration(t, p.a)
		if rec.State != "failed" || rec.FrozenMs != 0 {
			t.Errorf("migration: state %s, frozen %d ms, want failed without a freeze; output:\n%s", rec.State, rec.FrozenMs, out)
		}
	}
	t.Run("peer killed in a round", func(t *testing.T) {
		done := migrateInBackground(p, "srv", flags...)
		waitPhase(t, p.a, "precopy", 2*time.Minute)
		time.Sleep(time.Second)
		p.b.kill9()
		defer func() {
			if p.b.cmd == nil { // failed before its restart below: B serves the next case
				p.b.start()
			}
		}()
		failedUnfrozen(t, waitOutput(t, done, 2*time.Minute))
		waitIntactOnA(t, p, "srv", before, "", 30*time.Second)
		askSum(t, p.a, "srv", sum)
		p.b.start()
		p.b.assertNoTrace(t, "srv")
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	t.Run("wire cut in a round", func(t *testing.T) {
		done := migrateInBackground(p, "srv", flags...)
		waitPhase(t, p.a, "precopy", 2*time.Minute)
		time.Sleep(time.Second)
		heal := p.cutWire(t)
		out := waitOutput(t, done, 2*time.Minute)
		heal()
		failedUnfrozen(t, out)
		waitIntactOnA(t, p, "srv", before, "", 30*time.Second)
		askSum(t, p.a, "srv", sum)
		waitNoTrace(t, p.b, "srv", 3*time.Minute)
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	t.Run("source killed in a round", func(t *testing.T) {
		done := migrateInBackground(p, "srv", flags...)
		waitPhase(t, p.a, "precopy", 2*time.Minute)
		time.Sleep(time.Second)
		p.a.kill9()
		waitOutput(t, done, 2*time.Minute) // ferryctl loses its daemon
		p.a.start()
		// Never frozen by ferryd: A's restart finds it running where it was
		// (CRIU, left alone mid-round, lets go of its tasks when its page
		// stream breaks) and records the migration as ended.
		waitIntactOnA(t, p, "srv", before, "", 60*time.Second)
		askSum(t, p.a, "srv", sum)
		if rec := lastMigration(t, p.a); rec.State == "running" || rec.FrozenMs != 0 {
			t.Errorf("A's record after its restart: state %s, frozen %d ms", rec.State, rec.FrozenMs)
		}
		// B drops its half when the page stream breaks (at the latest at
		// its idle timeout).
		waitNoTrace(t, p.b, "srv", 3*time.Minute)
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	t.Run("CRIU fails in a round", func(t *testing.T) {
		// A's ferryd runs a criu whose service runs (criu swrk: the
		// pre-dumps) exit with an error, a real CRIU process failing
		// where the first round would run.
		defer restartWithFailingCriu(t, p.a, "pre-dump")()
		out := waitOutput(t, migrateInBackground(p, "srv", "--mode", "precopy", "--max-downtime", "1ms", "--max-rounds", "8"), 2*time.Minute)
		failedUnfrozen(t, out)
		if !strings.Contains(out, "pre-copy: round 1:") {
			t.Errorf("the failure does not name the round:\n%s", out)
		}
		waitIntactOnA(t, p, "srv", before, "", 30*time.Second)
		askSum(t, p.a, "srv", sum)
		waitNoTrace(t, p.b, "srv", time.Minute)
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
}

// TestMigratePostCopyNeedsPipes: with fs.pipe-max-size below what CRIU's
// lazy page pipes need and no CAP_SYS_RESOURCE, post-copy is refused with
// the reason and the fix, before anything changes; auto does not pick it.
func TestMigratePostCopyNeedsPipes(t *testing.T) {
	setPipeMax(t, "1048576")
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--", "sh", "-c", server)
	before := p.a.inspect("srv")
	errOut := migrateFailsWith(t, p, "srv", []string{"--mode", "postcopy"})
	for _, w := range []string{"FailedPrecondition", "fs.pipe-max-size", "sysctl -w fs.pipe-max-size=4194304"} {
		if !strings.Contains(errOut, w) {
			t.Errorf("refusal lacks %q: %s", w, errOut)
		}
	}
	assertIntactOnA(t, p, "srv", before)
	p.b.assertNoTrace(t, "srv")
}

// migrateLive runs the live-migration story in one mode and returns A's
// record of the migration.
func migrateLive(t testing.TB, p *migrationPair, mode string, flags ...string) migrationRecord {
	t.Helper()
	p.a.mustCtl("run", "srv", "--mem-guarantee", "32M", "--mem-limit", "128M", "--cpu-guarantee", "0.25", "--cpu-limit", "1",
		"--", "sh", "-c", blobServer)
	if p.afterRun != nil {
		p.afterRun(t)
	}
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
	sumBefore := waitFirstSum(t, p.a, "srv", 90*time.Second)

	out, errOut, code := p.a.ctl(append([]string{"migrate", "srv", "--to", p.addrB, "--mode", mode}, flags...)...)
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
	// Every restored process is in the container's cgroups on B (CRIU
	// leaves cgroups to libcontainer, which puts CRIU there first).
	assertTreeInCgroup(t, after.Pid, filepath.Join(p.b.cgParent, "srv"))
	// The counter went on (no restart) and the log came along.
	if c := waitCountAbove(t, p.b, "srv", countBefore, 10*time.Second); c <= countBefore {
		t.Fatalf("count on B %d, was %d on A", c, countBefore)
	}
	if logs := p.b.mustCtl("logs", "srv"); !strings.Contains(logs, "count 1\n") {
		t.Errorf("B's log lacks the output from before the migration")
	}
	// The blob in its memory is intact: the sum it prints after the move,
	// computed over memory that came from A, is the one from before.
	waitSumsAfter(t, p.b, "srv", sumBefore, 2)
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

	rec := lastMigration(t, p.a)
	if rec.State != "succeeded" || rec.Mode != mode {
		t.Fatalf("migration on A: %+v, want succeeded in %s", rec, mode)
	}
	t.Logf("%s: frozen %d ms, %d bytes sent, post-copy %d ms / %d bytes", mode, rec.FrozenMs, rec.BytesSent, rec.PostcopyMs, rec.PostcopyBytes)
	p.a.assertNoTrace(t, "srv")
	p.b.mustCtl("rm", "-f", "srv")
	p.b.assertNoTrace(t, "srv")
	p.a.assertNoNetnsLeak(t)
	p.b.assertNoNetnsLeak(t)
	return rec
}

// blobServer is server plus a process holding a 16 MiB random blob
// (base64 in a shell variable: anonymous memory) whose checksum it prints
// every second.
//
// The blob is made inside the subshell, so that its memory is the
// subshell's alone; sharedBlobServer shares it copy-on-write.
const blobServer = `(x=$(head -c 16777216 /dev/urandom | base64)
while true; do echo "sum $(echo "$x" | md5sum)"; sleep 1; done) &
` + server

// sharedBlobServer makes the blob before forking the subshell that sums
// it, so the shell and the subshell share its pages copy-on-write. A
// lazy-pages restore gives each its own copy: about 22 MiB more.
const sharedBlobServer = `x=$(head -c 16777216 /dev/urandom | base64)
(while true; do echo "sum $(echo "$x" | md5sum)"; sleep 1; done) &
` + server

// TestMigrateAutoMode: auto chooses post-copy when stop-and-copy's
// predicted downtime (from the bandwidth cap, the last migration to that
// node, or else a probe of the channel) is over the target and the
// container fits, and stop-and-copy when it fits; and never post-copy for a
// container whose copy-on-write sharing, undone by a lazy restore, would
// pass its memory ceiling (asked for explicitly, that is refused with the
// reason).
func TestMigrateAutoMode(t *testing.T) {
	raisePipeMax(t)
	p := newMigrationPair(t)
	p.a.mustCtl("run", "priv", "--mem-guarantee", "32M", "--mem-limit", "128M", "--", "sh", "-c", blobServer)
	// Four processes share the blob (the shell, the summing subshell, the
	// counting one and the ticking one): a lazy restore would need ~90 MiB
	// of its 80 MiB ceiling for them; they run in ~50 MiB now.
	p.a.mustCtl("run", "shared", "--mem-guarantee", "32M", "--mem-limit", "80M", "--", "sh", "-c", sharedBlobServer)
	sumPriv := waitFirstSum(t, p.a, "priv", 20*time.Second)
	waitFirstSum(t, p.a, "shared", 20*time.Second)

	// A 20 MB/s cap: stop-and-copy of ~45 MiB would take seconds.
	p.a.mustCtl("migrate", "priv", "--to", p.addrB, "--bandwidth", "20M")
	rec := lastMigration(t, p.a)
	if rec.Mode != "postcopy" || !strings.Contains(rec.ModeReason, "over the 300ms target") {
		t.Errorf("auto with a 20 MB/s cap chose %s (%s), want postcopy over the target", rec.Mode, rec.ModeReason)
	}
	waitSumsAfter(t, p.b, "priv", sumPriv, 1)

	// Back from B, which never migrated to A: no bandwidth known, so B
	// probes it, and the mode follows the prediction from the probe.
	p.b.mustCtl("migrate", "priv", "--to", p.addrA)
	rec = lastMigration(t, p.b)
	switch {
	case !strings.Contains(rec.ModeReason, "bandwidth probed: "):
		t.Errorf("auto with no bandwidth known did not probe: %s (%s)", rec.Mode, rec.ModeReason)
	case strings.Contains(rec.ModeReason, "within the 300ms target") && rec.Mode != "stopcopy",
		strings.Contains(rec.ModeReason, "over the 300ms target") && rec.Mode != "postcopy":
		t.Errorf("auto chose %s against its own prediction: %s", rec.Mode, rec.ModeReason)
	}
	t.Logf("back from B: %s (%s)", rec.Mode, rec.ModeReason)
	waitSumsAfter(t, p.a, "priv", sumPriv, 1)

	errOut := migrateFailsWith(t, p, "shared", []string{"--mode", "postcopy"}, "FailedPrecondition", "copy-on-write")
	t.Logf("explicit postcopy refused: %s", strings.TrimSpace(errOut))
	p.b.assertNoTrace(t, "shared")
	p.a.mustCtl("migrate", "shared", "--to", p.addrB, "--bandwidth", "20M")
	rec = lastMigration(t, p.a)
	if rec.Mode != "stopcopy" || !strings.Contains(rec.ModeReason, "post-copy ruled out") {
		t.Errorf("auto for the shared container chose %s (%s), want stopcopy with post-copy ruled out", rec.Mode, rec.ModeReason)
	}
	// Running on B and counting on. (Its sums are not checked there: B is
	// a small node whose memory may be held to the 32 MiB guarantee, under
	// which the summing children's copies of the blob are OOM-killed.)
	if c := p.b.inspect("shared"); c.State != "running" {
		t.Errorf("shared on B: %+v", c)
	}
	waitCountAbove(t, p.b, "shared", lastCount(t, p.b, "shared"), 10*time.Second)
	for _, n := range []string{"priv"} {
		p.a.mustCtl("rm", "-f", n)
		p.a.assertNoTrace(t, n)
	}
	p.b.mustCtl("rm", "-f", "shared")
	p.b.assertNoTrace(t, "shared")
}

// lastSum is the latest "sum" line of the container's log.
// waitFirstSum waits up to within for the container to print its blob's
// checksum, and returns the latest.
func waitFirstSum(t testing.TB, d *daemon, name string, within time.Duration) string {
	t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(100 * time.Millisecond) {
		if s := lastSum(t, d, name); s != "" {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s reported no checksum of its blob within %s", name, within)
		}
	}
}

// requireSoftDirty marks t as a VM-tier test: it needs soft-dirty memory
// tracking, which this machine's kernel lacks.
func requireSoftDirty(t testing.TB) {
	t.Helper()
	if out, err := exec.Command("criu", "check", "--feature", "mem_dirty_track").CombinedOutput(); err != nil {
		testenv.Unavailable(t, "no soft-dirty memory tracking on this kernel (criu check --feature mem_dirty_track: "+strings.TrimSpace(string(out))+"); this test runs in the VM tier")
	}
}

func lastSum(t testing.TB, d *daemon, name string) string {
	t.Helper()
	sums := sumLines(d.mustCtl("logs", name))
	if len(sums) == 0 {
		return ""
	}
	return sums[len(sums)-1]
}

func sumLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if v, ok := strings.CutPrefix(l, "sum "); ok {
			out = append(out, strings.TrimSpace(v))
		}
	}
	return out
}

// waitSumsAfter waits for n more sums than there are now and checks each
// equals want.
func waitSumsAfter(t testing.TB, d *daemon, name, want string, n int) {
	t.Helper()
	waitSumsFrom(t, d, name, want, len(sumLines(d.mustCtl("logs", name)))+n)
}

// askSum has an onDemandBlobServer print its blob's checksum and checks it.
func askSum(t testing.TB, d *daemon, name, want string) {
	t.Helper()
	k := len(sumLines(d.mustCtl("logs", name)))
	d.mustCtl("exec", name, "--", "touch", "/sum-now")
	waitSumsFrom(t, d, name, want, k+1)
}

// waitSumsFrom waits until the log holds n checksum lines, all want.
func waitSumsFrom(t testing.TB, d *daemon, name, want string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		sums := sumLines(d.mustCtl("logs", name))
		for i, s := range sums {
			if s != want {
				t.Fatalf("the blob's checksum changed: sum %d of %d is %s, was %s; all: %q", i+1, len(sums), s, want, sums)
			}
		}
		if len(sums) >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new checksums from %s within 20s", name)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// raisePipeMax lets CRIU's lazy page pipes grow (this machine's root lacks
// CAP_SYS_RESOURCE) and puts the old value back after the test.
func raisePipeMax(t testing.TB) { setPipeMax(t, "4194304") }

func setPipeMax(t testing.TB, v string) {
	t.Helper()
	const f = "/proc/sys/fs/pipe-max-size"
	old, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f, []byte(v), 0o644); err != nil {
		t.Fatalf("set fs.pipe-max-size: %v", err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(f, old, 0o644); err != nil {
			t.Errorf("put back fs.pipe-max-size %s: %v", strings.TrimSpace(string(old)), err)
		}
	})
}

// assertIntactOnA checks a failed migration left the container running on
// A where it was: same init, still counting, its address answering.
func assertIntactOnA(t testing.TB, p *migrationPair, name string, before container) {
	t.Helper()
	c := p.a.inspect(name)
	if c.State != "running" || c.Pid != before.Pid || c.IP != before.IP {
		t.Fatalf("after the failed migration A has %s pid %d ip %s, want running pid %d ip %s", c.State, c.Pid, c.IP, before.Pid, before.IP)
	}
	n := lastCount(t, p.a, name)
	if c := waitCountAbove(t, p.a, name, n+3, 10*time.Second); c <= n {
		t.Fatalf("the container does not count on A after the failed migration")
	}
	if out, err := inNetns(p.client, busybox, "ping", "-c", "1", "-W", "2", before.IP); err != nil {
		t.Fatalf("its address does not answer after the rollback: %v %s", err, out)
	}
}

func migrateFails(t testing.TB, p *migrationPair, name string, wantInErr ...string) string {
	t.Helper()
	return migrateFailsWith(t, p, name, nil, wantInErr...)
}

// migrateFailsWith is migrateFails with more ferryctl migrate flags.
func migrateFailsWith(t testing.TB, p *migrationPair, name string, flags []string, wantInErr ...string) string {
	t.Helper()
	out, errOut, code := p.a.ctl(append([]string{"migrate", name, "--to", p.addrB}, flags...)...)
	if code == 0 {
		t.Fatalf("migrate succeeded, want a failure:\n%s", out)
	}
	for _, w := range wantInErr {
		if !strings.Contains(errOut+out, w) {
			t.Errorf("migrate output lacks %q:\n%s%s", w, out, errOut)
		}
	}
	return errOut
}

// TestMigrateFailuresRollBack: the peer refuses (admission), CRIU fails on
// the source's dump or late in the peer's restore, the restore fails on the
// peer (failpoint), the peer is killed -9 in the restore or mid-transfer:
// each time the container runs on A where it was, and nothing is left on B.
func TestMigrateFailuresRollBack(t *testing.T) {
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--mem-guarantee", "32M", "--", "sh", "-c", counter)
	before := p.a.inspect("srv")
	waitCountAbove(t, p.a, "srv", 2, 10*time.Second)

	t.Run("peer refuses", func(t *testing.T) {
		p.a.mustCtl("run", "big", "--mem-guarantee", "200M", "--", "sleep", "1000")
		defer p.a.mustCtl("rm", "-f", "big")
		bigBefore := p.a.inspect("big")
		errOut := migrateFails(t, p, "big", "memory: asked 200Mi")
		if grpcCode(errOut) != "ResourceExhausted" {
			t.Errorf("code %q, want ResourceExhausted: %s", grpcCode(errOut), errOut)
		}
		if c := p.a.inspect("big"); c.State != "running" || c.Pid != bigBefore.Pid {
			t.Errorf("big after the refusal: %s pid %d", c.State, c.Pid)
		}
		p.b.assertNoTrace(t, "big")
	})
	t.Run("CRIU fails on the source", func(t *testing.T) {
		// A's ferryd runs a criu that fails every dump (criu swrk), a real
		// CRIU process exiting with an error where the dump would run.
		defer restartWithFailingCriu(t, p.a, "dump")()
		migrateFails(t, p, "srv", "dump", "rolled_back")
		assertIntactOnA(t, p, "srv", before)
		p.b.assertNoTrace(t, "srv")
	})
	for _, mode := range []string{"stopcopy", "postcopy"} {
		t.Run("CRIU fails on the peer late in its restore: "+mode, func(t *testing.T) {
			// B's CRIU fails for real after it has made the tasks and
			// restored their memory, at its post-restore step (CRIU's own
			// fault injection: CRIU_FAULT=6, FI_POST_RESTORE); in post-copy
			// the lazy-pages daemon and the page tunnel are up by then.
			if mode == "postcopy" {
				raisePipeMax(t)
			}
			env := p.b.env
			p.b.env = append(append([]string(nil), env...), "CRIU_FAULT=6")
			p.b.restartWith("")
			defer func() {
				p.b.env = env
				p.b.restartWith("")
			}()
			migrateFailsWith(t, p, "srv", []string{"--mode", mode}, "restore", "rolled_back")
			assertIntactOnA(t, p, "srv", before)
			p.b.assertNoTrace(t, "srv")
			p.a.assertNoNetnsLeak(t)
			p.b.assertNoNetnsLeak(t)
		})
	}
	t.Run("restore fails on the peer", func(t *testing.T) {
		p.b.restartWith("peer-restore")
		migrateFails(t, p, "srv", "injected failure", "rolled_back")
		assertIntactOnA(t, p, "srv", before)
		p.b.assertNoTrace(t, "srv")
	})
	t.Run("peer killed during the restore", func(t *testing.T) {
		// B holds the restore (failpoint) and dies in it: A cannot know
		// whether B runs the container, so it stays frozen until B answers;
		// B's restart removes the never-confirmed copy and A thaws.
		p.b.restartWith("peer-restore=sleep")
		done := migrateInBackground(p, "srv")
		waitPhase(t, p.a, "restore", 30*time.Second)
		time.Sleep(300 * time.Millisecond) // into the held restore
		p.b.kill9()
		if out := waitOutput(t, done, 60*time.Second); !strings.Contains(out, "stays frozen here until the peer answers") {
			t.Errorf("migrate output:\n%s", out)
		}
		if c := p.a.inspect("srv"); c.StatusReason == "" {
			t.Errorf("A thawed with the peer's answer unknown: %+v", c)
		}
		p.b.failpoints = ""
		p.b.start()
		waitIntactOnA(t, p, "srv", before, "", 30*time.Second)
		p.b.assertNoTrace(t, "srv")
	})
	t.Run("peer killed mid-transfer", func(t *testing.T) {
		p.b.restartWith("peer-receive=sleep")
		done := make(chan string, 1)
		go func() {
			out, errOut, _ := p.a.ctl("migrate", "srv", "--to", p.addrB)
			done <- out + errOut
		}()
		deadline := time.Now().Add(20 * time.Second)
		for {
			var ms []struct {
				Phase string `json:"phase"`
				State string `json:"state"`
			}
			_ = json.Unmarshal([]byte(p.a.mustCtl("migrations", "-o", "json")), &ms)
			if n := len(ms); n > 0 && ms[n-1].Phase == "transfer" && ms[n-1].State == "running" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the migration never reached the transfer phase: %+v", ms)
			}
			time.Sleep(20 * time.Millisecond)
		}
		p.b.kill9()
		var out string
		select {
		case out = <-done:
		case <-time.After(60 * time.Second):
			t.Fatal("migrate did not return within 60s of the peer's death")
		}
		if !strings.Contains(out, "rolled_back") {
			t.Errorf("migrate output:\n%s", out)
		}
		assertIntactOnA(t, p, "srv", before)
		p.b.failpoints = ""
		p.b.start() // its start removes the half-received container
		p.b.assertNoTrace(t, "srv")
		if out := p.b.mustCtl("ps", "-o", "json"); strings.TrimSpace(out) != "[]" {
			t.Errorf("B lists containers after the restart: %s", out)
		}
	})
	// Finally it moves for real.
	p.b.restartWith("")
	p.a.mustCtl("migrate", "srv", "--to", p.addrB)
	if c := p.b.inspect("srv"); c.State != "running" || c.IP != before.IP {
		t.Fatalf("after the last migration B has %s %s", c.State, c.IP)
	}
	p.a.assertNoTrace(t, "srv")
}

// TestMigrateBadInput: unknown container, unreachable peer, a peer without
// a valid certificate, the source itself as the peer, invalid options; each
// refused with the right code, the container left running.
func TestMigrateBadInput(t *testing.T) {
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--", "sleep", "1000")
	before := p.a.inspect("srv")
	cases := []struct {
		name string
		args []string
		code string
		want string
	}{
		{"unknown container", []string{"migrate", "ghost", "--to", p.addrB}, "NotFound", `"ghost"`},
		{"unreachable peer", []string{"migrate", "srv", "--to", "10.78.0.99:7443"}, "Unavailable", "10.78.0.99:7443"},
		{"source as peer", []string{"migrate", "srv", "--to", p.addrA}, "InvalidArgument", "is this node"},
		{"bad peer address", []string{"migrate", "srv", "--to", "nohostport"}, "InvalidArgument", `"nohostport"`},
		{"bad mode", []string{"migrate", "srv", "--to", p.addrB, "--mode", "teleport"}, "InvalidArgument", `"teleport"`},
		{"precopy without soft-dirty", []string{"migrate", "srv", "--to", p.addrB, "--mode", "precopy"}, "FailedPrecondition", "soft-dirty"},
		{"negative downtime", []string{"migrate", "srv", "--to", p.addrB, "--max-downtime", "-1s"}, "", "--max-downtime"},
		{"bad migration id", []string{"migrate", "srv", "--to", p.addrB, "--id", "Bad/Id"}, "InvalidArgument", `"Bad/Id"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := p.a.ctl(tc.args...)
			if code == 0 {
				t.Fatalf("ferryctl %v succeeded", tc.args)
			}
			if tc.code != "" && grpcCode(errOut) != tc.code {
				t.Errorf("code %q, want %s: %s", grpcCode(errOut), tc.code, errOut)
			}
			if !strings.Contains(errOut, tc.want) {
				t.Errorf("error %q does not contain %q", errOut, tc.want)
			}
		})
	}
	// A peer whose certificate is from another CA is refused at the handshake.
	otherDir := t.TempDir()
	other, _, err := pki.LoadOrCreateCA(otherDir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	strangerDir, err := other.IssueNode(otherDir, "stranger", []string{"10.78.0.64"}, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	p.b.kill9()
	p.b.extra = append(p.b.extra, "--tls-dir", strangerDir) // the last --tls-dir wins
	p.b.start()
	_, errOut, code := p.a.ctl("migrate", "srv", "--to", p.addrB)
	if code == 0 || !strings.Contains(errOut, "certificate") {
		t.Errorf("migrate to a peer with a foreign certificate: exit %d %q", code, errOut)
	}
	if c := p.a.inspect("srv"); c.State != "running" || c.Pid != before.Pid {
		t.Fatalf("srv after the refused migrations: %s pid %d", c.State, c.Pid)
	}
	p.b.assertNoTrace(t, "srv")
}

// TestMigrateSourceKilled: ferryd on the source killed -9 mid-transfer
// (container frozen, peer holding a half-received copy) and after the
// peer's confirmation (container frozen here, running there): each time
// the restarted source settles it so exactly one copy runs.
func TestMigrateSourceKilled(t *testing.T) {
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--", "sh", "-c", counter)
	before := p.a.inspect("srv")
	waitCountAbove(t, p.a, "srv", 2, 10*time.Second)

	waitPhase := func(phase string) {
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			var ms []struct {
				Phase string `json:"phase"`
				State string `json:"state"`
			}
			if out, _, code := p.a.ctl("migrations", "-o", "json"); code == 0 {
				_ = json.Unmarshal([]byte(out), &ms)
			}
			if n := len(ms); n > 0 && ms[n-1].Phase == phase && ms[n-1].State == "running" {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatalf("the migration never reached phase %s", phase)
	}

	t.Run("frozen, before the dump", func(t *testing.T) {
		// A dies with the container frozen and its address off the
		// segment, B holding a prepared (staged) restore: A's restart asks
		// B, which runs nothing, tells it to drop what it prepared, and
		// thaws the container with its address back.
		p.a.restartWith("source-frozen=sleep")
		go func() { _, _, _ = p.a.ctl("migrate", "srv", "--to", p.addrB) }()
		waitPhase("freeze")
		time.Sleep(200 * time.Millisecond) // into the failpoint
		p.a.restartWith("")
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) && p.a.inspect("srv").StatusReason != "" {
			time.Sleep(100 * time.Millisecond)
		}
		assertIntactOnA(t, p, "srv", before)
		p.b.assertNoTrace(t, "srv")
		if m := lastMigration(t, p.a); m.State != "rolled_back" || !strings.Contains(m.Error, "after a ferryd restart") {
			t.Errorf("A's record of the interrupted migration: %+v", m)
		}
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	t.Run("dump fails", func(t *testing.T) {
		p.a.restartWith("source-frozen")
		_, errOut, code := p.a.ctl("migrate", "srv", "--to", p.addrB)
		if code == 0 || !strings.Contains(errOut, "injected failure") {
			t.Errorf("migrate: exit %d: %s", code, errOut)
		}
		if m := lastMigration(t, p.a); m.State != "rolled_back" {
			t.Errorf("A's record: %+v", m)
		}
		assertIntactOnA(t, p, "srv", before)
		p.b.assertNoTrace(t, "srv")
		p.a.restartWith("")
	})
	t.Run("mid-transfer", func(t *testing.T) {
		p.b.restartWith("peer-receive=sleep")
		go func() { _, _, _ = p.a.ctl("migrate", "srv", "--to", p.addrB) }()
		waitPhase("transfer")
		p.a.kill9()
		p.b.kill9() // end its sleeping receive; it restarts clean below
		for _, d := range []*daemon{p.a, p.b} {
			if ents, _ := os.ReadDir(filepath.Join(d.root, "work")); len(ents) == 0 {
				t.Errorf("%s had no migration work directory when it was killed: the check below proves nothing", d.name)
			}
		}
		p.b.failpoints = ""
		p.b.start()
		p.a.start()
		// Their starts remove the work the migration left.
		for _, d := range []*daemon{p.a, p.b} {
			if ents, _ := os.ReadDir(filepath.Join(d.root, "work")); len(ents) != 0 {
				t.Errorf("%s keeps %d migration work directories after its restart", d.name, len(ents))
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) && p.a.inspect("srv").StatusReason != "" {
			time.Sleep(100 * time.Millisecond)
		}
		assertIntactOnA(t, p, "srv", before)
		p.b.assertNoTrace(t, "srv")
		if m := lastMigration(t, p.a); m.State != "rolled_back" || !strings.Contains(m.Error, "after a ferryd restart") {
			t.Errorf("A's record of the interrupted migration: %+v", m)
		}
	})
	t.Run("after the confirmation", func(t *testing.T) {
		p.a.restartWith("source-after-confirm=sleep")
		go func() { _, _, _ = p.a.ctl("migrate", "srv", "--to", p.addrB) }()
		waitRunning(t, p.b, "srv", 30*time.Second)
		time.Sleep(200 * time.Millisecond) // A is now asleep in the failpoint, after the confirmation
		p.a.restartWith("")
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, errOut, _ := p.a.ctl("inspect", "srv"); grpcCode(errOut) == "NotFound" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("A still has srv 30s after its restart: %+v", p.a.inspect("srv"))
			}
			time.Sleep(100 * time.Millisecond)
		}
		if pidAlive(before.Pid) {
			t.Error("A's frozen copy is still alive")
		}
		if c := p.b.inspect("srv"); c.State != "running" || c.IP != before.IP {
			t.Fatalf("B: %s %s", c.State, c.IP)
		}
		n := lastCount(t, p.b, "srv")
		waitCountAbove(t, p.b, "srv", n+3, 10*time.Second)
		p.a.assertNoTrace(t, "srv")
		if m := lastMigration(t, p.a); m.State != "succeeded" || !strings.Contains(m.Error, "after a ferryd restart") {
			t.Errorf("A's record of the interrupted migration: %+v", m)
		}
	})
}

// TestMigrateFaultsAtTheFreeze: A holds the container frozen with its link
// cut (failpoint source-frozen, before the dump) while B holds a staged
// restore; then B's ferryd is killed -9, or the wire is cut. A's dump then
// fails, A thaws the container where it was with its address back (B never
// had it), and B drops its staged restore: at its restart, or, cut off,
// when its idle timeout passes.
func TestMigrateFaultsAtTheFreeze(t *testing.T) {
	p := newMigrationPair(t)
	p.a.restartWith("source-frozen=sleep")
	p.a.mustCtl("run", "srv", "--", "sh", "-c", counter)
	before := p.a.inspect("srv")
	waitCountAbove(t, p.a, "srv", 2, 10*time.Second)
	t.Run("peer killed", func(t *testing.T) {
		done := migrateInBackground(p, "srv")
		waitPhase(t, p.a, "freeze", 30*time.Second)
		time.Sleep(300 * time.Millisecond) // into the failpoint
		p.b.kill9()
		if out := waitOutput(t, done, 2*time.Minute); !strings.Contains(out, "rolled_back") {
			t.Errorf("migrate output:\n%s", out)
		}
		waitIntactOnA(t, p, "srv", before, "", 10*time.Second)
		waitCountAbove(t, p.a, "srv", lastCount(t, p.a, "srv"), 10*time.Second)
		p.b.start()
		p.b.assertNoTrace(t, "srv")
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	t.Run("wire cut", func(t *testing.T) {
		done := migrateInBackground(p, "srv")
		waitPhase(t, p.a, "freeze", 30*time.Second)
		time.Sleep(300 * time.Millisecond)
		heal := p.cutWire(t)
		out := waitOutput(t, done, 2*time.Minute)
		heal()
		if !strings.Contains(out, "rolled_back") {
			t.Errorf("migrate output:\n%s", out)
		}
		waitIntactOnA(t, p, "srv", before, "", 10*time.Second)
		waitCountAbove(t, p.a, "srv", lastCount(t, p.a, "srv"), 10*time.Second)
		// B was not told (A's abort found no route): its idle timeout
		// (2 minutes) removes the staged restore, monitor included.
		waitNoTrace(t, p.b, "srv", 3*time.Minute)
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	p.a.mustCtl("rm", "-f", "srv")
	p.a.assertNoTrace(t, "srv")
}

// TestMigrateFaultsInTheHandshake: a ferryd dies or the wire is cut while
// the peer prepares (admits and reserves the guarantee, makes the netns
// and a staged restore), the source dies just after the peer prepared, or
// CRIU fails on either side (the CPU description and its check). Nothing
// was frozen yet: the container runs on A where it was throughout, and B
// drops all it prepared, its reservation included: at its restart, when
// it sees its caller gone, or when A tells it (not at its 2-minute idle
// timeout).
func TestMigrateFaultsInTheHandshake(t *testing.T) {
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--mem-guarantee", "32M", "--", "sh", "-c", counter)
	before := p.a.inspect("srv")
	waitCountAbove(t, p.a, "srv", 2, 10*time.Second)
	baseB := p.b.node().Memory.Guaranteed
	// stagedOnB: B has prepared srv as far as its staged restore (a
	// monitor of srv's directory runs).
	stagedOnB := func() bool {
		return len(processesWaitGone(filepath.Join(p.b.root, "containers", "srv")+"\x00", 0)) > 0
	}
	// staged waits for that, so that the fault finds it all made.
	staged := func(t *testing.T) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !stagedOnB() {
			if time.Now().After(deadline) {
				t.Fatal("B never staged the restore of srv")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if g := p.b.node().Memory.Guaranteed; g < baseB+32<<20 {
			t.Fatalf("B's guaranteed memory is %v while it prepares, want the 32 MiB reservation above %v", g, baseB)
		}
		time.Sleep(300 * time.Millisecond) // into the failpoint
	}
	releasedOnB := func(t *testing.T, within time.Duration) {
		t.Helper()
		waitNoTrace(t, p.b, "srv", within)
		if g := p.b.node().Memory.Guaranteed; g != baseB {
			t.Errorf("B's guaranteed memory is %v after the fault, want %v: the reservation leaked", g, baseB)
		}
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	}
	failedOnA := func(t *testing.T, wantErr string) {
		t.Helper()
		if m := lastMigration(t, p.a); m.State != "failed" || m.FrozenMs != 0 || !strings.Contains(m.Error, wantErr) {
			t.Errorf("A's record: %+v, want failed without a freeze, naming %q", m, wantErr)
		}
	}

	t.Run("peer killed while it prepares", func(t *testing.T) {
		p.b.restartWith("peer-prepared=sleep")
		done := migrateInBackground(p, "srv")
		staged(t)
		p.b.kill9()
		out := waitOutput(t, done, time.Minute)
		if !strings.Contains(out, "preparation") {
			t.Errorf("migrate output:\n%s", out)
		}
		failedOnA(t, "preparation")
		assertIntactOnA(t, p, "srv", before)
		p.b.failpoints = ""
		p.b.start()
		releasedOnB(t, 10*time.Second)
	})
	t.Run("wire cut while the peer prepares", func(t *testing.T) {
		// B finishes its preparation (the failpoint only delays it) with
		// the wire cut: its answer is lost, and B cannot tell (its side
		// of the connection lives on until keepalive gives up). A's call
		// fails; A tells B to drop it all once the wire is back, well
		// before B's own 2-minute idle timeout.
		p.b.restartWith("peer-prepared=delay")
		done := migrateInBackground(p, "srv")
		staged(t)
		heal := p.cutWire(t)
		out := waitOutput(t, done, time.Minute)
		if !strings.Contains(out, "preparation") {
			t.Errorf("migrate output:\n%s", out)
		}
		failedOnA(t, "preparation")
		assertIntactOnA(t, p, "srv", before)
		if !stagedOnB() {
			t.Fatal("B dropped its preparation by itself: the check below would not show that A tells it to")
		}
		heal()
		releasedOnB(t, 30*time.Second)
		p.b.restartWith("")
	})
	t.Run("source killed while the peer prepares", func(t *testing.T) {
		// B finishes its preparation (the failpoint only delays it) after
		// its caller is gone, sees that, and undoes it all by itself.
		p.b.restartWith("peer-prepared=delay")
		done := migrateInBackground(p, "srv")
		staged(t)
		p.a.kill9()
		waitOutput(t, done, time.Minute) // ferryctl loses its daemon
		releasedOnB(t, 10*time.Second)
		p.a.start()
		waitIntactOnA(t, p, "srv", before, "", 10*time.Second)
		failedOnA(t, "before the freeze")
		p.b.restartWith("")
	})
	// CRIU failing at the handshake: the source describes its CPU with
	// `criu cpuinfo dump`, the peer checks that description with `criu
	// cpuinfo check` before it admits anything.
	for _, c := range []struct {
		name  string
		where *daemon
		want  string // besides the injected failure
	}{
		{"CRIU fails on the source", p.a, "describe this CPU for the peer"},
		{"CRIU fails on the peer", p.b, "FailedPrecondition"},
	} {
		t.Run(c.name, func(t *testing.T) {
			defer restartWithCriuFailing(t, c.where, "cpuinfo", "cpuinfo")()
			migrateFails(t, p, "srv", c.want, "injected cpuinfo failure")
			failedOnA(t, "injected cpuinfo failure")
			assertIntactOnA(t, p, "srv", before)
			releasedOnB(t, 10*time.Second)
		})
	}
	t.Run("source killed after the peer prepared", func(t *testing.T) {
		// B holds a complete preparation nobody will use; A's restart
		// tells it to drop it.
		p.a.restartWith("source-prepared=sleep")
		done := migrateInBackground(p, "srv")
		staged(t)
		p.a.kill9()
		waitOutput(t, done, time.Minute)
		time.Sleep(time.Second)
		if !stagedOnB() {
			t.Fatal("B dropped its preparation by itself: the check below would not show that A's restart tells it to")
		}
		p.a.failpoints = ""
		p.a.start()
		waitIntactOnA(t, p, "srv", before, "", 10*time.Second)
		releasedOnB(t, 30*time.Second)
		failedOnA(t, "before the freeze")
	})
	p.a.mustCtl("rm", "-f", "srv")
	p.a.assertNoTrace(t, "srv")
}

// TestMigrateSourceKilledDuringRestore: A's ferryd is killed -9 while B
// holds its restore (failpoint peer-restore, before CRIU runs). A's restart
// asks B, which does not run the container: A tells B to drop it and thaws
// its copy; B's held restore then fails and leaves nothing.
func TestMigrateSourceKilledDuringRestore(t *testing.T) {
	p := newMigrationPair(t)
	p.b.restartWith("peer-restore=sleep")
	p.a.mustCtl("run", "srv", "--", "sh", "-c", counter)
	before := p.a.inspect("srv")
	waitCountAbove(t, p.a, "srv", 2, 10*time.Second)
	done := migrateInBackground(p, "srv", "--mode", "stopcopy")
	waitPhase(t, p.a, "restore", 30*time.Second)
	time.Sleep(300 * time.Millisecond) // into B's held restore
	p.a.kill9()
	waitOutput(t, done, time.Minute) // ferryctl loses its daemon
	p.a.start()
	waitIntactOnA(t, p, "srv", before, "", 2*time.Minute)
	waitCountAbove(t, p.a, "srv", lastCount(t, p.a, "srv"), 10*time.Second)
	if m := lastMigration(t, p.a); m.State != "rolled_back" {
		t.Errorf("A's record: %+v, want rolled_back", m)
	}
	waitNoTrace(t, p.b, "srv", 2*time.Minute)
	p.a.assertNoNetnsLeak(t)
	p.b.assertNoNetnsLeak(t)
	p.a.mustCtl("rm", "-f", "srv")
	p.a.assertNoTrace(t, "srv")
}

// TestMigrateRestoreAnswerLost: B restored and runs the container, but its
// answer never reaches A: B holds it (failpoint peer-restored) while the
// wire is cut, or while B's ferryd is killed -9 (its restart reattaches
// the container, as any restart does). A cannot know whether B runs it:
// its copy stays frozen; once B answers again A learns that B runs it and
// removes its own. Exactly one copy runs throughout, at the end on B.
func TestMigrateRestoreAnswerLost(t *testing.T) {
	p := newMigrationPair(t)
	for _, fault := range []string{"wire cut", "peer killed"} {
		t.Run(fault, func(t *testing.T) {
			p.b.restartWith("peer-restored=sleep")
			p.a.mustCtl("run", "srv", "--", "sh", "-c", counter)
			before := p.a.inspect("srv")
			waitCountAbove(t, p.a, "srv", 2, 10*time.Second)
			done := migrateInBackground(p, "srv", "--mode", "stopcopy")
			waitRunning(t, p.b, "srv", 30*time.Second)
			var bPid int
			var heal func()
			if fault == "wire cut" {
				heal = p.cutWire(t)
			} else {
				bPid = p.b.inspect("srv").Pid
				p.b.kill9()
				defer func() {
					if p.b.cmd == nil {
						p.b.start()
					}
				}()
				heal = func() {
					p.b.failpoints = ""
					p.b.start()
				}
			}
			if out := waitOutput(t, done, 90*time.Second); !strings.Contains(out, "stays frozen here until the peer answers") {
				t.Errorf("migrate output:\n%s", out)
			}
			if c := p.a.inspect("srv"); c.StatusReason == "" || !pidAlive(before.Pid) {
				t.Fatalf("A's copy should be there, frozen: %+v", c)
			}
			n := lastCount(t, p.a, "srv")
			if fault == "wire cut" {
				waitCountAbove(t, p.b, "srv", lastCount(t, p.b, "srv")+3, 10*time.Second)
			} else {
				// B's copy runs on without its ferryd.
				time.Sleep(2 * time.Second)
				if !pidAlive(bPid) {
					t.Fatal("B's restored copy died with its ferryd")
				}
			}
			if m := lastCount(t, p.a, "srv"); m != n {
				t.Fatalf("A's copy counted on (%d -> %d) while B ran it", n, m)
			}
			heal()
			waitNoTrace(t, p.a, "srv", 60*time.Second)
			if pidAlive(before.Pid) {
				t.Error("A's frozen copy is still alive")
			}
			if m := lastMigration(t, p.a); m.State != "succeeded" {
				t.Errorf("A's record: %+v, want succeeded", m)
			}
			c := p.b.inspect("srv")
			if c.State != "running" || c.IP != before.IP || (bPid != 0 && c.Pid != bPid) {
				t.Fatalf("B: %+v (its restored copy was pid %d)", c, bPid)
			}
			waitCountAbove(t, p.b, "srv", lastCount(t, p.b, "srv")+3, 10*time.Second)
			p.a.assertNoNetnsLeak(t)
			p.b.mustCtl("rm", "-f", "srv")
			p.b.assertNoTrace(t, "srv")
		})
	}
}

// restartWithFailingCriu restarts d with a criu (--criu) whose service
// runs (criu swrk: dumps and pre-dumps) exit with an error, a real process
// failing where CRIU would work, saying "injected <what> failure"; the
// other commands go to the real criu. The returned func restarts d as it
// was.
func restartWithFailingCriu(t *testing.T, d *daemon, what string) (restore func()) {
	t.Helper()
	return restartWithCriuFailing(t, d, "swrk", what)
}

// restartWithCriuFailing is restartWithFailingCriu for the criu command
// cmd (swrk, cpuinfo, ...).
func restartWithCriuFailing(t *testing.T, d *daemon, cmd, what string) (restore func()) {
	t.Helper()
	real, err := exec.LookPath("criu")
	if err != nil {
		t.Fatal(err)
	}
	wrapper := filepath.Join(t.TempDir(), "criu-fails")
	script := "#!/bin/sh\nif [ \"$1\" = " + cmd + " ]; then echo 'criu: injected " + what + " failure' >&2; exit 1; fi\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	extra := d.extra
	d.kill9()
	d.extra = append(append([]string(nil), extra...), "--criu", wrapper)
	d.start()
	return func() {
		d.kill9()
		d.extra = extra
		d.start()
	}
}

// TestMigrateSourceCleanupFails: A's removal of its frozen copy fails after
// B confirmed (failpoint source-cleanup). The migration stands (never
// undone): the container runs on B alone, A's copy stays frozen, and A's
// next start removes it.
func TestMigrateSourceCleanupFails(t *testing.T) {
	p := newMigrationPair(t)
	p.a.restartWith("source-cleanup")
	p.a.mustCtl("run", "srv", "--", "sh", "-c", counter)
	before := p.a.inspect("srv")
	waitCountAbove(t, p.a, "srv", 2, 10*time.Second)
	p.a.mustCtl("migrate", "srv", "--to", p.addrB, "--mode", "stopcopy")
	if m := lastMigration(t, p.a); m.State != "succeeded" {
		t.Fatalf("A's record: %+v, want succeeded", m)
	}
	if c := p.b.inspect("srv"); c.State != "running" || c.IP != before.IP {
		t.Fatalf("B: %+v", c)
	}
	// One running copy: A's is still there, frozen.
	if !pidAlive(before.Pid) {
		t.Fatal("A's copy is gone: the failpoint did not hold the removal")
	}
	n := lastCount(t, p.a, "srv")
	waitCountAbove(t, p.b, "srv", lastCount(t, p.b, "srv")+3, 10*time.Second)
	if m := lastCount(t, p.a, "srv"); m != n {
		t.Fatalf("A's copy counted on (%d -> %d) while B ran it", n, m)
	}
	p.a.restartWith("")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, errOut, _ := p.a.ctl("inspect", "srv"); grpcCode(errOut) == "NotFound" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("A still has srv 30s after its restart: %+v", p.a.inspect("srv"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if pidAlive(before.Pid) {
		t.Error("A's frozen copy is still alive after A's restart")
	}
	p.a.assertNoTrace(t, "srv")
	waitCountAbove(t, p.b, "srv", lastCount(t, p.b, "srv")+3, 10*time.Second)
	p.b.mustCtl("rm", "-f", "srv")
	p.b.assertNoTrace(t, "srv")
}

type migrationRecord struct {
	ID            string `json:"id"`
	Mode          string `json:"mode"`
	ModeReason    string `json:"mode_reason"`
	Phase         string `json:"phase"`
	State         string `json:"state"`
	Error         string `json:"error"`
	FrozenMs      int64  `json:"frozen_ms"`
	BytesSent     int64  `json:"bytes_sent"`
	PostcopyMs    int64  `json:"postcopy_ms"`
	PostcopyBytes int64  `json:"postcopy_bytes"`
	PrecopyRounds []struct {
		PagesWritten       int64  `json:"pages_written"`
		PagesSkippedParent int64  `json:"pages_skipped_parent"`
		Decision           string `json:"decision"`
	} `json:"precopy_rounds"`
	FinalPagesSkippedParent int64 `json:"final_pages_skipped_parent"`
}

func lastMigration(t testing.TB, d *daemon) migrationRecord {
	t.Helper()
	var ms []migrationRecord
	if err := json.Unmarshal([]byte(d.mustCtl("migrations", "-o", "json")), &ms); err != nil || len(ms) == 0 {
		t.Fatalf("migrations: %v %v", ms, err)
	}
	return ms[len(ms)-1]
}

// migrateInBackground starts ferryctl migrate and returns its output when
// it ends.
func migrateInBackground(p *migrationPair, name string, flags ...string) <-chan string {
	done := make(chan string, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, filepath.Join(binDir, "ferryctl"), append([]string{"--socket", p.a.socket, "migrate", name, "--to", p.addrB}, flags...)...)
		out, _ := cmd.CombinedOutput()
		done <- string(out)
	}()
	return done
}

// waitPhase waits until A's latest migration is running in phase.
func waitPhase(t testing.TB, d *daemon, phase string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var ms []migrationRecord
		_ = json.Unmarshal([]byte(d.mustCtl("migrations", "-o", "json")), &ms)
		if n := len(ms); n > 0 && ms[n-1].Phase == phase && ms[n-1].State == "running" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the migration never reached phase %s: %+v", phase, ms)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitOutput(t testing.TB, done <-chan string, within time.Duration) string {
	t.Helper()
	select {
	case out := <-done:
		return out
	case <-time.After(within):
		t.Fatalf("migrate did not return within %s", within)
		return ""
	}
}

// waitIntactOnA waits for the container to run on A again (a rollback that
// settles with the peer first) and checks it is the one from before, with
// its blob intact (sum, when not "").
func waitIntactOnA(t testing.TB, p *migrationPair, name string, before container, sum string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c := p.a.inspect(name)
		if c.State == "running" && c.StatusReason == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container not running again on A within %s: %+v", within, c)
		}
		time.Sleep(100 * time.Millisecond)
	}
	assertIntactOnA(t, p, name, before)
	if sum != "" {
		waitSumsAfter(t, p.a, name, sum, 1)
	}
}

// TestMigrateFaultsMidTransfer: while pages are moving (the dump of a
// stop-and-copy, the page traffic after a post-copy restore; slowed down
// by --bandwidth), the peer's ferryd is killed -9, the source's ferryd is
// killed -9, or the wire between the hosts is cut. Each time exactly one
// copy runs afterwards, on A, where it was and with its memory intact, and
// nothing is left on B. When B cannot be reached, A keeps the container
// frozen until B answers (it cannot know whether B runs it); B removes a
// post-copy copy by itself once its page source is gone.
func TestMigrateFaultsMidTransfer(t *testing.T) {
	raisePipeMax(t)
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--mem-guarantee", "32M", "--mem-limit", "128M", "--", "sh", "-c", blobServer)
	before := p.a.inspect("srv")
	sum := waitFirstSum(t, p.a, "srv", 20*time.Second)
	slow := []string{"--bandwidth", "4M"}

	// A small stop-and-copy's pages move in its transfer phase, after the
	// dump; streamed, they move during the dump, as CRIU writes them to
	// the peer's page server (A restarted with --stopcopy-stream-min 0).
	for _, streamed := range []bool{false, true} {
		variant, phase := "stopcopy", "transfer"
		if streamed {
			variant, phase = "stopcopy streamed", "dump"
			defer streamStopCopy(p.a)() // the container runs on through A's restarts
		}
		t.Run(variant+": peer killed", func(t *testing.T) {
			done := migrateInBackground(p, "srv", append(slow, "--mode", "stopcopy")...)
			waitPhase(t, p.a, phase, 30*time.Second)
			time.Sleep(time.Second)
			p.b.kill9()
			if out := waitOutput(t, done, 60*time.Second); !strings.Contains(out, "rolled_back") {
				t.Errorf("migrate output:\n%s", out)
			}
			waitIntactOnA(t, p, "srv", before, sum, 10*time.Second)
			p.b.start()
			p.b.assertNoTrace(t, "srv")
			p.a.assertNoNetnsLeak(t)
			p.b.assertNoNetnsLeak(t)
		})
		t.Run(variant+": wire cut", func(t *testing.T) {
			done := migrateInBackground(p, "srv", append(slow, "--mode", "stopcopy")...)
			waitPhase(t, p.a, phase, 30*time.Second)
			time.Sleep(time.Second)
			heal := p.cutWire(t)
			out := waitOutput(t, done, 60*time.Second)
			heal()
			if !strings.Contains(out, "rolled_back") {
				t.Errorf("migrate output:\n%s", out)
			}
			waitIntactOnA(t, p, "srv", before, sum, 10*time.Second)
			waitNoTrace(t, p.b, "srv", 30*time.Second)
			p.a.assertNoNetnsLeak(t)
			p.b.assertNoNetnsLeak(t)
		})
	}
	t.Run("postcopy: peer killed", func(t *testing.T) {
		done := migrateInBackground(p, "srv", append(slow, "--mode", "postcopy")...)
		waitPhase(t, p.a, "postcopy", 30*time.Second)
		p.b.kill9()
		out := waitOutput(t, done, 60*time.Second)
		if !strings.Contains(out, "stays frozen here until the peer answers") {
			t.Errorf("migrate output:\n%s", out)
		}
		// B's copy died with its page source; B's restart removes the rest
		// and tells A, which thaws its copy.
		p.b.start()
		waitIntactOnA(t, p, "srv", before, sum, 30*time.Second)
		p.b.assertNoTrace(t, "srv")
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	t.Run("postcopy: source killed", func(t *testing.T) {
		done := migrateInBackground(p, "srv", append(slow, "--mode", "postcopy")...)
		waitPhase(t, p.a, "postcopy", 30*time.Second)
		p.a.kill9()
		waitOutput(t, done, 60*time.Second)
		// B removes its copy by itself: its pages can no longer come.
		waitNoTrace(t, p.b, "srv", 30*time.Second)
		p.a.start()
		waitIntactOnA(t, p, "srv", before, sum, 30*time.Second)
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	t.Run("postcopy: wire cut", func(t *testing.T) {
		done := migrateInBackground(p, "srv", append(slow, "--mode", "postcopy")...)
		waitPhase(t, p.a, "postcopy", 30*time.Second)
		heal := p.cutWire(t)
		out := waitOutput(t, done, 60*time.Second)
		if !strings.Contains(out, "stays frozen here until the peer answers") {
			t.Errorf("migrate output:\n%s", out)
		}
		waitNoTrace(t, p.b, "srv", 30*time.Second)
		if c := p.a.inspect("srv"); c.StatusReason == "" {
			t.Errorf("A thawed its copy with the peer unreachable: %+v", c)
		}
		heal()
		waitIntactOnA(t, p, "srv", before, sum, 30*time.Second)
		p.a.assertNoNetnsLeak(t)
		p.b.assertNoNetnsLeak(t)
	})
	p.a.mustCtl("rm", "-f", "srv")
	p.a.assertNoTrace(t, "srv")
}

// waitNoTrace waits until a daemon has removed every trace of a container.
func waitNoTrace(t testing.TB, d *daemon, name string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if _, errOut, _ := d.ctl("inspect", name); grpcCode(errOut) == "NotFound" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still has %s after %s", d.name, name, within)
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.assertNoTrace(t, name)
}

// TestMigrateCancel: a migration cancelled before the freeze stops, the
// container runs on A untouched and B keeps nothing; once frozen, a
// cancel is refused and the migration ends by itself; unknown and
// finished ids get NotFound and FailedPrecondition.
func TestMigrateCancel(t *testing.T) {
	p := newMigrationPair(t)
	p.a.mustCtl("run", "srv", "--", "sh", "-c", counter)
	before := p.a.inspect("srv")
	waitCountAbove(t, p.a, "srv", 2, 10*time.Second)

	p.b.restartWith("peer-prepare=sleep")
	done := migrateInBackground(p, "srv", "--id", "m-cancel-1")
	waitPhase(t, p.a, "prepare", 30*time.Second)
	out := p.a.mustCtl("migrations", "cancel", "m-cancel-1")
	if !strings.Contains(out, "canceled") {
		t.Errorf("cancel output:\n%s", out)
	}
	if out := waitOutput(t, done, 30*time.Second); !strings.Contains(out, "Canceled") {
		t.Errorf("migrate output:\n%s", out)
	}
	if rec := lastMigration(t, p.a); rec.State != "canceled" || rec.FrozenMs != 0 {
		t.Errorf("record after cancel: %+v", rec)
	}
	assertIntactOnA(t, p, "srv", before)
	p.b.assertNoTrace(t, "srv")
	if _, errOut, _ := p.a.ctl("migrations", "cancel", "m-cancel-1"); grpcCode(errOut) != "FailedPrecondition" || !strings.Contains(errOut, "already canceled") {
		t.Errorf("second cancel: %s", errOut)
	}
	if _, errOut, _ := p.a.ctl("migrations", "cancel", "m-nosuch"); grpcCode(errOut) != "NotFound" {
		t.Errorf("cancel of an unknown id: %s", errOut)
	}

	// Frozen (the peer holds the transfer): refused.
	p.b.restartWith("peer-receive=sleep")
	done = migrateInBackground(p, "srv", "--id", "m-cancel-2")
	waitPhase(t, p.a, "transfer", 30*time.Second)
	if _, errOut, _ := p.a.ctl("migrations", "cancel", "m-cancel-2"); grpcCode(errOut) != "FailedPrecondition" || !strings.Contains(errOut, "frozen") {
		t.Errorf("cancel after the freeze: %s", errOut)
	}
	p.b.kill9()
	if out := waitOutput(t, done, 60*time.Second); !strings.Contains(out, "rolled_back") {
		t.Errorf("migrate output:\n%s", out)
	}
	assertIntactOnA(t, p, "srv", before)
	p.b.failpoints = ""
	p.b.start()
	p.b.assertNoTrace(t, "srv")
}

// TestMigratePeerMessages sends B what a peer could, directly over mutual
// TLS with a valid certificate: a rootfs digest that differs, a CPU
// description CRIU cannot check, page directories outside the migration
// (traversal, a parent that is not a round), an image stream for an
// unknown migration. Each is refused with its code and a message naming
// what was wrong, and B keeps nothing.
func TestMigratePeerMessages(t *testing.T) {
	p := newMigrationPair(t)
	dirX, err := p.ca.IssueNode(p.pkiDir, "host-x", nil, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// host-x reaches B from A's namespace, where the wire is.
	f, err := os.Open("/run/netns/" + p.a.netns)
	if err != nil {
		t.Fatal(err)
	}
	ns := privnet.FromFile(f)
	defer func() { _ = ns.Close() }()
	c, err := client.DialTLSWith(p.addrB, dirX, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		return ns.Dial(ctx, addr)
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec, _ := json.Marshal(map[string]any{"name": "px", "args": []string{"sleep", "100"}})
	prep := func(id string, mod func(*api.PrepareIncomingRequest)) error {
		req := &api.PrepareIncomingRequest{MigrationId: id, SourceNode: "host-x", SpecJson: spec}
		if mod != nil {
			mod(req)
		}
		_, err := c.PrepareIncoming(ctx, req)
		return err
	}
	want := func(what string, err error, code codes.Code, sub string) {
		t.Helper()
		if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), sub) {
			t.Errorf("%s: %v, want %s mentioning %q", what, err, code, sub)
		}
		p.b.assertNoTrace(t, "px")
	}
	want("rootfs digest", prep("m-px-1", func(r *api.PrepareIncomingRequest) { r.RootfsDigest = "sha256:00" }),
		codes.FailedPrecondition, "differs from the source's")
	want("cpuinfo", prep("m-px-2", func(r *api.PrepareIncomingRequest) { r.Cpuinfo = []byte("not a CRIU image") }),
		codes.FailedPrecondition, "criu cpuinfo check")
	want("mode", prep("m-px-3", func(r *api.PrepareIncomingRequest) { r.Mode = "teleport" }), codes.InvalidArgument, `"teleport"`)

	// A bandwidth probe is counted and dropped, up to 64 MiB.
	probe := func(n int) (int64, error) {
		s, err := c.ProbeBandwidth(ctx)
		if err != nil {
			return 0, err
		}
		buf := make([]byte, 1<<20)
		for i := 0; i < n; i++ {
			if err := s.Send(&api.ProbeChunk{Data: buf}); err != nil {
				break // the peer ended it; its status says why
			}
		}
		r, err := s.CloseAndRecv()
		return r.GetBytes(), err
	}
	if n, err := probe(4); err != nil || n != 4<<20 {
		t.Errorf("a 4 MiB probe: %d bytes counted, %v", n, err)
	}
	_, err = probe(65)
	want("a 65 MiB probe", err, codes.InvalidArgument, "bandwidth probe: more than")

	if err := prep("m-px-4", func(r *api.PrepareIncomingRequest) { r.Mode = "precopy" }); err != nil {
		t.Fatalf("a valid precopy preparation: %v", err)
	}
	tunnel := func(dir, parent string) error {
		tctx := metadata.AppendToOutgoingContext(ctx, "ferry-migration-id", "m-px-4", "ferry-page-dir", dir, "ferry-page-parent", parent)
		s, err := c.PageTunnel(tctx)
		if err != nil {
			return err
		}
		if err := s.Send(&api.TunnelChunk{MigrationId: "m-px-4"}); err != nil {
			return err
		}
		_, err = s.Recv()
		return err
	}
	for _, tc := range []struct{ dir, parent, sub string }{
		{"../../etc", "", "page directory"},
		{"pre-1/../../x", "", "page directory"},
		{"pre-2", "images", "page parent"},
		{"pre-2", "../pre-1", "page parent"},
		{"pre-2", "pre-1", "page parent"}, // no such round
	} {
		if err := tunnel(tc.dir, tc.parent); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.sub) {
			t.Errorf("page tunnel dir %q parent %q: %v, want InvalidArgument about the %s", tc.dir, tc.parent, err, tc.sub)
		}
	}
	s, err := c.SendImages(metadata.AppendToOutgoingContext(ctx, "ferry-migration-id", "m-nosuch"))
	if err == nil {
		_ = s.Send(&api.ImageChunk{Part: "images"})
		_, err = s.CloseAndRecv()
	}
	if status.Code(err) != codes.NotFound {
		t.Errorf("image stream for an unknown migration: %v, want NotFound", err)
	}
	if _, err := c.AbortIncoming(ctx, &api.AbortIncomingRequest{MigrationId: "m-px-4", Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	p.b.assertNoTrace(t, "px")
	if ents, _ := os.ReadDir(filepath.Join(p.b.root, "work")); len(ents) != 0 {
		t.Errorf("B's migrations work directory keeps %d entries", len(ents))
	}
}

// assertTreeInCgroup fails t unless pid and every descendant of it are in
// cgroup cg (a path below each hierarchy's root) in every hierarchy the
// host has of "memory", "cpu", "pids", "freezer" and the unified one.
func assertTreeInCgroup(t testing.TB, pid int, cg string) {
	t.Helper()
	pids := []int{pid}
	for i := 0; i < len(pids); i++ {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pids[i]))
		for _, f := range tasks {
			b, _ := os.ReadFile(f)
			for _, w := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(w); err == nil {
					pids = append(pids, c)
				}
			}
		}
	}
	if len(pids) < 2 {
		t.Fatalf("pid %d has no children: the check would prove little", pid)
	}
	checked := 0
	for _, h := range []string{"memory", "cpu", "pids", "freezer", "unified", ""} {
		dir := filepath.Join("/sys/fs/cgroup", h)
		if h == "" && !cgroupV2() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, cg, "cgroup.procs"))
		if err != nil {
			continue // not a hierarchy of this host
		}
		in := map[int]bool{}
		for _, w := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(w); err == nil {
				in[c] = true
			}
		}
		for _, p := range pids {
			if !in[p] && pidAlive(p) { // a short-lived child may be gone by now
				t.Errorf("pid %d (of %d's tree) is not in %s", p, pid, filepath.Join(dir, cg))
			}
		}
		checked++
	}
	if checked == 0 {
		t.Fatalf("no hierarchy has cgroup %s", cg)
	}
}

// TestMigrateIntoScarceMemory: while memory is scarce on B (hardened:
// every container held to its guarantee), B refuses a container that uses
// more memory than its guarantee (restored, the kernel would kill it right
// after A let it go: zero copies), with RESOURCE_EXHAUSTED and the figures;
// nothing changes on either side. One that uses less than its guarantee
// still moves in.
func TestMigrateIntoScarceMemory(t *testing.T) {
	p := newMigrationPairWith(t, true, "--relax-after-memory", "10m")
	// B hardened, deterministically: a container of B's whose limit in
	// place is below its ceiling makes a restarted ferryd start hardened
	// (as after a death while hardened), and it stays so for the relax
	// window.
	p.b.mustCtl("run", "pin", "--mem-guarantee", "8M", "--mem-limit", "64M", "--", "sleep", "1000")
	pin := p.b.inspect("pin")
	limitFile := filepath.Join("/sys/fs/cgroup", "memory", pin.Cgroup, "memory.limit_in_bytes")
	if cgroupV2() {
		limitFile = filepath.Join(unifiedDir(pin.Cgroup), "memory.high")
	}
	if err := os.WriteFile(limitFile, []byte(strconv.Itoa(8<<20)), 0o644); err != nil {
		t.Fatal(err)
	}
	p.b.restartWith("")
	if st := p.b.node().Memory.State; st != "hardened" {
		t.Fatalf("B's memory is %s, want hardened", st)
	}
	baseB := p.b.node().Memory.Guaranteed

	p.a.mustCtl("run", "big", "--mem-guarantee", "8M", "--mem-limit", "128M", "--", "sh", "-c", blobServer)
	before := p.a.inspect("big")
	sum := waitFirstSum(t, p.a, "big", 90*time.Second)
	errOut := migrateFailsWith(t, p, "big", []string{"--mode", "stopcopy"}, "memory is scarce on this node (hardened)")
	if grpcCode(errOut) != "ResourceExhausted" || !strings.Contains(errOut, "held to 8") {
		t.Errorf("migrate: %s, want ResourceExhausted naming the 8 MiB it would be held to", errOut)
	}
	if m := lastMigration(t, p.a); m.State != "failed" || m.FrozenMs != 0 {
		t.Errorf("A's record: %+v, want failed without a freeze", m)
	}
	c := p.a.inspect("big")
	if c.State != "running" || c.Pid != before.Pid || c.StatusReason != "" {
		t.Fatalf("A's copy after the refusal: %+v", c)
	}
	waitSumsAfter(t, p.a, "big", sum, 1)
	p.b.assertNoTrace(t, "big")
	if g := p.b.node().Memory.Guaranteed; g != baseB {
		t.Errorf("B's guaranteed memory %v after the refusal, want %v", g, baseB)
	}
	p.a.mustCtl("rm", "-f", "big")

	// Within its guarantee it moves, hardened or not.
	// (The blob server briefly holds a second copy of its blob to sum it:
	// ~70 MB at its peak.)
	p.a.mustCtl("run", "small", "--mem-guarantee", "100M", "--mem-limit", "128M", "--", "sh", "-c", blobServer)
	sum = waitFirstSum(t, p.a, "small", 90*time.Second)
	p.a.mustCtl("migrate", "small", "--to", p.addrB, "--mode", "stopcopy")
	if c := p.b.inspect("small"); c.State != "running" {
		t.Fatalf("small on B: %+v", c)
	}
	waitSumsAfter(t, p.b, "small", sum, 2)
	if st := p.b.node().Memory.State; st != "hardened" {
		t.Errorf("B relaxed meanwhile (%s): the check above proves less", st)
	}
	p.b.mustCtl("rm", "-f", "small", "pin")
}
