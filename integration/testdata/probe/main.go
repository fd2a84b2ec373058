// Command probe runs inside a test container and reports, as "name errno"
// lines, how the kernel answered calls a container must not be able to make.
package main

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

func errno(err error) string {
	if err == nil {
		return "ok"
	}
	if e, ok := err.(unix.Errno); ok {
		return unix.ErrnoName(e)
	}
	return err.Error()
}

func main() {
	for _, what := range os.Args[1:] {
		var err error
		switch what {
		case "bpf":
			// BPF_MAP_CREATE of a one-entry array: the simplest bpf() call.
			attr := [5]uint32{2 /* BPF_MAP_TYPE_ARRAY */, 4, 4, 1, 0}
			_, _, e := unix.Syscall(unix.SYS_BPF, 0 /* BPF_MAP_CREATE */, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
			if e != 0 {
				err = e
			}
		case "keyctl":
			_, err = unix.KeyctlInt(unix.KEYCTL_GET_KEYRING_ID, unix.KEY_SPEC_SESSION_KEYRING, 0, 0, 0)
		case "mount-proc":
			_ = os.MkdirAll("/tmp/probe-proc", 0o755)
			err = unix.Mount("proc", "/tmp/probe-proc", "proc", 0, "")
		case "init_module":
			err = unix.InitModule(nil, "")
		default:
			err = fmt.Errorf("unknown probe %q", what)
		}
		fmt.Printf("%s %s\n", what, errno(err))
	}
}
