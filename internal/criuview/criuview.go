// Package criuview keeps CRIU's cache of kernel probes where the host's
// /run is not a tmpfs.
//
// Each CRIU process probes the kernel at its start ("kerndat": ~25 ms here,
// with network namespaces and veths made and torn down), unless it finds
// the results of an earlier probe in /run/criu.kdat. CRIU keeps that file
// only on a tmpfs, so that a reboot (maybe into another kernel) clears it;
// systemd mounts one at /run, but some hosts (this project's development
// machines among them) have /run on disk, and there every CRIU call of a
// migration, several of them while the container is frozen, probes anew.
//
// Where that is so, ferryd mounts a small tmpfs of its own (Setup) and runs
// its CRIU calls on threads with a private mount namespace (Do) in which
// that tmpfs is /run, with ferryd's own directories under /run bound back
// at their places. CRIU then keeps its cache there by its own rules: the
// file is CRIU's, written by CRIU on a tmpfs that a reboot clears. Nothing
// changes in the host's mount namespace but the one tmpfs, and other CRIU
// users on the host (runc) are not affected.
package criuview

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// View is CRIU's /run: a tmpfs, and the host directories under /run that
// CRIU and its callers need (ferryd's run directory: libcontainer's state
// and the containers' network namespaces). A nil View is the host's /run.
type View struct {
	tmpfs   string
	keep    []string
	mounted bool // by Setup: Close unmounts it
}

// Setup returns a View when the host's /run is not a tmpfs, mounting a tmpfs
// at dir unless one is there already (from an earlier ferryd: the cache in
// it is good until the next reboot), and nil when /run is a tmpfs. keep are
// host directories that must stay visible at their paths; only those under
// /run need binding back.
func Setup(dir string, keep ...string) (*View, error) {
	if isTmpfs("/run") {
		return nil, nil
	}
	return setup("/run", dir, keep...)
}

func setup(run, dir string, keep ...string) (*View, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("CRIU's /run: %w", err)
	}
	v := &View{tmpfs: dir}
	switch {
	case isMountPoint(dir) && isTmpfs(dir):
		// An earlier ferryd's (killed before it could unmount it): this
		// one's now, cache and all.
		v.mounted = true
	case isTmpfs(dir):
		// On a tmpfs already (the state directory is): nothing to mount.
	default:
		v.mounted = true
		if err := unix.Mount("ferry-criu-run", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=4m,mode=0755"); err != nil {
			return nil, fmt.Errorf("CRIU's /run: mount tmpfs on %s: %w", dir, err)
		}
	}
	for _, k := range keep {
		k, err := filepath.Abs(k)
		if err != nil {
			return nil, err
		}
		rel, err := filepath.Rel(run, k)
		if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
			continue // not under /run: CRIU sees it anyway
		}
		if err := os.MkdirAll(filepath.Join(dir, rel), 0o755); err != nil {
			return nil, fmt.Errorf("CRIU's /run: %w", err)
		}
		v.keep = append(v.keep, k)
	}
	return v, nil
}

// Close unmounts the tmpfs Setup mounted (its cache goes with it; the
// next CRIU call probes anew). Threads in the view keep their own copy.
func (v *View) Close() error {
	if v == nil || !v.mounted {
		return nil
	}
	return unix.Unmount(v.tmpfs, unix.MNT_DETACH)
}

// Tmpfs is the view's tmpfs ("" for a nil View).
func (v *View) Tmpfs() string {
	if v == nil {
		return ""
	}
	return v.tmpfs
}

// Keep is what the view binds back under /run.
func (v *View) Keep() []string {
	if v == nil {
		return nil
	}
	return v.keep
}

// FromArgs rebuilds a View passed to a child process as Tmpfs and Keep.
func FromArgs(tmpfs string, keep []string) *View {
	if tmpfs == "" {
		return nil
	}
	return &View{tmpfs: tmpfs, keep: keep}
}

// Do runs f on a thread of its own (never the process's main thread) and
// puts that thread back as it found it afterwards: f may join a network
// namespace, say, and processes it starts inherit what it joined. Unless v
// is nil, the thread is first put into a new private mount namespace in
// which /run is the view's tmpfs.
//
// The thread goes back into the runtime's pool rather than ending: a child
// whose parent-death signal is set (ferryd sets it on CRIU daemons) gets
// that signal when the thread that started it ends, whichever goroutine
// it served last. Only should the thread's namespaces fail to come back
// does the thread end (with its goroutine).
func (v *View) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// The main thread: this goroutine holds it while another
			// thread does the work, then gives it back untouched.
			errc <- v.Do(f)
			runtime.UnlockOSThread()
			return
		}
		back, err := saveThread(v != nil)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		err = v.enter()
		if err == nil {
			err = f()
		}
		if back.restore() == nil {
			runtime.UnlockOSThread()
		} // else the thread ends with this goroutine
		back.close()
		errc <- err
	}()
	return <-errc
}

// savedThread is what Do puts back: the thread's network namespace and,
// when it enters a view, its mount namespace and working directory.
type savedThread struct {
	net, mnt, cwd int
}

func saveThread(mount bool) (*savedThread, error) {
	s := &savedThread{net: -1, mnt: -1, cwd: -1}
	var err error
	if s.net, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
		return nil, fmt.Errorf("this thread's network namespace: %w", err)
	}
	if mount {
		if s.mnt, err = unix.Open("/proc/thread-self/ns/mnt", unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
			s.cwd, err = unix.Open(".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		}
		if err != nil {
			s.close()
			return nil, fmt.Errorf("this thread's mount namespace: %w", err)
		}
	}
	return s, nil
}

func (s *savedThread) restore() error {
	if err := unix.Setns(s.net, unix.CLONE_NEWNET); err != nil {
		return err
	}
	if s.mnt < 0 {
		return nil
	}
	// Joining a mount namespace sets the thread's root and working
	// directory to the namespace's root: the working directory comes back
	// too. (The thread keeps a filesystem context of its own, a copy.)
	if err := unix.Setns(s.mnt, unix.CLONE_NEWNS); err != nil {
		return err
	}
	return unix.Fchdir(s.cwd)
}

func (s *savedThread) close() {
	for _, fd := range []int{s.net, s.mnt, s.cwd} {
		if fd >= 0 {
			_ = unix.Close(fd)
		}
	}
}

// enter puts the calling thread into a new private mount namespace in
// which /run is the view's tmpfs.
func (v *View) enter() error {
	if v == nil {
		return nil
	}
	if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_FS); err != nil {
		return fmt.Errorf("CRIU's /run: new mount namespace: %w", err)
	}
	// Nothing mounted here reaches the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("CRIU's /run: %w", err)
	}
	// The directories to keep go into the tmpfs at their places under
	// /run (in this namespace only), and the tmpfs with them over /run.
	for _, k := range v.keep {
		rel, err := filepath.Rel("/run", k)
		if err != nil {
			return err
		}
		if err := unix.Mount(k, filepath.Join(v.tmpfs, rel), "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("CRIU's /run: bind %s: %w", k, err)
		}
	}
	if err := unix.Mount(v.tmpfs, "/run", "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("CRIU's /run: bind %s: %w", v.tmpfs, err)
	}
	return nil
}

// Problem says why CRIU cannot keep its cache in the host's /run, or "".
func Problem() string {
	var st unix.Statfs_t
	if err := unix.Statfs("/run", &st); err != nil {
		return "/run: " + err.Error()
	}
	if st.Type != unix.TMPFS_MAGIC {
		return "/run is not a tmpfs"
	}
	return ""
}

// isMountPoint tells whether something is mounted at dir (its device
// differs from its parent's).
func isMountPoint(dir string) bool {
	var st, parent unix.Stat_t
	if unix.Stat(dir, &st) != nil || unix.Stat(filepath.Dir(dir), &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev
}

func isTmpfs(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.TMPFS_MAGIC
}
