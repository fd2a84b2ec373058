package netsetup

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// ensureSharedDir makes dir a mount point with shared propagation, as
// iproute2 does for /run/netns: a netns bind mount made or removed here then
// propagates to the mount namespaces cloned from ours (a container's, a
// service's with PrivateTmp), so an unmount here does not leave a copy
// elsewhere that keeps the namespace, and its loopback, alive.
func ensureSharedDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return &OpError{Op: "create netns dir", Netns: dir, Err: err}
	}
	for made := false; ; made = true {
		err := unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || made {
			return &OpError{Op: "make netns dir shared", Netns: dir, Err: err}
		}
		// Not a mount point yet: bind it onto itself, then retry once.
		if err := unix.Mount(dir, dir, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return &OpError{Op: "bind netns dir onto itself", Netns: dir, Err: err}
		}
	}
}

// createNetns makes a new network namespace and bind-mounts it on path (the
// `ip netns add` dance), on a locked OS thread that returns to its own
// namespace afterwards (see onThreadInNetns).
func createNetns(path string) (retErr error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o444)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			err = fmt.Errorf("%w (left over? Reconcile removes orphans): %w", err, ErrInUse)
		}
		return &OpError{Op: "create netns file", Netns: path, Err: err}
	}
	if err := f.Close(); err != nil {
		return &OpError{Op: "create netns file", Netns: path, Err: err}
	}
	defer func() {
		if retErr != nil {
			if err := os.Remove(path); err != nil {
				retErr = errors.Join(retErr, &OpError{Op: "undo: remove netns file", Netns: path, Err: err})
			}
		}
	}()
	return onThreadInNetns(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return &OpError{Op: "unshare netns", Netns: path, Err: err}
		}
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(self, path, "", unix.MS_BIND, ""); err != nil {
			return &OpError{Op: "bind-mount netns", Netns: path, Err: err}
		}
		return nil
	})
}

// removeNetns unmounts and removes a netns file. A missing file is not an
// error; removed reports whether there was one. The namespace itself goes
// away once no process and no other mount holds it.
func removeNetns(path string) (removed bool, err error) {
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return false, &OpError{Op: "unmount netns", Netns: path, Err: err}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, &OpError{Op: "remove netns file", Netns: path, Err: err}
	}
	return true, nil
}

// inNetns runs fn on a locked OS thread that has joined the network
// namespace at path, for what netlink handles cannot do: opening a socket
// (it stays in that namespace) or a /proc/sys/net file.
func inNetns(path string, fn func() error) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &OpError{Op: "open netns", Netns: path, Err: err}
	}
	defer func() { _ = unix.Close(fd) }()
	return onThreadInNetns(func() error {
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return &OpError{Op: "enter netns", Netns: path, Err: err}
		}
		return fn()
	})
}

// onThreadInNetns runs fn, which may move its thread to another network
// namespace, on a locked OS thread of its own, and moves the thread back
// afterwards. Only if that fails does the thread stay locked, so Go retires
// it and no other goroutine ever runs in the wrong namespace. (Leaving every
// such thread locked is not enough: when the thread is the process's main
// thread, Go parks it instead of ending it, and /proc/self/ns/net, the
// namespace the process appears to be in, would then be fn's.)
func onThreadInNetns(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- &OpError{Op: "open own netns", Err: err}
			return
		}
		defer func() { _ = unix.Close(orig) }()
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Stay locked: the thread is retired when this goroutine ends.
			errc <- errors.Join(ferr, &OpError{Op: "return to own netns", Err: err})
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// isNetnsMount reports whether path is a live netns bind mount (nsfs).
func isNetnsMount(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.NSFS_MAGIC
}
