package integration

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

const counter = `i=0; while true; do i=$((i+1)); echo count $i; sleep 0.1; done`

// lastCount returns the highest "count N" in the container's log.
func lastCount(t testing.TB, d *daemon, name string) int {
	t.Helper()
	out := d.mustCtl("logs", name)
	n := -1
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "count "); ok {
			if x, err := strconv.Atoi(v); err == nil && x > n {
				n = x
			}
		}
	}
	return n
}

func waitCountAbove(t testing.TB, d *daemon, name string, n int, within time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if c := lastCount(t, d, name); c > n {
			return c
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("container %s: count did not pass %d within %s", name, n, within)
	return 0
}

// TestLifecycleSurvivesDaemonRestart is the foundation's end-to-end story:
// run, ps, exec, logs, ferryd killed -9, containers keep running, ferryd
// restarts and reattaches, a container that exited meanwhile shows its exit
// code, stop, rm, and nothing is left on the host.
func TestLifecycleSurvivesDaemonRestart(t *testing.T) {
	requireHost(t)
	requireV1(t)
	d := newDaemon(t, "a")
	d.start()

	d.mustCtl("run", "counter", "--mem-limit", "64M", "--cpu-limit", "0.5", "--pids", "64", "--", "sh", "-c", counter)
	d.mustCtl("run", "short", "--", "sh", "-c", "sleep 3; exit 7")

	ps := d.mustCtl("ps")
	for _, want := range []string{"counter", "short", "running"} {
		if !strings.Contains(ps, want) {
			t.Fatalf("ps does not show %q:\n%s", want, ps)
		}
	}
	c := d.inspect("counter")
	if c.State != "running" || c.Pid <= 0 || !pidAlive(c.Pid) {
		t.Fatalf("counter: state %s pid %d (alive %v)", c.State, c.Pid, pidAlive(c.Pid))
	}
	if c.Cgroup != d.cgParent+"/counter" {
		t.Errorf("cgroup %q, want %q", c.Cgroup, d.cgParent+"/counter")
	}
	// The limits reached the kernel.
	limit, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", c.Cgroup, "memory.limit_in_bytes"))
	if strings.TrimSpace(string(limit)) != strconv.Itoa(64<<20) {
		t.Errorf("memory.limit_in_bytes = %q, want %d", limit, 64<<20)
	}
	quota, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/cpu", c.Cgroup, "cpu.cfs_quota_us"))
	if strings.TrimSpace(string(quota)) != "50000" {
		t.Errorf("cpu.cfs_quota_us = %q, want 50000", quota)
	}
	pids, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/pids", c.Cgroup, "pids.max"))
	if strings.TrimSpace(string(pids)) != "64" {
		t.Errorf("pids.max = %q, want 64", pids)
	}

	// exec passes stdout, stderr and the exit code through.
	out, errOut, code := d.ctl("exec", "counter", "--", "sh", "-c", "hostname; echo oops >&2; exit 3")
	if code != 3 || strings.TrimSpace(out) != "counter" || strings.TrimSpace(errOut) != "oops" {
		t.Fatalf("exec: code %d stdout %q stderr %q; want 3, counter, oops", code, out, errOut)
	}
	before := waitCountAbove(t, d, "counter", 3, 10*time.Second)

	// ferryd crashes; the containers do not notice.
	d.kill9()
	if !pidAlive(c.Pid) {
		t.Fatal("container init died with ferryd")
	}
	logPath := filepath.Join(d.root, "containers", "counter", "container.log")
	st1, _ := os.Stat(logPath)
	time.Sleep(4 * time.Second) // "short" exits (code 7) while ferryd is down
	st2, _ := os.Stat(logPath)
	if st1 == nil || st2 == nil || st2.Size() <= st1.Size() {
		t.Fatal("the container's log did not grow while ferryd was down")
	}

	d.start()
	c2 := d.inspect("counter")
	if c2.State != "running" || c2.Pid != c.Pid {
		t.Fatalf("after restart: counter state %s pid %d, want running pid %d", c2.State, c2.Pid, c.Pid)
	}
	if after := waitCountAbove(t, d, "counter", before+20, 10*time.Second); after <= before {
		t.Fatalf("count went from %d to %d", before, after)
	}
	s := d.inspect("short")
	if s.State != "exited" || s.ExitCode != 7 {
		t.Fatalf("short: state %s exit %d, want exited 7", s.State, s.ExitCode)
	}
	if out := d.mustCtl("exec", "counter", "--", "echo", "still here"); strings.TrimSpace(out) != "still here" {
		t.Fatalf("exec after restart: %q", out)
	}

	// Stop: the shell as pid 1 ignores SIGTERM, so the timeout's SIGKILL ends it.
	start := time.Now()
	d.mustCtl("stop", "counter", "--timeout", "500ms")
	if el := time.Since(start); el > 10*time.Second {
		t.Errorf("stop took %s", el)
	}
	c3 := d.inspect("counter")
	if c3.State != "stopped" || c3.ExitCode != 137 || pidAlive(c.Pid) {
		t.Fatalf("after stop: state %s exit %d (pid alive %v), want stopped 137", c3.State, c3.ExitCode, pidAlive(c.Pid))
	}
	d.mustCtl("rm", "counter", "short")
	if out := d.mustCtl("ps", "-o", "json"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("ps after rm: %s", out)
	}
	d.assertNoTrace(t, "counter")
	d.assertNoTrace(t, "short")
	d.stop()
}

// TestStopHonoursSIGTERM: a container that handles SIGTERM stops before the timeout.
func TestStopHonoursSIGTERM(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a")
	d.start()
	d.mustCtl("run", "polite", "--", "sh", "-c", "trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done")
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	d.mustCtl("stop", "polite", "--timeout", "20s")
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("stop waited %s: SIGTERM was not delivered", el)
	}
	c := d.inspect("polite")
	if c.State != "stopped" || c.ExitCode != 0 {
		t.Fatalf("state %s exit %d, want stopped 0", c.State, c.ExitCode)
	}
	if out := d.mustCtl("logs", "polite"); !strings.Contains(out, "bye") {
		t.Fatalf("logs %q lack the trap's output", out)
	}
	d.mustCtl("rm", "polite")
	d.assertNoTrace(t, "polite")
}

// TestRemoveForce kills a running container and removes everything.
func TestRemoveForce(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a")
	d.start()
	d.mustCtl("run", "victim", "--", "sleep", "1000")
	pid := d.inspect("victim").Pid
	_, errOut, code := d.ctl("rm", "victim")
	if code == 0 || grpcCode(errOut) != "FailedPrecondition" {
		t.Fatalf("rm of a running container: code %d %q, want FailedPrecondition", code, errOut)
	}
	d.mustCtl("rm", "-f", "victim")
	if pidAlive(pid) {
		t.Fatalf("init pid %d alive after rm -f", pid)
	}
	d.assertNoTrace(t, "victim")
}

// TestTwoDaemonsDoNotSeeEachOther: separate roots and sockets are separate agents.
func TestTwoDaemonsDoNotSeeEachOther(t *testing.T) {
	requireHost(t)
	a, b := newDaemon(t, "a"), newDaemon(t, "b")
	a.start()
	b.start()
	a.mustCtl("run", "only-a", "--", "sleep", "1000")
	b.mustCtl("run", "only-b", "--", "sleep", "1000")
	if out := a.mustCtl("ps"); strings.Contains(out, "only-b") || !strings.Contains(out, "only-a") {
		t.Fatalf("a's ps:\n%s", out)
	}
	if out := b.mustCtl("ps"); strings.Contains(out, "only-a") || !strings.Contains(out, "only-b") {
		t.Fatalf("b's ps:\n%s", out)
	}
	if _, errOut, _ := a.ctl("inspect", "only-b"); grpcCode(errOut) != "NotFound" {
		t.Fatalf("a inspect only-b: %q", errOut)
	}
	// A second ferryd on a's root is refused.
	dup := &daemon{t: t, name: "dup", root: a.root, runDir: a.runDir + "-dup", socket: a.socket + "-dup", cgParent: a.cgParent, logPath: a.logPath + "-dup", bpfRoot: a.bpfRoot}
	dup.start2Fails(t)
	a.mustCtl("rm", "-f", "only-a")
	b.mustCtl("rm", "-f", "only-b")
}

// start2Fails checks a ferryd on a root in use exits with an error naming it.
func (d *daemon) start2Fails(t testing.TB) {
	t.Helper()
	out, err := runCmd(filepath.Join(binDir, "ferryd"), "--root", d.root, "--run-dir", d.runDir, "--socket", d.socket, "--cgroup-parent", d.cgParent, "--bpf-root", d.bpfRoot, "--bridge", "")
	if err == nil || !strings.Contains(out, "in use by another ferryd") {
		t.Fatalf("second ferryd on %s: err %v, output %q", d.root, err, out)
	}
	_ = os.RemoveAll(d.runDir)
}

func runCmd(name string, args ...string) (string, error) {
	cmd := execCommand(name, args...)
	b, err := cmd.CombinedOutput()
	return string(b), err
}

// TestSIGTERMLeavesContainersAndNotifiesReady: ferryd tells systemd it is
// ready once it serves, and a clean stop (SIGTERM) leaves containers running.
func TestSIGTERMLeavesContainersAndNotifiesReady(t *testing.T) {
	requireHost(t)
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	d := newDaemon(t, "a")
	d.env = []string{"NOTIFY_SOCKET=" + sock}
	d.start()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil || !strings.Contains(string(buf[:n]), "READY=1") {
		t.Fatalf("sd_notify: got %q, %v; want READY=1", buf[:n], err)
	}

	d.mustCtl("run", "keeper", "--", "sleep", "1000")
	pid := d.inspect("keeper").Pid
	d.stop()
	if !pidAlive(pid) {
		t.Fatal("SIGTERM to ferryd killed the container")
	}
	d.start()
	if c := d.inspect("keeper"); c.State != "running" || c.Pid != pid {
		t.Fatalf("after restart: %s pid %d, want running %d", c.State, c.Pid, pid)
	}
	d.mustCtl("rm", "-f", "keeper")
	d.assertNoTrace(t, "keeper")
}

// TestRemoveFrozenContainer: a container left frozen (as by a migration cut
// short) is still removed by rm -f: SIGKILL is let through by thawing.
func TestRemoveFrozenContainer(t *testing.T) {
	requireHost(t)
	requireV1(t)
	d := newDaemon(t, "a")
	d.start()
	d.mustCtl("run", "frozen", "--", "sleep", "1000")
	c := d.inspect("frozen")
	state := filepath.Join("/sys/fs/cgroup/freezer", c.Cgroup, "freezer.state")
	if err := os.WriteFile(state, []byte("FROZEN"), 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	d.mustCtl("rm", "-f", "frozen")
	if el := time.Since(start); el > 10*time.Second {
		t.Errorf("rm -f of a frozen container took %s", el)
	}
	if pidAlive(c.Pid) {
		t.Fatal("frozen container's init survived rm -f")
	}
	d.assertNoTrace(t, "frozen")
}
