package criuview

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// view makes a View on a tmpfs of the test's, whatever the host's /run is,
// keeping keep; the tmpfs is unmounted at the end.
func view(t *testing.T, keep ...string) *View {
	t.Helper()
	testenv.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "criu-run")
	v, err := setup("/run", dir, keep...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return v
}

func mountinfo(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestEnterShowsTheTmpfsAsRunAndKeepsWhatItMust(t *testing.T) {
	testenv.RequireRoot(t)
	keep, err := os.MkdirTemp("/run", "criuview-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(keep) }()
	if err := os.WriteFile(filepath.Join(keep, "marker"), []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	v := view(t, keep, t.TempDir()) // the second is not under /run: not bound
	if len(v.Keep()) != 1 || v.Keep()[0] != keep {
		t.Fatalf("keep: %v, want [%s]", v.Keep(), keep)
	}
	hostMounts := mountinfo(t)
	var fromChild string
	err = v.Do(func() error {
		if !isTmpfs("/run") {
			t.Error("/run is not a tmpfs inside the view")
		}
		if b, err := os.ReadFile(filepath.Join(keep, "marker")); err != nil || string(b) != "kept" {
			t.Errorf("kept directory inside the view: %q, %v", b, err)
		}
		if err := os.WriteFile("/run/criu.kdat", []byte("cache"), 0o600); err != nil {
			return err
		}
		// A process started from this thread sees the view too.
		out, err := exec.Command("stat", "-f", "-c", "%T", "/run").Output()
		fromChild = strings.TrimSpace(string(out))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if fromChild != "tmpfs" {
		t.Errorf("a child's /run: %q, want tmpfs", fromChild)
	}
	// The file CRIU would write is in the tmpfs, not in the host's /run.
	if b, err := os.ReadFile(filepath.Join(v.Tmpfs(), "criu.kdat")); err != nil || string(b) != "cache" {
		t.Errorf("the view's file on the host: %q, %v", b, err)
	}
	if Problem() != "" {
		if _, err := os.Stat("/run/criu.kdat.viewtest"); err == nil {
			t.Error("unexpected file in the host's /run")
		}
	}
	// The host's mount table is what it was: the binds stayed in the
	// thread's namespace, which ended with it.
	if after := mountinfo(t); after != hostMounts {
		t.Errorf("host mounts changed:\nbefore:\n%s\nafter:\n%s", hostMounts, after)
	}
	// And this goroutine's thread never was in it.
	if isTmpfs("/run") != (Problem() == "") {
		t.Error("the test's own view of /run changed")
	}
}

// Do never changes the main thread, which cannot end: with GOMAXPROCS 1 and
// many calls, some goroutine of Do starts on it now and then.
func TestDoKeepsOffTheMainThread(t *testing.T) {
	v := view(t)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	var onMain int
	for i := 0; i < 200; i++ {
		if err := v.Do(func() error {
			if unix.Gettid() == unix.Getpid() {
				onMain++
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if onMain != 0 {
		t.Fatalf("f ran on the main thread %d times", onMain)
	}
	// The main thread's mount namespace (what /proc/PID/mountinfo shows)
	// is the host's still.
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	init, err := os.Readlink("/proc/1/ns/mnt")
	if err == nil && self != init {
		t.Fatalf("the main thread's mount namespace is %s, the host's %s", self, init)
	}
}

func TestNilViewIsTheHost(t *testing.T) {
	var v *View
	ran := false
	if err := v.Do(func() error { ran = true; return nil }); err != nil || !ran {
		t.Fatalf("nil view: ran %v, %v", ran, err)
	}
	if v.Tmpfs() != "" || v.Keep() != nil || FromArgs("", nil) != nil {
		t.Fatal("a nil view has no tmpfs")
	}
}

// With CRIU in the view, the second CRIU call loads the cache the first
// one kept on the view's tmpfs.
func TestCriuKeepsItsCacheInTheView(t *testing.T) {
	criu := testenv.RequireBinary(t, "criu")
	v := view(t)
	run := func() string {
		t.Helper()
		work := t.TempDir()
		err := v.Do(func() error {
			return exec.Command(criu, "check", "--feature", "mem_dirty_track", "-v4", "-o", filepath.Join(work, "check.log")).Run()
		})
		_ = err // the feature may be missing; the probe runs either way
		b, rerr := os.ReadFile(filepath.Join(work, "check.log"))
		if rerr != nil {
			t.Fatalf("criu check log: %v (criu: %v)", rerr, err)
		}
		return string(b)
	}
	first := run()
	if _, err := os.Stat(filepath.Join(v.Tmpfs(), "criu.kdat")); err != nil {
		t.Fatalf("CRIU kept no cache on the view's tmpfs: %v\n%s", err, first)
	}
	second := run()
	if !strings.Contains(second, "Loaded kdat cache") {
		t.Fatalf("the second call did not load the cache:\n%s", second)
	}
}

// The thread that ran f goes back to the pool, in the namespaces it had: a
// child started from it with a parent-death signal (a CRIU daemon) would
// be killed if it ended.
func TestDoPutsTheThreadBack(t *testing.T) {
	v := view(t)
	for _, v := range []*View{v, nil} {
		var tid int
		err := v.Do(func() error {
			tid = unix.Gettid()
			// As f may do: another network namespace for this thread.
			return unix.Unshare(unix.CLONE_NEWNET)
		})
		if err != nil {
			t.Fatal(err)
		}
		task := fmt.Sprintf("/proc/self/task/%d", tid)
		time.Sleep(50 * time.Millisecond) // an ending thread is gone by then
		if _, err := os.Stat(task); err != nil {
			t.Fatalf("view %v: the thread of f ended: %v", v != nil, err)
		}
		for _, ns := range []string{"mnt", "net"} {
			got, err1 := os.Readlink(task + "/ns/" + ns)
			want, err2 := os.Readlink("/proc/self/ns/" + ns)
			if err1 != nil || err2 != nil || got != want {
				t.Errorf("view %v: the thread's %s namespace is %s, the process's %s (%v %v)", v != nil, ns, got, want, err1, err2)
			}
		}
	}
}

// A ferryd killed -9 leaves its tmpfs mounted; the next one takes it over
// (its cache too) and unmounts it when it stops.
func TestSetupTakesOverAnEarlierTmpfs(t *testing.T) {
	testenv.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "criu-run")
	first, err := setup("/run", dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	if !isMountPoint(dir) || !isTmpfs(dir) {
		t.Fatal("no tmpfs mounted")
	}
	if err := os.WriteFile(filepath.Join(first.Tmpfs(), "criu.kdat"), []byte("cache"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The first one dies without Close; the next one starts.
	next, err := setup("/run", dir)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(next.Tmpfs(), "criu.kdat")); err != nil || string(b) != "cache" {
		t.Errorf("the cache did not survive: %q %v", b, err)
	}
	if err := next.Close(); err != nil {
		t.Fatal(err)
	}
	if isMountPoint(dir) {
		t.Fatal("still mounted after Close")
	}
}
