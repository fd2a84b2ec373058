package sysctlguard

import (
	"errors"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// DefaultPinRoot is where ferryd pins the guards unless configured otherwise.
const DefaultPinRoot = "/sys/fs/bpf/ferry"

// IsBPFFS reports whether dir is on a BPF filesystem.
func IsBPFFS(dir string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false, kerr("statfs", "", dir, err)
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// EnsureBPFFS mounts a BPF filesystem on dir unless one is there, and says
// whether it mounted. ferryd calls it for /sys/fs/bpf at start where systemd
// has not mounted it. The mount stays: it holds the pins that keep the guards
// attached across ferryd restarts.
func EnsureBPFFS(dir string) (mounted bool, err error) {
	ok, err := IsBPFFS(dir)
	if err != nil {
		return false, err
	}
	if ok {
		return false, nil
	}
	if err := unix.Mount("bpf", dir, "bpf", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700"); err != nil {
		return false, kerr("mount bpffs on", "", dir, err)
	}
	return true, nil
}

// cgroupDirID checks that dir is a cgroup v2 directory and returns its cgroup
// id (its inode number on cgroup2), which the kernel reports for a cgroup link.
func cgroupDirID(dir string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, kerr("statfs cgroup", "", dir, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("cgroup %s: not in the unified (cgroup v2) hierarchy: %w", dir, ErrInvalid)
	}
	var s unix.Stat_t
	if err := unix.Stat(dir, &s); err != nil {
		return 0, kerr("stat cgroup", "", dir, err)
	}
	if s.Mode&unix.S_IFMT != unix.S_IFDIR {
		return 0, fmt.Errorf("cgroup %s: not a directory: %w", dir, ErrInvalid)
	}
	return s.Ino, nil
}

// CgroupDir returns the directory in the unified hierarchy of a cgroup path
// such as "/ferry/web": /sys/fs/cgroup/unified/ferry/web on a v1 (hybrid)
// host, /sys/fs/cgroup/ferry/web on a v2 host. This is where Attach goes.
func CgroupDir(cgroupPath string) (string, error) {
	for _, root := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		var st unix.Statfs_t
		if err := unix.Statfs(root, &st); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return "", kerr("statfs", "", root, err)
		}
		if st.Type == unix.CGROUP2_SUPER_MAGIC {
			return filepath.Join(root, filepath.Clean("/"+cgroupPath)), nil
		}
	}
	return "", fmt.Errorf("cgroup %s: no unified (cgroup v2) hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: %w", cgroupPath, ErrInvalid)
}
