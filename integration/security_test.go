package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// capBit numbers from linux/capability.h.
const (
	capSysModule = 16
	capSysAdmin  = 21
	capSysPtrace = 19
	capBPF       = 39
)

// TestContainerDefaults: namespaces, capabilities, read-only /proc/sys,
// masked paths, the root-only socket.
func TestContainerDefaults(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a")
	d.start()

	st, err := os.Stat(d.socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Mode()&os.ModeSocket == 0 {
		t.Errorf("socket mode %v, want a socket with 0600", st.Mode())
	}

	d.mustCtl("run", "sec", "--sysctl", "kernel.shmmax=12345678", "--", "sleep", "1000")
	c := d.inspect("sec")

	// Own mount, UTS, IPC, PID and network namespaces.
	for _, ns := range []string{"mnt", "uts", "ipc", "pid", "net"} {
		host, _ := os.Readlink("/proc/self/ns/" + ns)
		ctr, err := os.Readlink("/proc/" + strconv.Itoa(c.Pid) + "/ns/" + ns)
		if err != nil || ctr == host {
			t.Errorf("namespace %s: container %q host %q (err %v)", ns, ctr, host, err)
		}
	}

	// No CAP_SYS_ADMIN, CAP_BPF, CAP_SYS_MODULE, CAP_SYS_PTRACE in any set.
	status, _ := os.ReadFile("/proc/" + strconv.Itoa(c.Pid) + "/status")
	for _, l := range strings.Split(string(status), "\n") {
		for _, set := range []string{"CapEff:", "CapPrm:", "CapBnd:"} {
			if v, ok := strings.CutPrefix(l, set); ok {
				mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
				if err != nil {
					t.Fatal(err)
				}
				for _, bit := range []uint{capSysAdmin, capBPF, capSysModule, capSysPtrace} {
					if mask&(1<<bit) != 0 {
						t.Errorf("%s %x has capability bit %d", set, mask, bit)
					}
				}
			}
		}
	}

	// /proc/sys is read-only; the requested namespaced sysctl was applied inside only.
	out, _, code := d.ctl("exec", "sec", "--", "sh", "-c", "echo 1 > /proc/sys/kernel/panic")
	if code == 0 {
		t.Errorf("write to /proc/sys/kernel/panic succeeded: %q", out)
	}
	if got := strings.TrimSpace(d.mustCtl("exec", "sec", "--", "cat", "/proc/sys/kernel/shmmax")); got != "12345678" {
		t.Errorf("kernel.shmmax inside = %q, want 12345678", got)
	}
	host, _ := os.ReadFile("/proc/sys/kernel/shmmax")
	if strings.TrimSpace(string(host)) == "12345678" {
		t.Error("the container's kernel.shmmax reached the host")
	}
	// runc's masked paths: /proc/kcore and friends read as empty or are absent,
	// /sys/firmware is an empty tmpfs.
	mounts := d.mustCtl("exec", "sec", "--", "cat", "/proc/self/mountinfo")
	for _, p := range []string{"/proc/sys ", "/sys/firmware ", "/proc/irq ", "/proc/timer_list ", "/proc/keys "} {
		if !strings.Contains(mounts, p) {
			t.Errorf("mountinfo inside lacks %q (masked or read-only path)", strings.TrimSpace(p))
		}
	}
	if !strings.Contains(mountLine(mounts, "/proc/sys"), " ro") {
		t.Errorf("/proc/sys not mounted read-only: %q", mountLine(mounts, "/proc/sys"))
	}
	// Writes go to the container's own upper layer, never to the shared rootfs.
	d.mustCtl("exec", "sec", "--", "sh", "-c", "echo hi > /written-by-container")
	if _, err := os.Stat(filepath.Join(defaultRootfs, "written-by-container")); err == nil {
		_ = os.Remove(filepath.Join(defaultRootfs, "written-by-container"))
		t.Fatal("a container write reached the shared rootfs")
	}
	if _, err := os.Stat(filepath.Join(d.root, "containers", "sec", "upper", "written-by-container")); err != nil {
		t.Errorf("the write is not in the upper layer: %v", err)
	}
	d.mustCtl("rm", "-f", "sec")
	d.assertNoTrace(t, "sec")
}

func mountLine(mountinfo, target string) string {
	for _, l := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(l)
		if len(f) > 5 && f[4] == target {
			return l
		}
	}
	return ""
}

// TestLogCap: a chatty container's log stays within the cap (two files).
func TestLogCap(t *testing.T) {
	requireHost(t)
	const capBytes = 64 << 10
	d := newDaemon(t, "a", "--log-max", strconv.Itoa(capBytes))
	d.start()
	d.mustCtl("run", "chatty", "--", "sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done; echo done")
	d.waitState("chatty", "exited", 60e9)
	dir := filepath.Join(d.root, "containers", "chatty")
	var total int64
	for _, f := range []string{"container.log", "container.log.1"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if st.Size() > capBytes {
			t.Errorf("%s is %d bytes, above the cap %d", f, st.Size(), capBytes)
		}
		total += st.Size()
	}
	out := d.mustCtl("logs", "chatty")
	if !strings.HasSuffix(out, "line 19999\ndone\n") {
		t.Errorf("logs do not end with the last lines: %q", out[max(0, len(out)-40):])
	}
	if int64(len(out)) != total {
		t.Errorf("logs returned %d bytes, files hold %d", len(out), total)
	}
	d.mustCtl("rm", "chatty")
	d.assertNoTrace(t, "chatty")
}

// probeRootfs is a copy of the default rootfs with the probe binary in it.
func probeRootfs(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "rootfs")
	if out, err := exec.Command("cp", "-a", defaultRootfs, dir).CombinedOutput(); err != nil {
		t.Fatalf("copy rootfs: %v %s", err, out)
	}
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "bin", "probe"), "./testdata/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build probe: %v %s", err, out)
	}
	return dir
}

// TestSeccompDefaultProfile: every container runs under ferry's seccomp
// profile: loading BPF, kernel modules and keyrings fail with EPERM, and
// mounting procfs fails without CAP_SYS_ADMIN.
func TestSeccompDefaultProfile(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a")
	d.start()
	d.mustCtl("run", "locked", "--rootfs", probeRootfs(t), "--", "sleep", "1000")
	status := d.mustCtl("exec", "locked", "--", "cat", "/proc/self/status")
	if !strings.Contains(status, "Seccomp:\t2") {
		t.Errorf("no seccomp filter on the container's processes:\n%s", status)
	}
	out := d.mustCtl("exec", "locked", "--", "/bin/probe", "bpf", "keyctl", "init_module", "mount-proc")
	for _, want := range []string{"bpf EPERM", "keyctl EPERM", "init_module EPERM", "mount-proc EPERM"} {
		if !strings.Contains(out, want) {
			t.Errorf("probe: want %q in:\n%s", want, out)
		}
	}
	d.mustCtl("rm", "-f", "locked")
	d.assertNoTrace(t, "locked")
}

// TestSocketRefusesNonRoot: the local socket is root's alone. ferryctl run
// as nobody gets permission denied for reads and for changes alike, and
// nothing changes.
func TestSocketRefusesNonRoot(t *testing.T) {
	requireHost(t)
	setpriv := testenv.RequireBinary(t, "setpriv")
	d := newDaemon(t, "sock")
	d.start()
	d.mustCtl("run", "keep", "--", "sleep", "1000")
	before := d.inspect("keep")
	st, err := os.Stat(d.socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", st.Mode().Perm())
	}
	for _, args := range [][]string{{"ps"}, {"inspect", "keep"}, {"rm", "-f", "keep"}, {"run", "x", "--", "true"}} {
		cmd := exec.Command(setpriv, append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
			filepath.Join(binDir, "ferryctl"), "--socket", d.socket}, args...)...)
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Errorf("ferryctl %v as nobody succeeded: %s", args, out)
			continue
		}
		if !strings.Contains(strings.ToLower(string(out)), "permission denied") {
			t.Errorf("ferryctl %v as nobody: %s, want permission denied", args, out)
		}
	}
	if c := d.inspect("keep"); c.State != "running" || c.Pid != before.Pid {
		t.Errorf("keep after the attempts: %+v", c)
	}
	if _, errOut, _ := d.ctl("inspect", "x"); grpcCode(errOut) != "NotFound" {
		t.Errorf("nobody's run made a container: %s", errOut)
	}
	d.mustCtl("rm", "-f", "keep")
}
