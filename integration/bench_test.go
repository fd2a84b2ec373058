package integration

// Benchmarks of ferry side by side with the runc CLI, on the same machine,
// in the same run, on the same busybox rootfs. Run them with
//
//	make bench     (go test -run '^$' -bench . -benchtime 1x ./integration/...)
//
// Each benchmark makes its whole measurement once (b.N is ignored, so use
// -benchtime 1x) and reports medians and ratios with b.ReportMetric; the
// framework's ns/op is suppressed because it would only be the wall time of
// the whole run.
//
// What each side does per container, so the comparison can be judged:
//
// ferry: one RunContainer RPC over the local unix socket (gRPC, a client kept
// open for the whole run) to a ferryd started for this benchmark with
// networking off (its containers get a network namespace with lo only, as
// runc's do; ferry's bridge and veth setup is not measured here). ferryd
// validates the request, writes spec.json, config.json and libcontainer.json
// (each fsynced with its directory), mounts an overlay (the busybox rootfs as
// read-only lower layer, a private upper layer), and, in the versions that
// have them, books the container's guarantee and attaches its BPF sysctl
// guard to the container's cgroup; then it starts the container's
// monitor ("ferryd monitor", a fresh process of the ferryd binary), which
// creates the container with libcontainer (runc v1.4.3 as a library:
// cgroups, "ferryd init" in new pid, net, ipc, uts and mount namespaces,
// Docker's default capability set), records init.json (fsynced) and reports
// back on a pipe; the RPC returns once the init process runs. The monitor
// stays for the container's lifetime (it logs the output and records the
// exit). Removal: RemoveContainer with force: SIGKILL through a pidfd, wait
// until the monitor saw the exit (destroyed the libcontainer state and
// cgroups, wrote exit.json) and ended, then unmount the overlay and remove
// the state directory.
//
// runc: the runc CLI of Debian 12 (1.1.5) as a fresh process per operation,
// which is how the anchor in /work/shared/ENVIRONMENT.md was measured.
// `runc run -d` with a bundle made by `runc spec` (its default namespaces,
// which here are the same five: pid, network, ipc, uts, mount; its default
// capabilities, fewer than ferry's), terminal false, the busybox rootfs
// itself as a read-only root (no overlay), stdin and stdout /dev/null and
// stderr a file (runc's error messages; the container inherits it), a
// distinct cgroupsPath per container under a parent unique to the run. The
// command returns once the init runs and runc has exited; nothing of runc
// stays on the host but the container. Removal: `runc delete -f`, which in
// runc 1.1.5 sends SIGKILL and then sleeps 100 ms before it first checks
// whether the init is gone: its removal time has a floor of 100 ms that is
// a polling interval, not work. ferry's removal is driven by the exit event.
//
// Both sides run `sleep 1000`. Neither side sets up networking beyond an
// empty network namespace. The two sides alternate per container (ferry
// first for even containers, runc first for odd ones) so that machine noise
// hits both alike, and one unmeasured warm-up container per side comes
// first.
//
// Every measured operation starts after a pause (benchSettle). Without it the
// order of the two sides biases the result: the first write of a pid to a
// cgroup.procs file takes the kernel's cgroup_threadgroup_rwsem for writing,
// and percpu_down_write -> rcu_sync_enter then waits a whole RCU grace
// period (10-15 ms here, seen with perf as synchronize_rcu_normal) unless
// another write happened within the last grace period or so. Back to back,
// whichever side starts soon enough after the other's cgroup writes skips
// that wait and the other does not. After a pause both sides pay it, as a
// container started on an otherwise quiet host does.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/agent/client"
	"github.com/ferry-agent/ferry/internal/testenv"
)

const (
	benchContainers = 50
	// benchSettle is the pause before every measured operation (see above).
	benchSettle = 100 * time.Millisecond
	// benchRunc is Debian's runc, the one the anchor was measured with.
	benchRunc = "/usr/sbin/runc"
)

var benchCmd = []string{"sleep", "1000"}

// requireBenchHost is requireHost for benchmarks, plus the runc CLI: it
// skips locally and fails under CI=true.
func requireBenchHost(tb testing.TB) {
	tb.Helper()
	testenv.RequireRoot(tb)
	testenv.RequirePath(tb, defaultRootfs+"/bin/busybox", "default rootfs missing (run make deps)")
	testenv.RequirePath(tb, "/sys/fs/cgroup/memory", "cgroup v1 memory hierarchy missing")
	testenv.RequirePath(tb, benchRunc, "Debian's runc missing (run make deps)")
}

// benchDaemon is a ferryd for a benchmark: the harness's daemon is tied to
// *testing.T, this mirrors its start and cleanup for testing.TB and talks to
// ferryd through the Go client instead of ferryctl.
type benchDaemon struct {
	tb       testing.TB
	base     string
	root     string
	runDir   string
	socket   string
	cgParent string
	logPath  string
	cmd      *exec.Cmd
	cl       *client.Client
}

func newBenchDaemon(tb testing.TB) *benchDaemon {
	tb.Helper()
	base, err := os.MkdirTemp("", "ferry-bench-")
	if err != nil {
		tb.Fatal(err)
	}
	d := &benchDaemon{
		tb: tb, base: base, root: filepath.Join(base, "root"), runDir: filepath.Join(base, "run"),
		cgParent: fmt.Sprintf("/ferry-bench-%d-%d", os.Getpid(), cgroupSeq.Add(1)),
		logPath:  filepath.Join(base, "ferryd.log"),
	}
	d.socket = filepath.Join(d.runDir, "ferryd.sock")
	tb.Cleanup(func() {
		d.cleanup()
		if tb.Failed() {
			if b, err := os.ReadFile(d.logPath); err == nil {
				tb.Logf("ferryd log:\n%s", lastLines(string(b), 60))
			}
		}
		_ = os.RemoveAll(base)
	})
	return d
}

func (d *benchDaemon) start() {
	d.tb.Helper()
	lf, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		d.tb.Fatal(err)
	}
	defer func() { _ = lf.Close() }()
	bin := filepath.Join(binDir, "ferryd")
	args := []string{"--root", d.root, "--run-dir", d.runDir, "--socket", d.socket,
		"--cgroup-parent", d.cgParent, "--node-name", "bench", "--log-level", "info"}
	// Flags of newer ferryds, given only when this one has them: networking
	// off (the runc side has a bare network namespace too, and a bridge would
	// land in the machine's namespace), and the sysctl guards' BPF pins on a
	// bpffs of the benchmark's own (mounted by ferryd, unmounted by cleanup).
	help, _ := exec.Command(bin, "--help").CombinedOutput()
	if bytes.Contains(help, []byte("--bridge")) {
		args = append(args, "--bridge=")
	}
	if bytes.Contains(help, []byte("--bpf-root")) {
		args = append(args, "--bpf-root", filepath.Join(d.base, "bpffs", "ferry"))
	}
	// The elastic controller hardens the node under CPU pressure, and a
	// container without a CPU guarantee then starts with a quota of 1% of a
	// CPU: its init, which sets the container up inside the container's
	// cgroup, is throttled and a start takes hundreds of ms. With the host's
	// PSI as source, other work on the machine would trigger that; the
	// containers' parent cgroup only sees this benchmark's own load.
	if bytes.Contains(help, []byte("--pressure-source")) {
		args = append(args, "--pressure-source", "parent")
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		d.tb.Fatal(err)
	}
	d.cmd = cmd
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if cl, err := client.DialUnix(d.socket); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := cl.Version(ctx, &api.VersionRequest{})
			cancel()
			if err == nil {
				d.cl = cl
				return
			}
			_ = cl.Close()
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.tb.Fatal("ferryd did not serve within 15s")
}

func (d *benchDaemon) run(name string) (*api.Container, time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	time.Sleep(benchSettle)
	t0 := time.Now()
	c, err := d.cl.RunContainer(ctx, &api.RunContainerRequest{Name: name, Rootfs: defaultRootfs, Args: benchCmd})
	return c, time.Since(t0), err
}

func (d *benchDaemon) remove(name string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	time.Sleep(benchSettle)
	t0 := time.Now()
	_, err := d.cl.RemoveContainer(ctx, &api.RemoveContainerRequest{Name: name, Force: true})
	return time.Since(t0), err
}

// cleanup removes every container through ferryd, then whatever is left:
// processes mentioning the root, mounts under it, the cgroup parent.
func (d *benchDaemon) cleanup() {
	if d.cl != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		if l, err := d.cl.ListContainers(ctx, &api.ListContainersRequest{}); err == nil {
			for _, c := range l.GetContainers() {
				_, _ = d.cl.RemoveContainer(ctx, &api.RemoveContainerRequest{Name: c.GetName(), Force: true})
			}
		}
		cancel()
		_ = d.cl.Close()
		d.cl = nil
	}
	if d.cmd != nil {
		_ = d.cmd.Process.Signal(syscall.SIGKILL)
		_ = d.cmd.Wait()
		d.cmd = nil
	}
	killProcsMatching(d.root)
	for _, m := range mountsUnder(d.base) { // overlays, and the bpffs of newer ferryds
		_ = syscall.Unmount(m, syscall.MNT_DETACH)
	}
	removeCgroupTree(d.cgParent)
}

// monitorPids lists the "ferryd monitor" processes of this daemon.
func (d *benchDaemon) monitorPids() []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) > 1 && args[1] == "monitor" && bytes.Contains(b, []byte(d.root+"/")) {
			out = append(out, pid)
		}
	}
	return out
}

// runcBench runs containers with the runc CLI under its own state root and
// cgroup parent, and removes everything of them on cleanup.
type runcBench struct {
	tb      testing.TB
	base    string
	state   string
	parent  string
	tmpl    map[string]any
	errFile *os.File
	ids     []string
}

func newRuncBench(tb testing.TB) *runcBench {
	tb.Helper()
	base, err := os.MkdirTemp("", "runc-bench-")
	if err != nil {
		tb.Fatal(err)
	}
	r := &runcBench{tb: tb, base: base, state: filepath.Join(base, "state"),
		parent: fmt.Sprintf("/runc-bench-%d-%d", os.Getpid(), cgroupSeq.Add(1))}
	tb.Cleanup(r.cleanup)
	// Errors go to a file: a pipe would be inherited by the detached
	// container and keep cmd.Wait waiting.
	if r.errFile, err = os.OpenFile(filepath.Join(base, "runc.stderr"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		tb.Fatal(err)
	}
	tmplDir := filepath.Join(base, "template")
	if err := os.Mkdir(tmplDir, 0o700); err != nil {
		tb.Fatal(err)
	}
	if out, err := exec.Command(benchRunc, "spec", "--bundle", tmplDir).CombinedOutput(); err != nil {
		tb.Fatalf("runc spec: %v: %s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(tmplDir, "config.json"))
	if err != nil {
		tb.Fatal(err)
	}
	if err := json.Unmarshal(b, &r.tmpl); err != nil {
		tb.Fatalf("runc spec's config.json: %v", err)
	}
	return r
}

// bundle writes a bundle for id: runc spec's config.json with our command,
// no terminal, the busybox rootfs read-only and a cgroup of its own.
func (r *runcBench) bundle(id string) string {
	r.tb.Helper()
	return r.writeBundle(id, defaultRootfs, true, benchCmd)
}

// writeBundle writes bundles/id/config.json: runc spec's template with args,
// no terminal, root at rootfs and a cgroup of its own under r.parent.
func (r *runcBench) writeBundle(id, rootfs string, readonly bool, args []string) string {
	r.tb.Helper()
	var s map[string]any
	b, _ := json.Marshal(r.tmpl)
	_ = json.Unmarshal(b, &s) // a deep copy
	proc, ok1 := s["process"].(map[string]any)
	linux, ok2 := s["linux"].(map[string]any)
	if !ok1 || !ok2 {
		r.tb.Fatalf("runc spec's config.json has no process or linux object: %s", b)
	}
	proc["terminal"] = false
	proc["args"] = args
	s["root"] = map[string]any{"path": rootfs, "readonly": readonly}
	s["hostname"] = id
	linux["cgroupsPath"] = r.parent + "/" + id
	dir := filepath.Join(r.base, "bundles", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		r.tb.Fatal(err)
	}
	out, err := json.MarshalIndent(s, "", "\t")
	if err != nil {
		r.tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), out, 0o600); err != nil {
		r.tb.Fatal(err)
	}
	return dir
}

func (r *runcBench) pidFile(id string) string { return filepath.Join(r.base, "bundles", id, "pid") }

func (r *runcBench) cmd(args ...string) *exec.Cmd {
	cmd := exec.Command(benchRunc, append([]string{"--root", r.state}, args...)...)
	cmd.Stderr = r.errFile // stdin and stdout: /dev/null
	return cmd
}

// run starts id detached; the bundle must exist. Returns the init's pid.
func (r *runcBench) run(id, bundle string) (int, time.Duration, error) {
	r.ids = append(r.ids, id)
	cmd := r.cmd("run", "-d", "--bundle", bundle, "--pid-file", r.pidFile(id), id)
	time.Sleep(benchSettle)
	t0 := time.Now()
	err := cmd.Run()
	el := time.Since(t0)
	if err != nil {
		return 0, el, fmt.Errorf("runc run -d %s: %w: %s", id, err, r.stderrTail())
	}
	b, err := os.ReadFile(r.pidFile(id))
	if err != nil {
		return 0, el, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid, el, err
}

func (r *runcBench) remove(id string) (time.Duration, error) {
	cmd := r.cmd("delete", "-f", id)
	time.Sleep(benchSettle)
	t0 := time.Now()
	err := cmd.Run()
	el := time.Since(t0)
	if err != nil {
		return el, fmt.Errorf("runc delete -f %s: %w: %s", id, err, r.stderrTail())
	}
	return el, nil
}

func (r *runcBench) stderrTail() string {
	b, _ := os.ReadFile(filepath.Join(r.base, "runc.stderr"))
	return lastLines(string(b), 5)
}

func (r *runcBench) cleanup() {
	for _, id := range r.ids {
		if _, err := os.Stat(filepath.Join(r.state, id)); err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_ = exec.CommandContext(ctx, benchRunc, "--root", r.state, "delete", "-f", id).Run()
		cancel()
		if b, err := os.ReadFile(r.pidFile(id)); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pidAlive(pid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	removeCgroupTree(r.parent) // kills what is left in it, too
	if r.errFile != nil {
		_ = r.errFile.Close()
	}
	_ = os.RemoveAll(r.base)
}

// durations holds one side's measurements of one operation.
type durations []time.Duration

func (ds durations) sorted() durations {
	s := append(durations(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (ds durations) median() float64 {
	s := ds.sorted()
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return ms(s[len(s)/2])
	}
	return (ms(s[len(s)/2-1]) + ms(s[len(s)/2])) / 2
}

// quantile is the nearest-rank quantile in ms.
func (ds durations) quantile(q float64) float64 {
	s := ds.sorted()
	if len(s) == 0 {
		return 0
	}
	i := int(q*float64(len(s))+0.999999) - 1
	i = max(0, min(i, len(s)-1))
	return ms(s[i])
}

func (ds durations) row(side, op string) string {
	return fmt.Sprintf("%-6s %-7s %8.1f %8.1f %8.1f %8.1f", side, op, ds.quantile(0), ds.median(), ds.quantile(0.9), ds.quantile(1))
}

// statusKiB reads a "Name:   N kB" field of /proc/<pid>/status.
func statusKiB(pid int, field string) (int64, error) {
	return procKiB(fmt.Sprintf("/proc/%d/status", pid), field)
}

func procKiB(path, field string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			fs := strings.Fields(v)
			if len(fs) == 0 {
				break
			}
			return strconv.ParseInt(fs[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", path, field)
}

func mib(kib int64) float64 { return float64(kib) / 1024 }

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// cmdlineIs reports whether pid's command line is args.
func cmdlineIs(pid int, args []string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && string(b) == strings.Join(args, "\x00")+"\x00"
}

// BenchmarkStartRemove50 starts 50 containers with ferry and 50 with the
// runc CLI, alternating, then measures ferryd's and the monitors' memory with
// the 50 running, then removes all 100, alternating. It reports the medians
// of start and remove per side, the ratios ferry/runc, and the memory.
func BenchmarkStartRemove50(b *testing.B) {
	requireBenchHost(b)
	d := newBenchDaemon(b)
	r := newRuncBench(b)
	d.start()

	ferryName := func(i int) string { return fmt.Sprintf("fb%02d", i) }
	runcID := func(i int) string { return fmt.Sprintf("rb%02d", i) }
	bundles := make([]string, benchContainers)
	for i := range bundles {
		bundles[i] = r.bundle(runcID(i)) // made before any timing
	}
	idleKiB, err := statusKiB(d.cmd.Process.Pid, "VmRSS")
	if err != nil {
		b.Fatal(err)
	}

	// Warm-up, not measured: page cache, first cgroup creation, gRPC connection.
	if _, _, err := d.run("fwarm"); err != nil {
		b.Fatalf("ferry warm-up run: %v", err)
	}
	if _, err := d.remove("fwarm"); err != nil {
		b.Fatalf("ferry warm-up rm: %v", err)
	}
	if _, _, err := r.run("rwarm", r.bundle("rwarm")); err != nil {
		b.Fatalf("runc warm-up: %v", err)
	}
	if _, err := r.remove("rwarm"); err != nil {
		b.Fatalf("runc warm-up: %v", err)
	}

	var ferryStart, runcStart, ferryRm, runcRm durations
	ferryPids := make([]int, benchContainers)
	runcPids := make([]int, benchContainers)
	startFerry := func(i int) {
		c, el, err := d.run(ferryName(i))
		if err != nil {
			b.Fatalf("ferry run %s: %v", ferryName(i), err)
		}
		if c.GetState() != "running" || c.GetPid() <= 0 {
			b.Fatalf("ferry run %s: state %q pid %d, want running", ferryName(i), c.GetState(), c.GetPid())
		}
		ferryStart = append(ferryStart, el)
		ferryPids[i] = int(c.GetPid())
	}
	startRunc := func(i int) {
		pid, el, err := r.run(runcID(i), bundles[i])
		if err != nil {
			b.Fatal(err)
		}
		runcStart = append(runcStart, el)
		runcPids[i] = pid
	}
	for i := 0; i < benchContainers; i++ {
		if i%2 == 0 {
			startFerry(i)
			startRunc(i)
		} else {
			startRunc(i)
			startFerry(i)
		}
	}

	// Both sides really run the command (the init has exec'd by now).
	time.Sleep(200 * time.Millisecond)
	for i := 0; i < benchContainers; i++ {
		if !cmdlineIs(ferryPids[i], benchCmd) {
			b.Errorf("ferry %s: pid %d is not running %v", ferryName(i), ferryPids[i], benchCmd)
		}
		if !cmdlineIs(runcPids[i], benchCmd) {
			b.Errorf("runc %s: pid %d is not running %v", runcID(i), runcPids[i], benchCmd)
		}
	}

	// Memory with the 50 running. RSS counts the pages each process maps,
	// shared ones (the ferryd binary's text, shared by every monitor) in
	// each; PSS divides shared pages among their users, so the sum of PSS
	// is what the monitors cost together.
	ferrydKiB, err := statusKiB(d.cmd.Process.Pid, "VmRSS")
	if err != nil {
		b.Fatal(err)
	}
	mons := d.monitorPids()
	if len(mons) != benchContainers {
		b.Errorf("found %d monitor processes, want %d", len(mons), benchContainers)
	}
	var monRSS, monPSS int64
	for _, pid := range mons {
		rss, err := statusKiB(pid, "VmRSS")
		if err != nil {
			b.Fatal(err)
		}
		monRSS += rss
		pss, err := procKiB(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss")
		if err != nil {
			b.Fatal(err)
		}
		monPSS += pss
	}
	nMon := float64(max(len(mons), 1))

	for i := 0; i < benchContainers; i++ {
		rmFerry := func() {
			el, err := d.remove(ferryName(i))
			if err != nil {
				b.Fatalf("ferry rm %s: %v", ferryName(i), err)
			}
			ferryRm = append(ferryRm, el)
		}
		rmRunc := func() {
			el, err := r.remove(runcID(i))
			if err != nil {
				b.Fatal(err)
			}
			runcRm = append(runcRm, el)
		}
		if i%2 == 0 {
			rmFerry()
			rmRunc()
		} else {
			rmRunc()
			rmFerry()
		}
	}
	for i := 0; i < benchContainers; i++ {
		if pidAlive(ferryPids[i]) || pidAlive(runcPids[i]) {
			b.Errorf("container %d: a process outlived its removal (ferry pid %d alive %v, runc pid %d alive %v)",
				i, ferryPids[i], pidAlive(ferryPids[i]), runcPids[i], pidAlive(runcPids[i]))
		}
	}
	if left := d.monitorPids(); len(left) > 0 {
		b.Errorf("monitors left after removal: %v", left)
	}
	if mnts := mountsUnder(d.root); len(mnts) > 0 {
		b.Errorf("mounts left after removal: %v", mnts)
	}

	if log, err := os.ReadFile(d.logPath); err == nil && bytes.Contains(log, []byte("to=hardened")) {
		b.Logf("ferryd hardened its node during the run (ferry's numbers include CPU throttling of containers without a guarantee):\n%s",
			grepLines(string(log), "elastic state transition"))
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ferryStart.median(), "ferry-start-ms")
	b.ReportMetric(runcStart.median(), "runc-start-ms")
	b.ReportMetric(ferryStart.median()/runcStart.median(), "start-ratio")
	b.ReportMetric(ferryRm.median(), "ferry-rm-ms")
	b.ReportMetric(runcRm.median(), "runc-rm-ms")
	b.ReportMetric(ferryRm.median()/runcRm.median(), "rm-ratio")
	b.ReportMetric(mib(idleKiB), "ferryd-rss-idle-MiB")
	b.ReportMetric(mib(ferrydKiB), "ferryd-rss-MiB")
	b.ReportMetric(mib(monRSS), "monitors-rss-MiB-total")
	b.ReportMetric(mib(monRSS)/nMon, "monitor-rss-MiB")
	b.ReportMetric(mib(monPSS), "monitors-pss-MiB-total")
	b.ReportMetric(mib(monPSS)/nMon, "monitor-pss-MiB")

	var tbl strings.Builder
	fmt.Fprintf(&tbl, "%d containers per side, `%s`, rootfs %s, alternating, %s pause before each operation; ms:\n",
		benchContainers, strings.Join(benchCmd, " "), defaultRootfs, benchSettle)
	fmt.Fprintf(&tbl, "%-6s %-7s %8s %8s %8s %8s\n", "side", "op", "min", "median", "p90", "max")
	for _, l := range []string{
		ferryStart.row("ferry", "start"), runcStart.row("runc", "start"),
		ferryRm.row("ferry", "remove"), runcRm.row("runc", "remove"),
	} {
		tbl.WriteString(l + "\n")
	}
	fmt.Fprintf(&tbl, "ratio ferry/runc (medians): start %.2f, remove %.2f\n",
		ferryStart.median()/runcStart.median(), ferryRm.median()/runcRm.median())
	fmt.Fprintf(&tbl, "memory with %d running: ferryd RSS %.1f MiB (idle %.1f MiB); %d monitors: RSS %.1f MiB total (%.2f each), PSS %.1f MiB total (%.2f each); runc leaves no process besides the container",
		benchContainers, mib(ferrydKiB), mib(idleKiB), len(mons), mib(monRSS), mib(monRSS)/nMon, mib(monPSS), mib(monPSS)/nMon)
	b.Logf("\n%s", tbl.String())
}
