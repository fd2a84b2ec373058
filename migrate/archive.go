package migrate

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The tree format is a PAX tar stream with canonical relative names ("a",
// "a/b"; directories may carry the usual trailing slash), parents before
// their children, and these entry types only: directory, regular file,
// symlink, hard link to an earlier regular file of the same stream, and
// overlayfs whiteout (character device 0:0). Both ends hold to it:
// WriteTree produces nothing else and ExtractTree accepts nothing else.
//
// What travels with an entry: its permission bits, uid/gid, mtime (to the
// nanosecond) and the extended attributes carryXattr allows.

// carryXattr says which extended attributes travel with a tree:
//
//   - overlayfs's own that describe the upper layer's content:
//     opaque (a directory hides the lower ones), redirect (a renamed
//     directory; redirect_dir=on), whiteout and whiteouts (xattr whiteouts,
//     kernel 6.7+), in the trusted.overlay. namespace and, for mounts with
//     userxattr, in user.overlay.;
//   - every other user.* attribute: unprivileged data of the container's
//     applications.
//
// Left behind: the other overlay attributes (origin, impure, nlink, upper,
// uuid, metacopy) hold file handles and UUIDs of the source host's file
// systems and mean nothing, or something wrong, on the peer; security.*
// (security.capability grants privilege as setuid does, security.selinux is
// the host's policy); system.* (POSIX ACLs; ferry's containers do not use
// them); any other trusted.*.
func carryXattr(name string) bool {
	for _, ns := range []string{"trusted.overlay.", "user.overlay."} {
		if rest, ok := strings.CutPrefix(name, ns); ok {
			switch rest {
			case "opaque", "redirect", "whiteout", "whiteouts":
				return true
			}
			return false
		}
	}
	return strings.HasPrefix(name, "user.")
}

const paxXattr = "SCHILY.xattr."

// WriteOptions tunes WriteTree.
type WriteOptions struct {
	// SkipUnsupported leaves out what the format cannot carry (sockets,
	// FIFOs, device nodes other than whiteouts) and lists it in
	// Summary.Skipped, instead of failing on the first such file. A
	// container's upper layer may hold a stale socket; CRIU's image
	// directory never does.
	SkipUnsupported bool
	// Skip, when set, leaves out the top-level entries it names (a
	// pre-copy's final image directory holds a "parent" link to the
	// previous round, which the receiver makes itself).
	Skip []string
}

// Limits bound what ExtractTree accepts. Both must be set: a receiver
// states how much of its disk a peer may fill.
type Limits struct {
	MaxBytes int64 // regular-file content, all files together
	MaxFiles int64 // entries of any type
}

// Summary counts what a tree transfer carried. The sender's and the
// receiver's agree on a complete, accepted stream; compare Entries and
// Bytes at the end of a transfer.
type Summary struct {
	Dirs, Files, Symlinks, Hardlinks, Whiteouts int64
	Bytes                                       int64 // regular-file content
	Xattrs                                      int64 // extended attributes carried
	XattrsDropped                               int64 // extended attributes carryXattr left out
	// SetidStripped lists the regular files whose setuid or setgid bit
	// ExtractTree cleared (ExtractTree only).
	SetidStripped []string
	// Skipped lists what WriteTree left out with SkipUnsupported.
	Skipped []SkippedEntry
}

// Entries is the number of entries the archive held.
func (s Summary) Entries() int64 { return s.Dirs + s.Files + s.Symlinks + s.Hardlinks + s.Whiteouts }

// SkippedEntry is a file WriteTree left out.
type SkippedEntry struct {
	Name, Reason string
}

// resolveBeneath makes openat2 refuse any path that leaves the directory
// it starts from (EXDEV), goes through any symlink, the final component
// included (ELOOP; no O_NOFOLLOW, which with O_PATH would open a final
// symlink itself), a /proc magic link or a mount point (EXDEV).
const resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// openBeneath opens name under dirfd with resolveBeneath. openat2 returns
// EAGAIN when a rename elsewhere on the file system raced the lookup.
func openBeneath(dirfd int, name string, flags int, mode uint32) (int, error) {
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: resolveBeneath}
	if flags&unix.O_CREAT != 0 {
		how.Mode = uint64(mode)
	}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(dirfd, name, &how)
		if (errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR)) && i < 16 {
			continue
		}
		return fd, err
	}
}

// closeFd closes a descriptor on a path where a close error changes
// nothing (read-only or O_PATH descriptors).
func closeFd(fd int) { _ = unix.Close(fd) }

// ---- sending ----

type treeWriter struct {
	tw    *tar.Writer
	opts  WriteOptions
	sum   Summary
	links map[[2]uint64]string // (dev, ino) of multiply-linked files → first name
}

// WriteTree streams the tree under root to w as a tar archive (the format
// above), in lexical order, and returns what it wrote. It reads through
// descriptors opened beneath root with openat2, never following a symlink,
// so a tree that changes while it is read (a running container's upper
// layer) cannot make it read outside root; a file that changes size while
// being read fails the transfer. What the format cannot carry (sockets,
// FIFOs, devices other than whiteouts, mount points inside root) fails
// with ErrUnsupportedEntry, or is skipped with opts.SkipUnsupported.
func WriteTree(w io.Writer, root string, opts WriteOptions) (Summary, error) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return Summary{}, &EntryError{Op: "write", Name: ".", Reason: "open tree root " + root, Err: err}
	}
	dir := os.NewFile(uintptr(fd), root)
	defer func() { _ = dir.Close() }()

	t := &treeWriter{tw: tar.NewWriter(w), opts: opts, links: map[[2]uint64]string{}}
	if err := t.walk(dir, fd, ""); err != nil {
		return t.sum, err
	}
	if err := t.tw.Close(); err != nil {
		return t.sum, &EntryError{Op: "write", Name: ".", Reason: "end of archive", Err: err}
	}
	return t.sum, nil
}

func (t *treeWriter) walk(dir *os.File, dirfd int, prefix string) error {
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return &EntryError{Op: "write", Name: orDot(prefix), Reason: "read directory", Err: err}
	}
	sort.Strings(names)
	for _, name := range names {
		if prefix == "" && slices.Contains(t.opts.Skip, name) {
			continue
		}
		if err := t.entry(dirfd, name, path.Join(prefix, name)); err != nil {
			return err
		}
	}
	return nil
}

func (t *treeWriter) entry(dirfd int, name, rel string) error {
	fail := func(reason string, err error) error {
		return &EntryError{Op: "write", Name: rel, Reason: reason, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fail("stat", err)
	}
	hdr := &tar.Header{
		Name:    rel,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Unix()),
		Format:  tar.FormatPAX,
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		fd, err := openBeneath(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if errors.Is(err, unix.EXDEV) {
			return t.unsupported(rel, "mount point")
		}
		if err != nil {
			return fail("open directory", err)
		}
		sub := os.NewFile(uintptr(fd), rel)
		defer func() { _ = sub.Close() }()
		if err := sameFile(fd, &st); err != nil {
			return fail("open directory", err)
		}
		hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
		if err := t.readXattrs(fd, hdr); err != nil {
			return fail("read xattrs", err)
		}
		if err := t.tw.WriteHeader(hdr); err != nil {
			return fail("write header", err)
		}
		t.sum.Dirs++
		return t.walk(sub, fd, rel)

	case unix.S_IFREG:
		key := [2]uint64{st.Dev, st.Ino}
		if first, ok := t.links[key]; ok {
			hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
			if err := t.tw.WriteHeader(hdr); err != nil {
				return fail("write header", err)
			}
			t.sum.Hardlinks++
			return nil
		}
		// O_NONBLOCK: should a FIFO have replaced the file, the open must
		// not hang; sameFile then refuses it.
		fd, err := openBeneath(dirfd, name, unix.O_RDONLY|unix.O_NONBLOCK, 0)
		if err != nil {
			return fail("open file", err)
		}
		f := os.NewFile(uintptr(fd), rel)
		defer func() { _ = f.Close() }()
		if err := sameFile(fd, &st); err != nil {
			return fail("open file", err)
		}
		hdr.Typeflag, hdr.Size = tar.TypeReg, st.Size
		if err := t.readXattrs(fd, hdr); err != nil {
			return fail("read xattrs", err)
		}
		if err := t.tw.WriteHeader(hdr); err != nil {
			return fail("write header", err)
		}
		if n, err := io.CopyN(t.tw, f, st.Size); err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("file shrank while being read: %d of %d bytes", n, st.Size)
			}
			return fail("copy content", err)
		}
		if st.Nlink > 1 {
			t.links[key] = rel
		}
		t.sum.Files++
		t.sum.Bytes += st.Size
		return nil

	case unix.S_IFLNK:
		target, err := readlinkat(dirfd, name)
		if err != nil {
			return fail("read symlink", err)
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		if err := t.tw.WriteHeader(hdr); err != nil {
			return fail("write header", err)
		}
		t.sum.Symlinks++
		return nil

	case unix.S_IFCHR:
		if st.Rdev == 0 {
			hdr.Typeflag = tar.TypeChar // Devmajor, Devminor 0: a whiteout
			if err := t.tw.WriteHeader(hdr); err != nil {
				return fail("write header", err)
			}
			t.sum.Whiteouts++
			return nil
		}
		return t.unsupported(rel, fmt.Sprintf("character device %d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)))
	case unix.S_IFBLK:
		return t.unsupported(rel, "block device")
	case unix.S_IFIFO:
		return t.unsupported(rel, "FIFO")
	case unix.S_IFSOCK:
		return t.unsupported(rel, "socket")
	}
	return t.unsupported(rel, fmt.Sprintf("file type %#o", st.Mode&unix.S_IFMT))
}

func (t *treeWriter) unsupported(rel, what string) error {
	if t.opts.SkipUnsupported {
		t.sum.Skipped = append(t.sum.Skipped, SkippedEntry{Name: rel, Reason: what})
		return nil
	}
	return &EntryError{Op: "write", Name: rel, Reason: what, Err: ErrUnsupportedEntry}
}

// sameFile refuses an fd that is not the file Fstatat saw: the tree
// changed between the two.
func sameFile(fd int, want *unix.Stat_t) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Dev != want.Dev || st.Ino != want.Ino || st.Mode&unix.S_IFMT != want.Mode&unix.S_IFMT {
		return errors.New("file replaced while the tree was read")
	}
	*want = st
	return nil
}

func (t *treeWriter) readXattrs(fd int, hdr *tar.Header) error {
	names, err := flistxattr(fd)
	if err != nil {
		return err
	}
	for _, name := range names {
		if !carryXattr(name) {
			t.sum.XattrsDropped++
			continue
		}
		v, err := fgetxattr(fd, name)
		if errors.Is(err, unix.ENODATA) {
			continue // removed meanwhile
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords[paxXattr+name] = string(v)
		t.sum.Xattrs++
	}
	return nil
}

func flistxattr(fd int) ([]string, error) {
	for {
		n, err := unix.Flistxattr(fd, nil)
		if err != nil {
			if errors.Is(err, unix.ENOTSUP) {
				return nil, nil
			}
			return nil, err
		}
		if n == 0 {
			return nil, nil
		}
		buf := make([]byte, n)
		n, err = unix.Flistxattr(fd, buf)
		if errors.Is(err, unix.ERANGE) {
			continue // grew meanwhile
		}
		if err != nil {
			return nil, err
		}
		var names []string
		for _, s := range strings.Split(string(buf[:n]), "\x00") {
			if s != "" {
				names = append(names, s)
			}
		}
		return names, nil
	}
}

func fgetxattr(fd int, name string) ([]byte, error) {
	for {
		n, err := unix.Fgetxattr(fd, name, nil)
		if err != nil {
			return nil, err
		}
		buf := make([]byte, n)
		n, err = unix.Fgetxattr(fd, name, buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}

func readlinkat(dirfd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

func orDot(s string) string {
	if s == "" {
		return "."
	}
	return s
}

// ---- receiving ----

type extractor struct {
	root    int // O_PATH descriptor of destRoot
	limits  Limits
	asRoot  bool // restore ownership (only root may)
	sum     Summary
	files   map[string]bool // regular files this stream created: the only hard-link targets
	dirs    []dirMeta       // mode and mtime applied at the end, deepest first
	entries int64
	last    string // the last entry's name, for errors about what follows it
}

type dirMeta struct {
	name  string
	mode  uint32
	mtime time.Time
}

// ExtractTree reads a tar stream written by WriteTree (the format above)
// into destRoot, an existing directory, and returns what it created.
//
// Whatever the peer sends, nothing is written outside destRoot: every path
// is resolved with openat2 beneath destRoot's descriptor with
// RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV, and entries are
// refused (ErrUnsafeEntry, naming the entry and the reason) when they have an
// absolute or non-canonical name or a ".." component, lead through a
// symlink, exist already, are device nodes other than overlayfs whiteouts
// (character device 0:0, made with mknod), FIFOs or unknown types, or are
// hard links to anything but a regular file created earlier by the same
// stream. A symlink's target is stored as given and never followed.
//
// setuid and setgid bits are stripped from regular files (listed in
// Summary.SetidStripped): a peer must not be able to hand this host
// privileged binaries. A directory keeps its setgid bit (group
// inheritance, no privilege); the sticky bit stays. Ownership is restored
// when running as root, left to the caller otherwise. Extended attributes
// outside carryXattr are dropped and counted.
//
// More than limits allow fails with ErrLimitExceeded before the entry that
// would exceed them is created. A stream that ends without tar's
// end-of-archive marker fails with ErrMalformedArchive, so a cut
// connection is not taken for a complete tree. On failure destRoot holds a
// partial tree: the caller removes it.
func ExtractTree(r io.Reader, destRoot string, limits Limits) (Summary, error) {
	if limits.MaxBytes <= 0 || limits.MaxFiles <= 0 {
		return Summary{}, fmt.Errorf("migrate: extract into %s: limits %+v: both must be set: %w", destRoot, limits, ErrInvalid)
	}
	root, err := unix.Open(destRoot, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return Summary{}, &EntryError{Op: "extract", Name: ".", Reason: "open destination " + destRoot, Err: err}
	}
	defer closeFd(root)

	x := &extractor{root: root, limits: limits, asRoot: os.Geteuid() == 0, files: map[string]bool{}}
	src := &eofReader{r: r}
	tr := tar.NewReader(src)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil // (GODEBUG=tarinsecurepath=0) badName refuses it, naming the reason
		}
		if errors.Is(err, io.EOF) {
			if src.eof {
				return x.sum, &EntryError{Op: "extract", Name: ".", Reason: "stream ended without the end-of-archive marker", Err: ErrMalformedArchive}
			}
			break
		}
		if err != nil {
			name, reason := "(start of archive)", "read header"
			if x.last != "" {
				name, reason = x.last, "read the next header after it"
			}
			return x.sum, &EntryError{Op: "extract", Name: name, Reason: reason, Err: fmt.Errorf("%w: %w", ErrMalformedArchive, err)}
		}
		if err := x.entry(hdr, tr); err != nil {
			return x.sum, err
		}
	}
	if err := x.finishDirs(); err != nil {
		return x.sum, err
	}
	return x.sum, nil
}

// eofReader notes whether the archive reader saw the underlying stream
// end. tar.Reader reports a stream cut at an entry boundary as a clean
// io.EOF; with the end-of-archive marker it stops reading before the end.
type eofReader struct {
	r   io.Reader
	eof bool
}

func (e *eofReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if n == 0 && errors.Is(err, io.EOF) {
		e.eof = true
	}
	return n, err
}

func refuse(name, reason string) error {
	return &EntryError{Op: "extract", Name: name, Reason: reason, Err: ErrUnsafeEntry}
}

// badName says what is wrong with a name that is not canonical and
// relative, or "" when it is.
func badName(name string) string {
	switch {
	case name == "":
		return "empty name"
	case strings.IndexByte(name, 0) >= 0:
		return "NUL in name"
	case strings.HasPrefix(name, "/"):
		return "absolute name"
	}
	parts := strings.Split(name, "/")
	for _, p := range parts {
		if p == ".." {
			return `".." component`
		}
	}
	for _, p := range parts {
		if p == "" || p == "." {
			return "non-canonical name"
		}
	}
	return ""
}

func (x *extractor) entry(hdr *tar.Header, tr io.Reader) error {
	raw := hdr.Name
	x.last = raw
	name := raw
	if hdr.Typeflag == tar.TypeDir {
		name = strings.TrimSuffix(name, "/")
	}
	if why := badName(name); why != "" {
		return refuse(raw, why)
	}
	fail := func(reason string, err error) error {
		switch {
		case errors.Is(err, unix.ELOOP):
			err = fmt.Errorf("%w (path through a symlink): %w", ErrUnsafeEntry, err)
		case errors.Is(err, unix.EXDEV):
			err = fmt.Errorf("%w (path leaves the tree or crosses a mount point): %w", ErrUnsafeEntry, err)
		case errors.Is(err, unix.EEXIST):
			err = fmt.Errorf("%w (already exists): %w", ErrUnsafeEntry, err)
		}
		return &EntryError{Op: "extract", Name: raw, Reason: reason, Err: err}
	}

	// Type and limits first: nothing is created for a refused entry.
	switch hdr.Typeflag {
	case tar.TypeDir, tar.TypeReg, tar.TypeSymlink:
	case tar.TypeLink:
		if why := badName(hdr.Linkname); why != "" {
			return refuse(raw, fmt.Sprintf("hard link to %q outside the tree (%s)", hdr.Linkname, why))
		}
		if !x.files[hdr.Linkname] {
			return refuse(raw, fmt.Sprintf("hard link to %q, not a regular file earlier in the archive", hdr.Linkname))
		}
	case tar.TypeChar:
		if hdr.Devmajor != 0 || hdr.Devminor != 0 {
			return refuse(raw, fmt.Sprintf("character device %d:%d (only 0:0, an overlayfs whiteout, is accepted)", hdr.Devmajor, hdr.Devminor))
		}
	case tar.TypeBlock:
		return refuse(raw, fmt.Sprintf("block device %d:%d", hdr.Devmajor, hdr.Devminor))
	case tar.TypeFifo:
		return refuse(raw, "FIFO")
	default:
		return refuse(raw, fmt.Sprintf("entry type %q", hdr.Typeflag))
	}
	for k := range hdr.PAXRecords {
		// A sparse entry expands a few bytes on the wire into up to
		// MaxBytes of zeros on disk; WriteTree never makes one.
		if strings.HasPrefix(k, "GNU.sparse.") {
			return refuse(raw, "sparse file")
		}
	}
	if hdr.Typeflag == tar.TypeSymlink && (hdr.Linkname == "" || strings.IndexByte(hdr.Linkname, 0) >= 0) {
		return refuse(raw, fmt.Sprintf("symlink target %q", hdr.Linkname))
	}
	if x.entries >= x.limits.MaxFiles {
		return &EntryError{Op: "extract", Name: raw, Reason: fmt.Sprintf("more than %d entries", x.limits.MaxFiles), Err: ErrLimitExceeded}
	}
	if hdr.Typeflag == tar.TypeReg && hdr.Size > x.limits.MaxBytes-x.sum.Bytes {
		return &EntryError{Op: "extract", Name: raw,
			Reason: fmt.Sprintf("%d bytes would bring the tree to %d, above the %d-byte limit", hdr.Size, x.sum.Bytes+hdr.Size, x.limits.MaxBytes),
			Err:    ErrLimitExceeded}
	}
	x.entries++

	dir, base := path.Split(name)
	parent := x.root
	if dir != "" {
		fd, err := openBeneath(x.root, strings.TrimSuffix(dir, "/"), unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			return fail("open parent directory", err)
		}
		defer closeFd(fd)
		parent = fd
	}

	mode := uint32(hdr.Mode) & 0o7777
	switch hdr.Typeflag {
	case tar.TypeDir:
		mode &^= unix.S_ISUID // meaningless on a directory
		if err := unix.Mkdirat(parent, base, 0o700); err != nil {
			return fail("create directory", err)
		}
		fd, err := openBeneath(parent, base, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil {
			return fail("open directory", err)
		}
		defer closeFd(fd)
		if err := x.chown(fd, hdr); err != nil {
			return fail("set owner", err)
		}
		if err := x.setXattrs(fd, hdr); err != nil {
			return fail("set xattr", err)
		}
		x.dirs = append(x.dirs, dirMeta{name: name, mode: mode, mtime: hdr.ModTime})
		x.sum.Dirs++
		return nil

	case tar.TypeReg:
		if mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
			mode &^= unix.S_ISUID | unix.S_ISGID
			x.sum.SetidStripped = append(x.sum.SetidStripped, name)
		}
		fd, err := openBeneath(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o600)
		if err != nil {
			return fail("create file", err)
		}
		f := os.NewFile(uintptr(fd), name)
		n, err := io.Copy(f, tr)
		if err == nil && n != hdr.Size {
			err = fmt.Errorf("%d of %d bytes", n, hdr.Size)
		}
		if err != nil {
			_ = f.Close()
			if errors.Is(err, io.ErrUnexpectedEOF) {
				err = fmt.Errorf("%w: content cut short: %w", ErrMalformedArchive, err)
			}
			return fail("write content", err)
		}
		x.sum.Bytes += n
		err = x.chown(fd, hdr)
		if err == nil {
			err = unix.Fchmod(fd, mode) // after chown, which clears setid bits
		}
		if err == nil {
			err = x.setXattrs(fd, hdr)
		}
		if err == nil {
			err = unix.UtimesNanoAt(fd, "", mtimeSpec(hdr.ModTime), unix.AT_EMPTY_PATH)
		}
		if cerr := f.Close(); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			return fail("set metadata", err)
		}
		x.files[name] = true
		x.sum.Files++
		return nil

	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, parent, base); err != nil {
			return fail("create symlink", err)
		}
		if x.asRoot {
			if err := unix.Fchownat(parent, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fail("set owner", err)
			}
		}
		if err := setMtime(parent, base, hdr.ModTime); err != nil {
			return fail("set mtime", err)
		}
		x.sum.Symlinks++
		return nil

	case tar.TypeLink:
		tdir, tbase := path.Split(hdr.Linkname)
		tparent := x.root
		if tdir != "" {
			fd, err := openBeneath(x.root, strings.TrimSuffix(tdir, "/"), unix.O_PATH|unix.O_DIRECTORY, 0)
			if err != nil {
				return fail("open link target's directory", err)
			}
			defer closeFd(fd)
			tparent = fd
		}
		// Flags 0: a symlink in the target's place is linked, not followed.
		if err := unix.Linkat(tparent, tbase, parent, base, 0); err != nil {
			return fail(fmt.Sprintf("hard link to %q", hdr.Linkname), err)
		}
		x.sum.Hardlinks++
		return nil

	case tar.TypeChar: // a whiteout, checked above; mode 0 as overlayfs makes them
		if err := unix.Mknodat(parent, base, unix.S_IFCHR, 0); err != nil {
			return fail("create whiteout", err)
		}
		if x.asRoot {
			if err := unix.Fchownat(parent, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fail("set owner", err)
			}
		}
		if err := setMtime(parent, base, hdr.ModTime); err != nil {
			return fail("set mtime", err)
		}
		x.sum.Whiteouts++
		return nil
	}
	return refuse(raw, fmt.Sprintf("entry type %q", hdr.Typeflag)) // not reached
}

func (x *extractor) chown(fd int, hdr *tar.Header) error {
	if !x.asRoot {
		return nil
	}
	return unix.Fchown(fd, hdr.Uid, hdr.Gid)
}

func (x *extractor) setXattrs(fd int, hdr *tar.Header) error {
	keys := make([]string, 0, len(hdr.PAXRecords))
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		name := strings.TrimPrefix(k, paxXattr)
		if !carryXattr(name) {
			x.sum.XattrsDropped++
			continue
		}
		if err := unix.Fsetxattr(fd, name, []byte(hdr.PAXRecords[k]), 0); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		x.sum.Xattrs++
	}
	return nil
}

// finishDirs sets the directories' modes and mtimes once their content is
// in: deepest first, so that creating a child neither needs a write bit a
// parent is about to lose nor bumps a parent's mtime afterwards.
func (x *extractor) finishDirs() error {
	for i := len(x.dirs) - 1; i >= 0; i-- {
		d := x.dirs[i]
		fd, err := openBeneath(x.root, d.name, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if err == nil {
			err = unix.Fchmod(fd, d.mode)
			if err == nil {
				err = unix.UtimesNanoAt(fd, "", mtimeSpec(d.mtime), unix.AT_EMPTY_PATH)
			}
			closeFd(fd)
		}
		if err != nil {
			return &EntryError{Op: "extract", Name: d.name + "/", Reason: "set directory mode and mtime", Err: err}
		}
	}
	return nil
}

func setMtime(dirfd int, base string, t time.Time) error {
	return unix.UtimesNanoAt(dirfd, base, mtimeSpec(t), unix.AT_SYMLINK_NOFOLLOW)
}

// mtimeSpec leaves atime alone and sets mtime.
func mtimeSpec(t time.Time) []unix.Timespec {
	return []unix.Timespec{{Nsec: unix.UTIME_OMIT}, unix.NsecToTimespec(t.UnixNano())}
}
