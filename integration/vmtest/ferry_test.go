package vmtest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// ferryd is one ferryd under test on its own root, socket and cgroup parent.
type ferryd struct {
	t        *testing.T
	bin      string
	base     string // holds root, run dir and log
	root     string
	socket   string
	cgParent string
	log      string
	cmd      *exec.Cmd
	// newBridge is the bridge ferryd makes (its default) when it was not
	// there before; the cleanup removes it.
	newBridge string
}

const defaultBridge = "ferry0"

func startFerryd(t *testing.T) *ferryd {
	t.Helper()
	bin := os.Getenv("FERRY_BIN")
	if bin == "" {
		testenv.Unavailable(t, "FERRY_BIN (the directory holding ferryd and ferryctl) is not set")
	}
	testenv.RequirePath(t, filepath.Join(bin, "ferryd"), "ferryd missing in FERRY_BIN")
	base := t.TempDir()
	d := &ferryd{
		t: t, bin: bin, base: base, root: filepath.Join(base, "root"), socket: filepath.Join(base, "run", "ferryd.sock"),
		cgParent: fmt.Sprintf("/ferry-vmtest-%d-ferryd", os.Getpid()), log: filepath.Join(base, "ferryd.log"),
	}
	if _, err := os.Stat("/sys/class/net/" + defaultBridge); err != nil {
		d.newBridge = defaultBridge
	}
	lf, err := os.Create(d.log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = lf.Close() }()
	d.cmd = exec.Command(filepath.Join(bin, "ferryd"), "--root", d.root, "--run-dir", filepath.Join(base, "run"),
		"--socket", d.socket, "--cgroup-parent", d.cgParent, "--node-name", "vm", "--log-level", "debug")
	d.cmd.Stdout, d.cmd.Stderr = lf, lf
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.cleanup)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := d.ctl("version"); err == nil {
			return d
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("ferryd did not serve on %s within 30s", d.socket)
	return nil
}

func (d *ferryd) ctl(args ...string) (string, error) {
	return run(context.Background(), 60*time.Second, filepath.Join(d.bin, "ferryctl"), append([]string{"--socket", d.socket}, args...)...)
}

func (d *ferryd) mustCtl(args ...string) string {
	d.t.Helper()
	out, err := d.ctl(args...)
	if err != nil {
		d.t.Fatal(err)
	}
	return out
}

// cleanup removes every container, stops ferryd, kills what is left in its
// cgroup parent (monitors live outside it) and removes the cgroups and mounts.
func (d *ferryd) cleanup() {
	if out, err := d.ctl("ps", "-o", "json"); err == nil {
		var cs []struct {
			Name string `json:"name"`
		}
		_ = json.Unmarshal([]byte(out), &cs)
		for _, c := range cs {
			_, _ = d.ctl("rm", "-f", c.Name)
		}
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
	killMatching(d.base)
	// Overlay roots under the root, network namespaces under the run dir.
	unmountUnder(d.base)
	if err := removeCgroup(filepath.Join("/sys/fs/cgroup", d.cgParent)); err != nil {
		d.t.Error(err)
	}
	if d.newBridge != "" {
		if _, err := os.Stat("/sys/class/net/" + d.newBridge); err == nil {
			if _, err := run(context.Background(), 30*time.Second, "ip", "link", "del", d.newBridge); err != nil {
				d.t.Error(err)
			}
		}
	}
	if d.t.Failed() {
		d.t.Logf("ferryd log (last lines):\n%s", logTail(d.log, 60))
	}
}

// killMatching SIGKILLs every process whose command line mentions s (the
// container monitors of a ferryd root).
func killMatching(s string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && strings.Contains(string(b), s) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// unmountUnder detaches every mount at or below dir, deepest first.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var ms []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			ms = append([]string{f[4]}, ms...)
		}
	}
	for _, m := range ms {
		_ = syscall.Unmount(m, syscall.MNT_DETACH)
	}
}

// TestFerryOnCgroupV2: ferryd on its defaults (networking, elastic sharing)
// reports cgroup v2, runs a container whose guarantee and ceiling reach the
// v2 files, execs in it, and removes its cgroup with it.
func TestFerryOnCgroupV2(t *testing.T) {
	requireVM(t)
	testenv.RequirePath(t, "/opt/ferry/rootfs/busybox/bin/busybox", "default rootfs missing")
	d := startFerryd(t)

	ver := d.mustCtl("version")
	t.Logf("ferryctl version:\n%s", ver)
	if !strings.Contains(ver, "v2") {
		t.Errorf("ferryctl version does not report cgroup v2:\n%s", ver)
	}

	d.mustCtl("run", "c2", "--mem-guarantee", "32M", "--mem-limit", "64M", "--cpu-guarantee", "0.25",
		"--cpu-limit", "0.5", "--pids", "64", "--", "sh", "-c", "while true; do sleep 1; done")
	var c struct {
		State  string `json:"state"`
		Pid    int    `json:"pid"`
		Cgroup string `json:"cgroup"`
	}
	if out := d.mustCtl("inspect", "c2"); json.Unmarshal([]byte(out), &c) != nil {
		t.Fatalf("inspect c2: %s", out)
	}
	if c.State != "running" || c.Pid <= 0 || c.Cgroup != d.cgParent+"/c2" {
		t.Fatalf("c2: state %q pid %d cgroup %q, want running in %s/c2", c.State, c.Pid, c.Cgroup, d.cgParent)
	}
	dir := filepath.Join("/sys/fs/cgroup", c.Cgroup)
	// README, elastic sharing on v2: the guarantee is memory.min and
	// cpu.weight; the effective ceiling (the ceiling, or the guarantee while
	// the node is hardened - emulated CPUs can make it so) is cpu.max and
	// memory.high + memory.max.
	const mib = 1 << 20
	if got := readTrim(t, filepath.Join(dir, "memory.min")); got != strconv.Itoa(32*mib) {
		t.Errorf("%s/memory.min = %s, want the 32M guarantee %d", dir, got, 32*mib)
	}
	if got := readTrim(t, filepath.Join(dir, "pids.max")); got != "64" {
		t.Errorf("%s/pids.max = %s, want 64", dir, got)
	}
	var quota, period int
	cpuMax := readTrim(t, filepath.Join(dir, "cpu.max"))
	if _, err := fmt.Sscanf(cpuMax, "%d %d", &quota, &period); err != nil || period <= 0 ||
		quota*4 < period || quota*2 > period {
		t.Errorf("%s/cpu.max = %q, want a quota between the 0.25-core guarantee and the 0.5-core ceiling", dir, cpuMax)
	}
	for _, f := range []string{"memory.max", "memory.high"} {
		v, err := strconv.Atoi(readTrim(t, filepath.Join(dir, f)))
		if err != nil || v < 32*mib || v > 64*mib {
			t.Errorf("%s/%s = %d (%v), want between the 32M guarantee and the 64M ceiling", dir, f, v, err)
		}
	}
	if w, err := strconv.Atoi(readTrim(t, filepath.Join(dir, "cpu.weight"))); err != nil || w < 1 || w >= 100 {
		// One core (1024 shares) weighs the default 100; a quarter less.
		t.Errorf("%s/cpu.weight = %d (%v) for a 0.25-core guarantee, want 1..99: the guarantee did not reach cgroup v2", dir, w, err)
	}
	if out, err := d.ctl("node"); err == nil {
		t.Logf("cpu.max %q, cpu.weight %s, memory.max %s; ferryctl node:\n%s", cpuMax,
			readTrim(t, filepath.Join(dir, "cpu.weight")), readTrim(t, filepath.Join(dir, "memory.max")), out)
	}
	if got := readTrim(t, fmt.Sprintf("/proc/%d/cgroup", c.Pid)); got != "0::"+c.Cgroup {
		t.Errorf("/proc/%d/cgroup = %q, want 0::%s", c.Pid, got, c.Cgroup)
	}
	// Its own cgroup namespace: inside, the container is at the root.
	if out := strings.TrimSpace(d.mustCtl("exec", "c2", "--", "cat", "/proc/self/cgroup")); out != "0::/" {
		t.Errorf("/proc/self/cgroup inside = %q, want 0::/", out)
	}
	d.mustCtl("rm", "-f", "c2")
	if pidAlive(c.Pid) {
		t.Errorf("init pid %d alive after rm -f", c.Pid)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("cgroup %s left behind after rm -f", dir)
	}
}
