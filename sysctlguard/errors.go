package sysctlguard

import (
	"errors"
	"fmt"
)

// ErrNotAttached says a container has no guard pinned.
var ErrNotAttached = errors.New("sysctl guard not attached")

// KernelError is an operation of the guard that failed at the kernel
// boundary: creating a map, loading or attaching the program, pinning,
// reading a map. It names the operation, the container, the cgroup or pin
// path involved and wraps the kernel's error (an errno, or cilium/ebpf's
// error with the verifier log), so errors.Is(err, unix.EPERM) works.
type KernelError struct {
	Op   string // "load program", "attach", "pin", ...
	ID   string // container id, "" for operations on the pin root
	Path string // cgroup directory or pin path
	Err  error
}

func (e *KernelError) Error() string {
	if e.ID == "" {
		return fmt.Sprintf("sysctl guard: %s %s: %v", e.Op, e.Path, e.Err)
	}
	return fmt.Sprintf("sysctl guard of %q: %s %s: %v", e.ID, e.Op, e.Path, e.Err)
}

func (e *KernelError) Unwrap() error { return e.Err }

func kerr(op, id, path string, err error) error {
	if err == nil {
		return nil
	}
	return &KernelError{Op: op, ID: id, Path: path, Err: err}
}
