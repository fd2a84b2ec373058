package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
	"github.com/ferry-agent/ferry/netsetup"
)

var binDir string

func TestMain(m *testing.M) {
	code := func() int {
		binDir = os.Getenv("FERRY_BIN")
		if binDir == "" {
			d, err := os.MkdirTemp("", "ferry-bin-")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer func() { _ = os.RemoveAll(d) }()
			for _, b := range [][]string{
				{"-tags", "seccomp", "-o", filepath.Join(d, "ferryd"), "../cmd/ferryd"},
				{"-o", filepath.Join(d, "ferryctl"), "../cmd/ferryctl"},
				{"-tags", "seccomp failpoints", "-o", filepath.Join(d, "failpoints", "ferryd"), "../cmd/ferryd"},
			} {
				out, err := exec.Command("go", append([]string{"build"}, b...)...).CombinedOutput()
				if err != nil {
					fmt.Fprintf(os.Stderr, "go build %v: %v\n%s", b, err, out)
					return 1
				}
			}
			binDir = d
		}
		return m.Run()
	}()
	os.Exit(code)
}

const defaultRootfs = "/opt/ferry/rootfs/busybox"

var cgroupSeq atomic.Int64

// daemon is one ferryd under test with its own root, run dir, socket and
// cgroup parent.
type daemon struct {
	t        testing.TB
	name     string
	root     string
	runDir   string
	socket   string
	cgParent string
	logPath  string
	base     string
	bpfRoot  string
	netns    string // the daemon's network namespace (under /run/netns); "" for the host's
	extra    []string
	env      []string // added to ferryd's environment
	// failpoints, when set, runs the ferryd built with failpoints and turns
	// these on (FERRY_FAILPOINTS).
	failpoints string
	cmd        *exec.Cmd
	nsBase     map[string]int // netnsHeld when it came up
}

// requireHost checks what every integration test needs.
func requireHost(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequirePath(t, defaultRootfs+"/bin/busybox", "default rootfs missing (run make deps)")
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		// cgroup v2 (the VM tier): the unified hierarchy at /sys/fs/cgroup.
		testenv.RequirePath(t, "/sys/fs/cgroup/cgroup.controllers", "neither a v1 memory hierarchy nor cgroup v2 at /sys/fs/cgroup")
	}
}

// requireV1 is for tests that read v1 cgroup files; on a v2 host (the VM
// tier) they are not run by name, and fail rather than skip under CI.
func requireV1(t testing.TB) {
	t.Helper()
	testenv.RequirePath(t, "/sys/fs/cgroup/memory", "reads cgroup v1 files (the elastic and lifecycle tests on v2 are still to write)")
}

// newDaemon prepares (but does not start) a ferryd in a network namespace of
// its own (its bridge and containers' veths live there, never in the
// machine's namespace) and registers cleanup of everything it and its
// containers may leave on the host.
func newDaemon(t testing.TB, name string, extra ...string) *daemon {
	t.Helper()
	d := newDaemonIn(t, name, extra...)
	d.netns = fmt.Sprintf("ferry-it-%d-%d", os.Getpid(), cgroupSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", d.netns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", d.netns, err, out)
	}
	// A real host has lo up; CRIU's kernel probes bind to 127.0.0.1.
	if out, err := exec.Command("nsenter", "--net=/run/netns/"+d.netns, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up in %s: %v: %s", d.netns, err, out)
	}
	ns := d.netns
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	return d
}

// newHostNetDaemon prepares a ferryd in the machine's network namespace with
// networking off (--bridge ""), for tests that dial it over loopback.
func newHostNetDaemon(t testing.TB, name string, extra ...string) *daemon {
	t.Helper()
	return newDaemonIn(t, name, append([]string{"--bridge", ""}, extra...)...)
}

func newDaemonIn(t testing.TB, name string, extra ...string) *daemon {
	t.Helper()
	base, err := os.MkdirTemp("", "ferry-it-")
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{
		t: t, name: name, root: filepath.Join(base, "root"), runDir: filepath.Join(base, "run"),
		cgParent: fmt.Sprintf("/ferry-it-%d-%d", os.Getpid(), cgroupSeq.Add(1)),
		logPath:  filepath.Join(base, "ferryd.log"), extra: extra, base: base,
		bpfRoot: filepath.Join(base, "bpffs", "ferry"),
	}
	d.socket = filepath.Join(d.runDir, "ferryd.sock")
	t.Cleanup(func() {
		d.cleanup()
		if t.Failed() {
			if b, err := os.ReadFile(d.logPath); err == nil {
				t.Logf("ferryd %s log:\n%s", name, lastLines(string(b), 60))
			}
		}
		_ = os.RemoveAll(base)
	})
	return d
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (d *daemon) start() {
	d.t.Helper()
	args := append([]string{"--root", d.root, "--run-dir", d.runDir, "--socket", d.socket,
		"--cgroup-parent", d.cgParent, "--node-name", d.name, "--log-level", "debug", "--bpf-root", d.bpfRoot}, d.extra...)
	lf, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		d.t.Fatal(err)
	}
	defer func() { _ = lf.Close() }()
	bin := filepath.Join(binDir, "ferryd")
	env := d.env
	if d.failpoints != "" {
		bin = filepath.Join(binDir, "failpoints", "ferryd")
		env = append(env, "FERRY_FAILPOINTS="+d.failpoints)
	}
	cmd := exec.Command(bin, args...)
	if d.netns != "" {
		// nsenter, not "ip netns exec": the latter remounts /sys and hides the cgroups.
		cmd = exec.Command("nsenter", append([]string{"--net=/run/netns/" + d.netns, bin}, args...)...)
	}
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.cmd = cmd
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if _, _, code := d.ctl("version"); code == 0 {
			d.nsBase = d.netnsHeld()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.t.Fatalf("ferryd %s did not serve within 15s", d.name)
}

// kill9 kills ferryd with SIGKILL, as a crash would.
func (d *daemon) kill9() {
	d.t.Helper()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	_ = d.cmd.Wait()
	d.cmd = nil
}

// stop sends SIGTERM and waits for a clean exit.
func (d *daemon) stop() {
	d.t.Helper()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- d.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			d.t.Errorf("ferryd %s exited with %v after SIGTERM", d.name, err)
		}
	case <-time.After(15 * time.Second):
		_ = d.cmd.Process.Kill()
		if err := <-done; err != nil {
			d.t.Logf("ferryd %s after SIGKILL: %v", d.name, err)
		}
		d.t.Errorf("ferryd %s did not exit within 15s of SIGTERM", d.name)
	}
	d.cmd = nil
}

// restartWith kills ferryd -9 and starts it again with these failpoints
// ("" for none); its containers run on.
func (d *daemon) restartWith(failpoints string) {
	d.kill9()
	d.failpoints = failpoints
	d.start()
}

// ctl runs ferryctl against this daemon (for at most a minute).
func (d *daemon) ctl(args ...string) (stdout, stderr string, code int) {
	return d.ctlWithin(time.Minute, args...)
}

// ctlWithin is ctl with another time limit.
func (d *daemon) ctlWithin(limit time.Duration, args ...string) (stdout, stderr string, code int) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "ferryctl"), append([]string{"--socket", d.socket}, args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		d.t.Fatalf("ferryctl %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

func (d *daemon) mustCtl(args ...string) string {
	d.t.Helper()
	out, errOut, code := d.ctl(args...)
	if code != 0 {
		d.t.Fatalf("ferryctl %s: exit %d: %s%s", strings.Join(args, " "), code, errOut, out)
	}
	return out
}

// container is what `ferryctl inspect` prints.
type container struct {
	Name      string `json:"name"`
	State     string `json:"state"`
	Pid       int    `json:"pid"`
	ExitCode  int    `json:"exit_code"`
	IP        string `json:"ip"`
	MAC       string `json:"mac"`
	Cgroup    string `json:"cgroup"`
	StartedAt string `json:"started_at"`
	Guarantee struct {
		CPU    float64 `json:"cpu_cores"`
		Memory int64   `json:"memory_bytes"`
	} `json:"guarantee"`
	Ceiling struct {
		CPU    float64 `json:"cpu_cores"`
		Memory int64   `json:"memory_bytes"`
	} `json:"ceiling"`
	StatusReason string `json:"status_reason"`
}

func (d *daemon) inspect(name string) container {
	d.t.Helper()
	var c container
	out := d.mustCtl("inspect", name)
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		d.t.Fatalf("inspect %s: %v\n%s", name, err, out)
	}
	return c
}

func (d *daemon) waitState(name, state string, within time.Duration) container {
	d.t.Helper()
	deadline := time.Now().Add(within)
	var c container
	for time.Now().Before(deadline) {
		c = d.inspect(name)
		if c.State == state {
			return c
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.t.Fatalf("container %s: state %q after %s, want %q", name, c.State, within, state)
	return c
}

// cleanup removes everything this daemon may have left: containers,
// monitors, mounts, cgroups, state.
func (d *daemon) cleanup() {
	if d.cmd != nil {
		if out, _, code := d.ctl("ps", "-o", "json"); code == 0 {
			var cs []container
			_ = json.Unmarshal([]byte(out), &cs)
			for _, c := range cs {
				d.ctl("rm", "-f", c.Name)
			}
		}
		d.kill9()
	}
	killProcsMatching(d.root)
	for _, m := range mountsUnder(d.base) {
		_ = syscall.Unmount(m, syscall.MNT_DETACH)
	}
	removeCgroupTree(d.cgParent)
}

// killProcsMatching SIGKILLs every process whose command line mentions s
// (monitors of this daemon's root) and the processes in their cgroups.
func killProcsMatching(s string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err == nil && bytes.Contains(b, []byte(s)) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// hierarchies are where a container's cgroups can be: the v1 hierarchies
// (and the hybrid's unified one) on this machine, and "" for the unified
// hierarchy mounted at /sys/fs/cgroup itself (cgroup v2: the VM tier).
var hierarchies = []string{"memory", "cpu", "cpuacct", "pids", "devices", "freezer", "blkio", "cpuset", "unified", "systemd", ""}

// unifiedDir is a cgroup's directory in the unified hierarchy: under
// /sys/fs/cgroup/unified on this machine's hybrid, /sys/fs/cgroup on v2.
func unifiedDir(cg string) string {
	if cgroupV2() {
		return filepath.Join("/sys/fs/cgroup", cg)
	}
	return filepath.Join("/sys/fs/cgroup/unified", cg)
}

// cgroupV2 reports whether /sys/fs/cgroup is the unified hierarchy.
func cgroupV2() bool {
	_, err := os.Stat("/sys/fs/cgroup/cgroup.controllers")
	return err == nil
}

// cgroupDirs lists every cgroup directory at or below parent, in any hierarchy.
func cgroupDirs(parent string) []string {
	var out []string
	for _, h := range hierarchies {
		root := filepath.Join("/sys/fs/cgroup", h, parent)
		_ = filepath.WalkDir(root, func(p string, de os.DirEntry, err error) error {
			if err == nil && de.IsDir() {
				out = append(out, p)
			}
			return nil
		})
	}
	return out
}

func removeCgroupTree(parent string) {
	dirs := cgroupDirs(parent)
	for i := len(dirs) - 1; i >= 0; i-- {
		if b, err := os.ReadFile(filepath.Join(dirs[i], "cgroup.procs")); err == nil {
			for _, f := range strings.Fields(string(b)) {
				var pid int
				if _, err := fmt.Sscanf(f, "%d", &pid); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
	}
	for try := 0; try < 50; try++ {
		left := 0
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				left++
			}
		}
		if left == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// mountsUnder lists mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer func() { _ = f.Close() }()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && (fields[4] == dir || strings.HasPrefix(fields[4], dir+"/")) {
			out = append([]string{fields[4]}, out...)
		}
	}
	return out
}

// assertNoTrace fails t if anything of container name is left on the host.
func (d *daemon) assertNoTrace(t testing.TB, name string) {
	t.Helper()
	for _, h := range hierarchies {
		p := filepath.Join("/sys/fs/cgroup", h, d.cgParent, name)
		if _, err := os.Stat(p); err == nil {
			t.Errorf("container %s: cgroup %s left behind", name, p)
		}
	}
	if _, err := os.Stat(filepath.Join(d.bpfRoot, strings.ReplaceAll(name, ".", ":"))); err == nil {
		t.Errorf("container %s: sysctl guard pin left behind under %s", name, d.bpfRoot)
	}
	if ms := mountsUnder(filepath.Join(d.root, "containers", name)); len(ms) > 0 {
		t.Errorf("container %s: mounts left behind: %v", name, ms)
	}
	for _, p := range []string{filepath.Join(d.root, "containers", name), filepath.Join(d.runDir, "libcontainer", name),
		filepath.Join(d.runDir, "netns", name)} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("container %s: %s left behind", name, p)
		}
	}
	// No veth on the host's side, and no address held for it (netsetup's
	// IPAM state: its endpoints).
	veth := netsetup.VethName(name)
	show := exec.Command("ip", "link", "show", veth)
	if d.netns != "" {
		show = exec.Command("ip", "-n", d.netns, "link", "show", veth)
	}
	if out, err := show.CombinedOutput(); err == nil {
		t.Errorf("container %s: veth left behind: %s", name, bytes.TrimSpace(out))
	}
	if b, err := os.ReadFile(filepath.Join(d.root, "netsetup.json")); err == nil {
		var st struct {
			Endpoints map[string]json.RawMessage `json:"endpoints"`
		}
		if err := json.Unmarshal(b, &st); err != nil {
			t.Errorf("netsetup.json: %v", err)
		} else if ep, ok := st.Endpoints[name]; ok {
			t.Errorf("container %s: its address is still held: %s", name, ep)
		}
	}
	// No monitor of the container (its command line names the container's
	// directory), and no CRIU process of a migration (lazy-pages daemons,
	// page servers, dumps: they name a directory under work/).
	// Killed processes take a moment to go.
	for _, s := range []string{filepath.Join(d.root, "containers", name) + "\x00", filepath.Join(d.root, "work") + "/"} {
		if ps := processesWaitGone(s, 3*time.Second); len(ps) > 0 {
			t.Errorf("container %s: processes left behind: %v", name, ps)
		}
	}
}

// netnsHeld counts the network namespaces ferryd holds: its open file
// descriptors on one ("fd net:[INODE]"), and its threads in another than
// its own ("thread net:[INODE]"). A migration's private namespaces
// (internal/privnet) are held that way while the migration runs.
func (d *daemon) netnsHeld() map[string]int {
	out := map[string]int{}
	if d.cmd == nil {
		return out
	}
	pid := d.cmd.Process.Pid
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, f := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, f.Name())); err == nil && strings.HasPrefix(l, "net:[") {
			out["fd "+l]++
		}
	}
	own, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, tk := range tasks {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/task/%s/ns/net", pid, tk.Name())); err == nil && l != own {
			out["thread "+l]++
		}
	}
	return out
}

// assertNoNetnsLeak fails t if ferryd holds a network namespace it did not
// hold when it came up (waiting a little for cleanups that run after a
// call returns).
func (d *daemon) assertNoNetnsLeak(t testing.TB) {
	t.Helper()
	var extra []string
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		extra = extra[:0]
		for k, n := range d.netnsHeld() {
			if n > d.nsBase[k] {
				extra = append(extra, fmt.Sprintf("%s (%d, %d at start)", k, n, d.nsBase[k]))
			}
		}
		if len(extra) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(extra) > 0 {
		t.Errorf("ferryd %s holds network namespaces it did not at start: %v", d.name, extra)
	}
}

// processesWaitGone returns the live processes whose command line contains
// s once none is left, or after within.
func processesWaitGone(s string, within time.Duration) []string {
	deadline := time.Now().Add(within)
	for {
		var out []string
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			if err != nil || !bytes.Contains(b, []byte(s)) || !pidAlive(pid) {
				continue
			}
			out = append(out, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(string(bytes.TrimRight(b, "\x00")), "\x00", " ")))
		}
		if len(out) == 0 || time.Now().After(deadline) {
			return out
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var codeRE = regexp.MustCompile(`\(([A-Za-z]+)\)\s*$`)

// grpcCode extracts the gRPC code ferryctl prints at the end of an error.
func grpcCode(stderr string) string {
	m := codeRE.FindStringSubmatch(strings.TrimSpace(stderr))
	if m == nil {
		return ""
	}
	return m[1]
}

// pidAlive reports whether pid exists and is not a zombie.
func pidAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && len(b) > i+2 && b[i+2] != 'Z'
}

func execCommand(name string, args ...string) *exec.Cmd {
	return exec.Command(name, args...)
}
