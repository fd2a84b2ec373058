package sysctlguard

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
	"golang.org/x/sys/unix"
)

// The tests re-execute their own binary as a helper that the test moves into
// a guarded cgroup: the helper runs a script of sysctl operations on one
// locked OS thread (so that unshare affects exactly the thread that does the
// writes, and never the test process) and reports each errno.
const helperEnv = "FERRY_SG_HELPER"

func TestMain(m *testing.M) {
	if script := os.Getenv(helperEnv); script != "" {
		os.Exit(runHelper(script))
	}
	os.Exit(m.Run())
}

// step is one operation of a helper script.
type step struct {
	Op    string // open | read | write | write-fd | unshare | mount-proc | bench
	Key   string // sysctl key, for read/write/open
	Value string // for write: the bytes; "=" writes back what the key holds now
	Proc  string // procfs to use instead of /proc (mount-proc's dir)
	NS    string // for unshare: ipc | net | mnt
	N     int    // for bench: operations; for write: repetitions
}

type script struct {
	Pre  []step // before the helper is moved into the cgroup
	Main []step
}

// outcome is a step's result; Errno 0 means success, else Stage says which
// syscall failed: "open", "read" or "write".
type outcome struct {
	Op, Key string
	Errno   int
	Err     string
	Stage   string
	Value   string  // read: the contents; write: what was written
	ReadNs  float64 // bench: pread on an open descriptor
	WriteNs float64 // bench: pwrite on an open descriptor
	OpenNs  float64 // bench: open, read, close, as sysctl(8) does
}

func runHelper(js string) int {
	runtime.LockOSThread() // never unlocked: the thread's namespaces are changed
	var s script
	if err := json.Unmarshal([]byte(js), &s); err != nil {
		fmt.Fprintln(os.Stderr, "helper: bad script:", err)
		return 2
	}
	fds := map[string]int{}
	var out []outcome
	for _, st := range s.Pre {
		out = append(out, doStep(st, fds))
	}
	fmt.Println("ready")
	if line, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil || line != "go\n" {
		fmt.Fprintln(os.Stderr, "helper: no go:", line, err)
		return 2
	}
	for _, st := range s.Main {
		out = append(out, doStep(st, fds))
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		return 2
	}
	return 0
}

func sysctlPath(proc, key string) string {
	if proc == "" {
		proc = "/proc"
	}
	return filepath.Join(proc, "sys", KeyToName(key))
}

func errnoOf(err error) (int, string) {
	if err == nil {
		return 0, ""
	}
	var en unix.Errno
	if errors.As(err, &en) {
		return int(en), en.Error()
	}
	return -1, err.Error()
}

func readSysctl(path string) (string, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer func() { _ = unix.Close(fd) }()
	buf := make([]byte, 4096)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func writeSysctl(fd int, v string) error {
	n, err := unix.Pwrite(fd, []byte(v), 0)
	if err == nil && n != len(v) {
		err = fmt.Errorf("short write %d of %d", n, len(v))
	}
	return err
}

func doStep(st step, fds map[string]int) outcome {
	o := outcome{Op: st.Op, Key: st.Key}
	var err error
	fail := func(stage string, e error) { o.Stage, err = stage, e }
	path := sysctlPath(st.Proc, st.Key)
	switch st.Op {
	case "open":
		fd, e := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		fds[st.Key] = fd
		fail("open", e)
	case "read":
		v, e := readSysctl(path)
		o.Value = v
		fail("read", e)
	case "write", "write-fd":
		v := st.Value
		if v == "=" {
			var e error
			if v, e = readSysctl(path); e != nil {
				fail("read", e)
				break
			}
		}
		o.Value = v
		if st.Op == "write-fd" {
			fail("write", writeSysctl(fds[st.Key], v))
			break
		}
		for i := 0; i < max(st.N, 1); i++ { // N times, reporting the last
			fd, e := unix.Open(path, unix.O_WRONLY|unix.O_CLOEXEC, 0)
			if e != nil {
				fail("open", e)
				break
			}
			fail("write", writeSysctl(fd, v))
			_ = unix.Close(fd)
		}
	case "unshare":
		flag := map[string]int{"ipc": unix.CLONE_NEWIPC, "net": unix.CLONE_NEWNET, "mnt": unix.CLONE_NEWNS}[st.NS]
		if flag == 0 {
			err = fmt.Errorf("unknown namespace %q", st.NS)
			break
		}
		if err = unix.Unshare(flag); err == nil && flag == unix.CLONE_NEWNS {
			// Nothing mounted here may reach the host's mount namespace.
			err = unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, "")
		}
	case "mount-proc":
		err = unix.Mount("proc", st.Proc, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	case "bench":
		o.ReadNs, o.WriteNs, o.OpenNs, err = benchLoop(path, st.Value, st.N)
	default:
		err = fmt.Errorf("unknown op %q", st.Op)
	}
	o.Errno, o.Err = errnoOf(err)
	if err == nil {
		o.Stage = ""
	}
	return o
}

// benchLoop times n reads and n writes of value through one descriptor,
// and n rounds of open, read, close.
func benchLoop(path, value string, n int) (readNs, writeNs, openNs float64, err error) {
	perOp := func(start time.Time) float64 { return float64(time.Since(start).Nanoseconds()) / float64(n) }
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, 0, err
	}
	defer func() { _ = unix.Close(fd) }()
	buf := make([]byte, 256)
	start := time.Now()
	for i := 0; i < n; i++ {
		if _, err := unix.Pread(fd, buf, 0); err != nil {
			return 0, 0, 0, err
		}
	}
	readNs = perOp(start)
	v := []byte(value)
	start = time.Now()
	for i := 0; i < n; i++ {
		if _, err := unix.Pwrite(fd, v, 0); err != nil {
			return 0, 0, 0, err
		}
	}
	writeNs = perOp(start)
	start = time.Now()
	for i := 0; i < n; i++ {
		if _, err := readSysctl(path); err != nil {
			return 0, 0, 0, err
		}
	}
	return readNs, writeNs, perOp(start), nil
}

// runInCgroup starts the helper with s, moves it into cgroupDir after its
// Pre steps, lets it run Main and returns every outcome (Pre's first).
func runInCgroup(tb testing.TB, cgroupDir string, s script) []outcome {
	tb.Helper()
	js, err := json.Marshal(s)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(js))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }() // after Wait below this is a no-op
	r := bufio.NewReader(stdout)
	if line, err := r.ReadString('\n'); err != nil || line != "ready\n" {
		tb.Fatalf("helper not ready: %q %v", line, err)
	}
	if err := os.WriteFile(filepath.Join(cgroupDir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		tb.Fatalf("move helper into %s: %v", cgroupDir, err)
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		tb.Fatal(err)
	}
	var out []outcome
	if err := json.NewDecoder(r).Decode(&out); err != nil {
		tb.Fatalf("helper output: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		tb.Fatalf("helper: %v", err)
	}
	return out
}

var seq atomic.Int32

// testName is unique per test run and call: ferry-sg-test-<pid>-<n>.
func testName() string {
	return fmt.Sprintf("ferry-sg-test-%d-%d", os.Getpid(), seq.Add(1))
}

// testCgroup makes a fresh cgroup in the unified hierarchy and removes it
// when the test ends, killing what a failed test left in it.
func testCgroup(tb testing.TB) string {
	tb.Helper()
	dir, err := CgroupDir("/" + testName())
	if err != nil {
		testenv.Unavailable(tb, "no unified cgroup hierarchy: "+err.Error())
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if b, rerr := os.ReadFile(filepath.Join(dir, "cgroup.procs")); rerr == nil {
				for _, f := range strings.Fields(string(b)) {
					if pid, perr := strconv.Atoi(f); perr == nil {
						_ = syscall.Kill(pid, syscall.SIGKILL) // a helper of this test
					}
				}
			}
			if time.Now().After(deadline) {
				tb.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	return dir
}

// testManager returns a Manager on a pin root of its own: a directory under
// /sys/fs/bpf when that is a BPF filesystem, else a private BPF filesystem
// mounted on a temporary directory (/sys/fs/bpf is then sysfs, where no
// directory can be made, and mounting over it would change the host for
// everyone). Everything is detached and removed when the test ends.
func testManager(tb testing.TB) *Manager {
	tb.Helper()
	testenv.RequireRoot(tb)
	name := testName()
	var root string
	if ok, _ := IsBPFFS("/sys/fs/bpf"); ok {
		root = filepath.Join("/sys/fs/bpf", name)
	} else {
		mnt := filepath.Join(os.TempDir(), name)
		if err := os.Mkdir(mnt, 0o700); err != nil {
			tb.Fatal(err)
		}
		if mounted, err := EnsureBPFFS(mnt); err != nil || !mounted {
			_ = os.Remove(mnt)
			testenv.Unavailable(tb, fmt.Sprintf("cannot mount a BPF filesystem on %s: mounted %v, %v", mnt, mounted, err))
		}
		tb.Cleanup(func() {
			if err := unix.Unmount(mnt, 0); err != nil {
				tb.Errorf("unmount %s: %v", mnt, err)
			}
			if err := os.Remove(mnt); err != nil {
				tb.Errorf("remove %s: %v", mnt, err)
			}
		})
		root = filepath.Join(mnt, "ferry")
	}
	m, err := NewManager(root)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if _, _, err := m.Reconcile(context.Background(), nil); err != nil {
			tb.Errorf("detach all: %v", err)
		}
		if err := os.Remove(root); err != nil {
			tb.Errorf("remove pin root: %v", err)
		}
	})
	return m
}
