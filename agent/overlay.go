package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// mountError is an overlay mount or unmount failure with its inputs.
type mountError struct {
	op     string
	target string
	data   string
	err    error
}

func (e *mountError) Error() string {
	if e.data != "" {
		return fmt.Sprintf("%s %s (%s): %v", e.op, e.target, e.data, e.err)
	}
	return fmt.Sprintf("%s %s: %v", e.op, e.target, e.err)
}

func (e *mountError) Unwrap() error { return e.err }

// mountOverlay mounts lower (read-only) with the container's own upper layer
// at dir/rootfs. dir/upper holds every write the container makes.
func mountOverlay(lower, dir string) (string, error) {
	upper, work, merged := filepath.Join(dir, "upper"), filepath.Join(dir, "work"), overlayMerged(dir)
	for _, d := range []string{upper, work, merged} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return "", fmt.Errorf("overlay: %w", err)
		}
	}
	// The merged root must be traversable by the container's users.
	if err := os.Chmod(merged, 0o755); err != nil {
		return "", fmt.Errorf("overlay: %w", err)
	}
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_NODEV, data); err != nil {
		return "", &mountError{op: "mount overlay", target: merged, data: data, err: err}
	}
	return merged, nil
}

// unmountOverlay undoes mountOverlay; a target that is not mounted is fine.
func unmountOverlay(dir string) error {
	merged := overlayMerged(dir)
	for i := 0; i < 50; i++ {
		err := unix.Unmount(merged, unix.UMOUNT_NOFOLLOW)
		switch {
		case err == nil:
			continue // stacked mounts: unmount until none is left
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil
		case errors.Is(err, unix.EBUSY):
			if derr := unix.Unmount(merged, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); derr != nil {
				return &mountError{op: "unmount (detach)", target: merged, err: derr}
			}
		default:
			return &mountError{op: "unmount", target: merged, err: err}
		}
	}
	return &mountError{op: "unmount", target: merged, err: errors.New("still mounted after 50 unmounts")}
}

// overlayMerged is where mountOverlay mounts dir's root file system.
func overlayMerged(dir string) string { return filepath.Join(dir, "rootfs") }
