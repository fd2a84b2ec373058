package migrate

import (
	"errors"
	"fmt"
)

// Error classes. Every error this package returns for one of these reasons
// wraps the class, so the server edge maps them with errors.Is (to
// InvalidArgument, PermissionDenied, ResourceExhausted, DataLoss, ...).
var (
	// ErrInvalid: bad input from ferry itself, such as Limits left at zero.
	ErrInvalid = errors.New("invalid argument")
	// ErrUnsafeEntry: ExtractTree refused an archive entry because writing
	// it could reach outside the destination or grant privilege: an
	// absolute name, a ".." component, a path through a symlink, a device
	// node, a FIFO, a hard link to outside the archive, a duplicate name.
	ErrUnsafeEntry = errors.New("unsafe archive entry")
	// ErrUnsupportedEntry: WriteTree met a file it cannot carry (a socket,
	// a FIFO, a device node other than an overlayfs whiteout, a mount
	// point inside the tree).
	ErrUnsupportedEntry = errors.New("unsupported file type")
	// ErrLimitExceeded: the archive holds more bytes or entries than the
	// receiver's Limits allow.
	ErrLimitExceeded = errors.New("archive limit exceeded")
	// ErrMalformedArchive: the stream is not a complete tar archive
	// (corrupt header, truncated content, no end-of-archive marker).
	ErrMalformedArchive = errors.New("malformed archive")
	// ErrMalformedStats: a CRIU stats file that is not one.
	ErrMalformedStats = errors.New("malformed CRIU stats file")
	// ErrParentIgnored: a dump that was given a parent image directory
	// skipped no page because of it: CRIU silently made a full dump
	// (runc#2913, runc#3112).
	ErrParentIgnored = errors.New("parent images not used")
)

// EntryError is a failure on one entry of a tree being written or
// extracted: what was attempted, on which entry (its name inside the
// archive), and why. Err is one of the classes above or the kernel's error
// (an errno, so errors.Is(err, unix.ELOOP) works), or both.
type EntryError struct {
	Op     string // "write" or "extract"
	Name   string // the entry's name as the archive carries it
	Reason string // e.g. `".." component`, "create file"
	Err    error
}

func (e *EntryError) Error() string {
	return fmt.Sprintf("migrate: %s %q: %s: %v", e.Op, e.Name, e.Reason, e.Err)
}

func (e *EntryError) Unwrap() error { return e.Err }

// StatsError is a failure to read one of CRIU's stats files.
type StatsError struct {
	Path string // the stats file, e.g. /images/3/stats-dump
	Err  error
}

func (e *StatsError) Error() string {
	return fmt.Sprintf("migrate: CRIU stats %s: %v", e.Path, e.Err)
}

func (e *StatsError) Unwrap() error { return e.Err }
