package migrate

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/testenv"
)

var testLimits = Limits{MaxBytes: 64 << 20, MaxFiles: 10000}

// ---- building trees and streams ----

type entry struct {
	hdr  tar.Header
	body string
}

func reg(name, body string) entry {
	return entry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(body))}, body}
}
func dir(name string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755}}
}
func symlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}
func hardlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target}}
}
func device(typ byte, name string, major, minor int64) entry {
	return entry{hdr: tar.Header{Typeflag: typ, Name: name, Devmajor: major, Devminor: minor}}
}

// tarStream writes entries as they are, however unsafe; without end, it
// leaves out the end-of-archive marker.
func tarStream(t testing.TB, end bool, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		h.Format = tar.FormatPAX
		if h.ModTime.IsZero() && h.Typeflag != tar.TypeXGlobalHeader {
			h.ModTime = time.Unix(1700000000, 0)
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("header %q: %v", h.Name, err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatalf("body %q: %v", h.Name, err)
		}
	}
	var err error
	if end {
		err = tw.Close()
	} else {
		err = tw.Flush()
	}
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// paxRecord encodes one PAX record: "<length> key=value\n", the length
// counting itself.
func paxRecord(kv string) string {
	n := len(kv) + 3
	for len(fmt.Sprintf("%d %s\n", n, kv)) != n {
		n++
	}
	return fmt.Sprintf("%d %s\n", n, kv)
}

// setTypeflag rewrites a ustar header block's type and its checksum.
func setTypeflag(blk []byte, typ byte) {
	blk[156] = typ
	copy(blk[148:156], "        ")
	sum := 0
	for _, c := range blk {
		sum += int(c)
	}
	copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
}

// sandbox is a parent directory holding the destination and, beside it, a
// sentinel directory nothing may touch.
type sandbox struct{ parent, dest, sentinel string }

func newSandbox(t testing.TB) sandbox {
	t.Helper()
	p := t.TempDir()
	s := sandbox{parent: p, dest: filepath.Join(p, "dest"), sentinel: filepath.Join(p, "sentinel")}
	for _, d := range []string{s.dest, s.sentinel} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(s.sentinel, "keep"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

// checkContained walks the parent: only the destination's tree and the
// untouched sentinel may be there, and the destination holds nothing
// ExtractTree must not create.
func (s sandbox) checkContained(t testing.TB) {
	t.Helper()
	err := filepath.WalkDir(s.parent, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch {
		case p == s.parent, p == s.dest, p == s.sentinel:
			return nil
		case p == filepath.Join(s.sentinel, "keep"):
			if b, err := os.ReadFile(p); err != nil || string(b) != "keep" {
				t.Errorf("sentinel file changed: %q, %v", b, err)
			}
			return nil
		case !strings.HasPrefix(p, s.dest+"/"):
			t.Errorf("%s exists outside the destination", p)
			return nil
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		m := fi.Mode()
		switch {
		case m&fs.ModeCharDevice != 0:
			if st := fi.Sys().(*syscall.Stat_t); st.Rdev != 0 {
				t.Errorf("%s: character device %#x, only whiteouts may exist", p, st.Rdev)
			}
		case m&(fs.ModeDevice|fs.ModeNamedPipe|fs.ModeSocket) != 0:
			t.Errorf("%s: %v must not be created", p, m)
		case m.IsRegular() && m&(fs.ModeSetuid|fs.ModeSetgid) != 0:
			t.Errorf("%s: %v: setid bits must be stripped", p, m)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(s.sentinel)
	if err != nil || len(ents) != 1 {
		t.Errorf("sentinel holds %v (%v), want only keep", ents, err)
	}
}

// makeRemovable gives directories back the write and search bits a
// non-root t.TempDir cleanup needs.
func makeRemovable(root string) {
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
}

// describe lists a tree, one line per entry with everything the transfer
// must keep. Hard links show as the first name of their inode.
func describe(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	inodes := map[uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		line := fmt.Sprintf("type=%o perm=%04o owner=%d:%d", st.Mode&unix.S_IFMT, st.Mode&0o7777, st.Uid, st.Gid)
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			// A directory's mtime is checked too, but the source's
			// moves as the test builds it; see the callers.
			line += fmt.Sprintf(" mtime=%d", time.Unix(st.Mtim.Unix()).UnixNano())
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" sha256=%x", sha256.Sum256(b))
			if st.Nlink > 1 {
				if first, ok := inodes[st.Ino]; ok {
					line += " link-of=" + first
				} else {
					inodes[st.Ino] = rel
				}
			}
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			line += " target=" + target
		case unix.S_IFCHR:
			line += fmt.Sprintf(" rdev=%d", st.Rdev)
		}
		line += " xattrs=" + xattrList(t, p)
		out[rel] = line
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// xattrList is the carried xattrs of p, sorted.
func xattrList(t *testing.T, p string) string {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return ""
		}
		t.Fatalf("llistxattr %s: %v", p, err)
	}
	var kv []string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" || !carryXattr(name) {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("lgetxattr %s %s: %v", p, name, err)
		}
		kv = append(kv, name+"="+string(v[:m]))
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

func mkfile(t *testing.T, p, body string, mode os.FileMode, mtime time.Time) {
	t.Helper()
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(p, mtime, mtime); err != nil {
		t.Fatal(err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// roundTrip writes src, extracts into a fresh sandbox, and returns the
// destination and both summaries.
func roundTrip(t *testing.T, src string, opts WriteOptions) (string, Summary, Summary) {
	t.Helper()
	var buf bytes.Buffer
	ws, err := WriteTree(&buf, src, opts)
	if err != nil {
		t.Fatalf("WriteTree: %v", err)
	}
	sb := newSandbox(t)
	t.Cleanup(func() { makeRemovable(sb.dest) })
	es, err := ExtractTree(&buf, sb.dest, testLimits)
	if err != nil {
		t.Fatalf("ExtractTree: %v", err)
	}
	sb.checkContained(t)
	if ws.Entries() != es.Entries() || ws.Bytes != es.Bytes || ws.Xattrs != es.Xattrs {
		t.Errorf("summaries differ: wrote %+v, extracted %+v", ws, es)
	}
	return sb.dest, ws, es
}

func compareTrees(t *testing.T, src, dst string, adjust func(rel, line string) string) {
	t.Helper()
	want, got := describe(t, src), describe(t, dst)
	for rel, line := range want {
		if adjust != nil {
			line = adjust(rel, line)
		}
		if got[rel] != line {
			t.Errorf("%s:\n  source      %s\n  destination %s", rel, line, got[rel])
		}
	}
	for rel := range got {
		if _, ok := want[rel]; !ok {
			t.Errorf("%s: extracted, not in the source", rel)
		}
	}
}

// checkDirMtimes compares directories' mtimes, set last on both sides.
func checkDirMtimes(t *testing.T, src, dst string, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		a, err := os.Lstat(filepath.Join(src, d))
		must(t, err)
		b, err := os.Lstat(filepath.Join(dst, d))
		must(t, err)
		if !a.ModTime().Equal(b.ModTime()) {
			t.Errorf("%s: mtime %s, source %s", d, b.ModTime(), a.ModTime())
		}
	}
}

// ---- round trips ----

func TestTreeRoundTrip(t *testing.T) {
	src := t.TempDir()
	t0 := time.Date(2026, 11, 26, 12, 0, 0, 123456789, time.UTC)
	p := func(s string) string { return filepath.Join(src, s) }

	must(t, os.MkdirAll(p("a/b/c"), 0o755))
	must(t, os.Mkdir(p("empty"), 0o700))
	must(t, os.Mkdir(p("sgid"), 0o755))
	must(t, unix.Chmod(p("sgid"), 0o2775))
	must(t, os.Mkdir(p("tmp"), 0o755))
	must(t, unix.Chmod(p("tmp"), 0o1777))
	mkfile(t, p("a/file"), "hello, ferry\n", 0o640, t0)
	mkfile(t, p("a/b/c/deep"), strings.Repeat("x", 100000), 0o600, t0.Add(time.Second))
	mkfile(t, p("a/empty"), "", 0o444, t0.Add(2*time.Second))
	mkfile(t, p("suid"), "#!/bin/sh\n", 0o755, t0)
	must(t, unix.Chmod(p("suid"), 0o6755))
	must(t, os.Link(p("a/file"), p("a/b/hard")))
	must(t, os.Symlink("../file", p("a/b/rel")))
	must(t, os.Symlink("/etc/passwd", p("abs")))
	must(t, os.Symlink("nowhere", p("dangling")))
	must(t, unix.Lutimes(p("abs"), []unix.Timeval{unix.NsecToTimeval(t0.UnixNano()), unix.NsecToTimeval(t0.UnixNano())}))
	// A read-only directory with content.
	must(t, os.Mkdir(p("ro"), 0o755))
	mkfile(t, p("ro/inside"), "ro", 0o644, t0)
	must(t, os.Chmod(p("ro"), 0o555))
	t.Cleanup(func() { _ = os.Chmod(p("ro"), 0o755) })

	// user.* xattrs travel, where the file system has them.
	userXattrs := unix.Setxattr(p("a/file"), "user.ferry.test", []byte("v\x00binary"), 0) == nil
	if userXattrs {
		must(t, unix.Setxattr(p("a"), "user.ferry.dir", []byte("d"), 0))
	} else {
		t.Log("no user xattrs on this file system: not checked")
	}
	// Directory mtimes last: creating entries moves them.
	for i, d := range []string{"a/b/c", "a/b", "a", "empty", "sgid", "tmp", "ro"} {
		must(t, os.Chtimes(p(d), t0, t0.Add(time.Duration(i)*time.Minute)))
	}

	dst, ws, es := roundTrip(t, src, WriteOptions{})
	compareTrees(t, src, dst, func(rel, line string) string {
		if rel == "suid" {
			return strings.Replace(line, "perm=6755", "perm=0755", 1)
		}
		return line
	})
	checkDirMtimes(t, src, dst, "a/b/c", "a/b", "a", "empty", "sgid", "tmp", "ro")
	if len(es.SetidStripped) != 1 || es.SetidStripped[0] != "suid" {
		t.Errorf("SetidStripped = %v, want [suid]", es.SetidStripped)
	}
	want := Summary{Dirs: 7, Files: 5, Symlinks: 3, Hardlinks: 1, Bytes: 13 + 100000 + 10 + 2}
	if ws.Dirs != want.Dirs || ws.Files != want.Files || ws.Symlinks != want.Symlinks || ws.Hardlinks != want.Hardlinks || ws.Bytes != want.Bytes {
		t.Errorf("WriteTree summary %+v, want %+v", ws, want)
	}
	if userXattrs && ws.Xattrs != 2 {
		t.Errorf("%d xattrs carried, want 2", ws.Xattrs)
	}
}

// TestTreeRoundTripOverlay carries an overlayfs upper layer: a whiteout
// (char 0:0), an opaque directory, owners, and an overlay attribute that
// must stay behind. Then it mounts the extracted upper over the lower layer
// and checks the merged view.
func TestTreeRoundTripOverlay(t *testing.T) {
	testenv.RequireRoot(t)
	base := t.TempDir()
	lower, upper := filepath.Join(base, "lower"), filepath.Join(base, "upper")
	p := func(s string) string { return filepath.Join(upper, s) }
	for _, d := range []string{"lower/etc", "lower/opaque", "upper/etc", "upper/opaque"} {
		must(t, os.MkdirAll(filepath.Join(base, d), 0o755))
	}
	t0 := time.Date(2026, 11, 26, 12, 0, 0, 5, time.UTC)
	mkfile(t, filepath.Join(lower, "etc/gone"), "deleted in the upper layer", 0o644, t0)
	mkfile(t, filepath.Join(lower, "etc/kept"), "lower", 0o644, t0)
	mkfile(t, filepath.Join(lower, "opaque/hidden"), "hidden by the opaque dir", 0o644, t0)

	must(t, unix.Mknod(p("etc/gone"), unix.S_IFCHR, 0))
	must(t, unix.Setxattr(p("opaque"), "trusted.overlay.opaque", []byte("y"), 0))
	must(t, unix.Setxattr(p("etc"), "trusted.overlay.origin", []byte("\x00\xfb\x21host-specific"), 0))
	must(t, unix.Setxattr(p("etc"), "security.ferry-test", []byte("x"), 0))
	mkfile(t, p("opaque/new"), "upper", 0o640, t0)
	mkfile(t, p("etc/owned"), "owned", 0o600, t0)
	must(t, os.Lchown(p("etc/owned"), 1234, 5678))
	must(t, os.Symlink("owned", p("etc/owned-link")))
	must(t, os.Lchown(p("etc/owned-link"), 1234, 5678))
	must(t, os.Lchown(p("opaque"), 4321, 8765))
	must(t, unix.Lutimes(p("etc/gone"), []unix.Timeval{unix.NsecToTimeval(t0.UnixNano()), unix.NsecToTimeval(t0.UnixNano())}))
	for _, d := range []string{"etc", "opaque"} {
		must(t, os.Chtimes(p(d), t0, t0))
	}

	dst, ws, es := roundTrip(t, upper, WriteOptions{})
	compareTrees(t, upper, dst, nil)
	checkDirMtimes(t, upper, dst, "etc", "opaque")
	if ws.Whiteouts != 1 || ws.Xattrs != 1 || ws.XattrsDropped != 2 {
		t.Errorf("WriteTree summary %+v: want 1 whiteout, 1 xattr carried (opaque), 2 dropped (origin, security)", ws)
	}
	for _, name := range []string{"trusted.overlay.origin", "security.ferry-test"} {
		if _, err := unix.Getxattr(filepath.Join(dst, "etc"), name, nil); !errors.Is(err, unix.ENODATA) {
			t.Errorf("%s on the destination: %v, want ENODATA", name, err)
		}
	}

	// A peer that sends the dropped attributes anyway gets them dropped.
	h := dir("d/")
	h.hdr.PAXRecords = map[string]string{paxXattr + "trusted.overlay.origin": "x", paxXattr + "security.capability": "x", paxXattr + "user.ok": "y"}
	sb := newSandbox(t)
	s, err := ExtractTree(bytes.NewReader(tarStream(t, true, h)), sb.dest, testLimits)
	if err != nil || s.Xattrs != 1 || s.XattrsDropped != 2 {
		t.Errorf("extract with unwanted xattrs: %+v, %v", s, err)
	}
	_ = es

	// The merged view: the whiteout deletes, the opaque dir hides.
	merged, work := filepath.Join(base, "merged"), filepath.Join(base, "work")
	must(t, os.Mkdir(merged, 0o755))
	must(t, os.Mkdir(work, 0o755))
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, dst, work)
	if err := unix.Mount("overlay", merged, "overlay", 0, data); err != nil {
		testenv.Unavailable(t, "overlay mount: "+err.Error())
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", merged, err)
		}
	})
	var names []string
	must(t, filepath.WalkDir(merged, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(merged, p)
			names = append(names, rel)
		}
		return err
	}))
	sort.Strings(names)
	if got, want := strings.Join(names, " "), "etc/kept etc/owned etc/owned-link opaque/new"; got != want {
		t.Errorf("merged view: %s, want %s", got, want)
	}
}

func TestWriteTreeUnsupported(t *testing.T) {
	src := t.TempDir()
	mkfile(t, filepath.Join(src, "file"), "x", 0o644, time.Now())
	must(t, unix.Mkfifo(filepath.Join(src, "fifo"), 0o644))
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	must(t, err)
	must(t, unix.Bind(fd, &unix.SockaddrUnix{Name: filepath.Join(src, "sock")}))
	must(t, unix.Close(fd))

	_, err = WriteTree(io.Discard, src, WriteOptions{})
	var ee *EntryError
	if !errors.Is(err, ErrUnsupportedEntry) || !errors.As(err, &ee) || ee.Name != "fifo" || ee.Reason != "FIFO" {
		t.Fatalf("WriteTree with a FIFO: %v, want ErrUnsupportedEntry naming fifo", err)
	}

	var buf bytes.Buffer
	s, err := WriteTree(&buf, src, WriteOptions{SkipUnsupported: true})
	if err != nil {
		t.Fatal(err)
	}
	want := []SkippedEntry{{"fifo", "FIFO"}, {"sock", "socket"}}
	if fmt.Sprint(s.Skipped) != fmt.Sprint(want) || s.Files != 1 {
		t.Errorf("summary %+v, want file carried and skipped %v", s, want)
	}
	sb := newSandbox(t)
	if _, err := ExtractTree(&buf, sb.dest, testLimits); err != nil {
		t.Fatal(err)
	}
	sb.checkContained(t)
}

// ---- refusals ----

func TestExtractTreeRefuses(t *testing.T) {
	type tc struct {
		name    string
		stream  func(t testing.TB, s sandbox) []byte
		limits  Limits
		class   error
		errno   error  // also wrapped, when set
		entry   string // EntryError.Name
		reason  string // in the message
		created []string
	}
	stream := func(entries ...entry) func(testing.TB, sandbox) []byte {
		return func(t testing.TB, _ sandbox) []byte { return tarStream(t, true, entries...) }
	}
	big := strings.Repeat("b", 60)
	cases := []tc{
		{name: "dot-dot", stream: stream(reg("../evil", "x")), class: ErrUnsafeEntry, entry: "../evil", reason: `".." component`},
		{name: "absolute", stream: stream(reg("/abs", "x")), class: ErrUnsafeEntry, entry: "/abs", reason: "absolute name"},
		{name: "dot-dot inside", stream: stream(dir("a/"), reg("a/../../x", "x")), class: ErrUnsafeEntry, entry: "a/../../x", reason: `".." component`, created: []string{"a"}},
		{name: "dot-dot directory", stream: stream(dir("../evil/")), class: ErrUnsafeEntry, entry: "../evil/", reason: `".." component`},
		{name: "symlink to /etc, then through it", stream: stream(symlink("link", "/etc"), reg("link/passwd", "root::0:0::/:/bin/sh\n")),
			class: ErrUnsafeEntry, errno: unix.ELOOP, entry: "link/passwd", reason: "open parent directory", created: []string{"link"}},
		{name: "symlink to the sentinel, then through it", stream: func(t testing.TB, s sandbox) []byte {
			return tarStream(t, true, symlink("link", s.sentinel), reg("link/x", "x"))
		}, class: ErrUnsafeEntry, errno: unix.ELOOP, entry: "link/x", reason: "open parent directory", created: []string{"link"}},
		{name: "relative symlink out, then a directory through it", stream: stream(symlink("up", "../sentinel"), dir("up/d/")),
			class: ErrUnsafeEntry, errno: unix.ELOOP, entry: "up/d/", reason: "open parent directory", created: []string{"up"}},
		{name: "symlink, then a file in its place", stream: stream(symlink("s", "/etc/passwd"), reg("s", "x")),
			class: ErrUnsafeEntry, errno: unix.EEXIST, entry: "s", reason: "create file", created: []string{"s"}},
		{name: "duplicate file", stream: stream(reg("f", "1"), reg("f", "2")), class: ErrUnsafeEntry, errno: unix.EEXIST, entry: "f", reason: "create file", created: []string{"f"}},
		{name: "block device", stream: stream(device(tar.TypeBlock, "sda", 8, 0)), class: ErrUnsafeEntry, entry: "sda", reason: "block device 8:0"},
		{name: "char device", stream: stream(device(tar.TypeChar, "null", 1, 3)), class: ErrUnsafeEntry, entry: "null", reason: "character device 1:3"},
		{name: "char device 0:1", stream: stream(device(tar.TypeChar, "c", 0, 1)), class: ErrUnsafeEntry, entry: "c", reason: "character device 0:1"},
		{name: "fifo", stream: stream(device(tar.TypeFifo, "fifo", 0, 0)), class: ErrUnsafeEntry, entry: "fifo", reason: "FIFO"},
		{name: "hard link to an absolute path", stream: stream(hardlink("h", "/etc/passwd")), class: ErrUnsafeEntry, entry: "h", reason: "outside the tree"},
		{name: "hard link out", stream: stream(hardlink("h", "../sentinel/keep")), class: ErrUnsafeEntry, entry: "h", reason: "outside the tree"},
		{name: "hard link to a symlink", stream: stream(symlink("s", "/etc/passwd"), hardlink("h", "s")), class: ErrUnsafeEntry, entry: "h", reason: "not a regular file earlier", created: []string{"s"}},
		{name: "hard link forward", stream: stream(hardlink("h", "f"), reg("f", "x")), class: ErrUnsafeEntry, entry: "h", reason: "not a regular file earlier"},
		{name: "non-canonical ./", stream: stream(reg("./a", "x")), class: ErrUnsafeEntry, entry: "./a", reason: "non-canonical"},
		{name: "non-canonical //", stream: stream(dir("a/"), reg("a//b", "x")), class: ErrUnsafeEntry, entry: "a//b", reason: "non-canonical", created: []string{"a"}},
		{name: "dot", stream: stream(dir("./")), class: ErrUnsafeEntry, entry: "./", reason: "non-canonical"},
		{name: "missing parent", stream: stream(reg("no/such", "x")), errno: unix.ENOENT, entry: "no/such", reason: "open parent directory"},
		{name: "sparse file", stream: func(t testing.TB, _ sandbox) []byte {
			// PAX sparse 1.0 (archive/tar's writer will not make one): a
			// 1 GiB file of zeros from one 512-byte block holding the map.
			pax := ""
			for _, kv := range []string{"GNU.sparse.major=1", "GNU.sparse.minor=0", "GNU.sparse.name=sparse", "GNU.sparse.realsize=1073741824"} {
				pax += paxRecord(kv)
			}
			x := reg("PaxHeaders/sparse", pax)
			b := tarStream(t, true, x, reg("GNUSparseFile.0/sparse", "1\n0\n0\n"+strings.Repeat("\x00", 512-6)))
			setTypeflag(b[:512], tar.TypeXHeader)
			return b
		}, class: ErrUnsafeEntry, entry: "sparse", reason: "sparse file"},
		{name: "global header", stream: stream(entry{hdr: tar.Header{Typeflag: tar.TypeXGlobalHeader, PAXRecords: map[string]string{"comment": "x"}}}),
			class: ErrUnsafeEntry, entry: "GlobalHead.0.0", reason: "entry type 'g'"},
		{name: "too many bytes", stream: stream(reg("one", big), reg("two", big)), limits: Limits{MaxBytes: 100, MaxFiles: 10},
			class: ErrLimitExceeded, entry: "two", reason: "above the 100-byte limit", created: []string{"one"}},
		{name: "one file too big", stream: stream(reg("huge", strings.Repeat("h", 101))), limits: Limits{MaxBytes: 100, MaxFiles: 10},
			class: ErrLimitExceeded, entry: "huge", reason: "101 bytes would bring the tree to 101"},
		{name: "too many files", stream: stream(dir("d/"), reg("d/1", ""), symlink("d/2", "1"), reg("d/3", "")), limits: Limits{MaxBytes: 100, MaxFiles: 3},
			class: ErrLimitExceeded, entry: "d/3", reason: "more than 3 entries", created: []string{"d", "d/1", "d/2"}},
		{name: "no end-of-archive marker", stream: func(t testing.TB, _ sandbox) []byte { return tarStream(t, false, reg("f", "x")) },
			class: ErrMalformedArchive, entry: ".", reason: "without the end-of-archive marker", created: []string{"f"}},
		{name: "half an end-of-archive marker", stream: func(t testing.TB, _ sandbox) []byte { b := tarStream(t, true, reg("f", "x")); return b[:len(b)-512] },
			class: ErrMalformedArchive, entry: ".", reason: "without the end-of-archive marker", created: []string{"f"}},
		{name: "content cut short", stream: func(t testing.TB, _ sandbox) []byte {
			b := tarStream(t, true, reg("f", big))
			return b[:len(b)-1024-512+10]
		},
			class: ErrMalformedArchive, entry: "f", reason: "write content", created: []string{"f"}},
		{name: "garbage", stream: func(t testing.TB, _ sandbox) []byte { return bytes.Repeat([]byte("ferry"), 200) },
			class: ErrMalformedArchive, entry: "(start of archive)", reason: "read header"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sb := newSandbox(t)
			limits := c.limits
			if limits == (Limits{}) {
				limits = testLimits
			}
			_, err := ExtractTree(bytes.NewReader(c.stream(t, sb)), sb.dest, limits)
			t.Log(err)
			var ee *EntryError
			switch {
			case err == nil:
				t.Fatal("extracted, want a refusal")
			case c.class != nil && !errors.Is(err, c.class):
				t.Errorf("error %v, want class %v", err, c.class)
			case c.errno != nil && !errors.Is(err, c.errno):
				t.Errorf("error %v, want errno %v", err, c.errno)
			case !errors.As(err, &ee):
				t.Errorf("error %v (%T), want an *EntryError", err, err)
			case ee.Name != c.entry || !strings.Contains(err.Error(), c.reason) || !strings.Contains(err.Error(), fmt.Sprintf("%q", c.entry)):
				t.Errorf("error %q, want it to name entry %q and say %q", err, c.entry, c.reason)
			}
			sb.checkContained(t)
			var created []string
			must(t, filepath.WalkDir(sb.dest, func(p string, d fs.DirEntry, err error) error {
				if err == nil && p != sb.dest {
					rel, _ := filepath.Rel(sb.dest, p)
					created = append(created, rel)
				}
				return err
			}))
			if fmt.Sprint(created) != fmt.Sprint(c.created) {
				t.Errorf("destination holds %v, want %v", created, c.created)
			}
		})
	}
}

func TestExtractTreeStripsSetid(t *testing.T) {
	f := reg("bin/su", "#!/bin/sh\n")
	f.hdr.Mode = 0o4755
	g := reg("bin/sg", "#!/bin/sh\n")
	g.hdr.Mode = 0o2711
	d := dir("bin/")
	d.hdr.Mode = 0o6775 // a directory keeps setgid, loses setuid
	sb := newSandbox(t)
	s, err := ExtractTree(bytes.NewReader(tarStream(t, true, d, f, g)), sb.dest, testLimits)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]uint32{"bin": 0o2775, "bin/su": 0o755, "bin/sg": 0o711} {
		var st unix.Stat_t
		must(t, unix.Lstat(filepath.Join(sb.dest, name), &st))
		if st.Mode&0o7777 != want {
			t.Errorf("%s: mode %04o, want %04o", name, st.Mode&0o7777, want)
		}
	}
	if fmt.Sprint(s.SetidStripped) != "[bin/su bin/sg]" {
		t.Errorf("SetidStripped = %v", s.SetidStripped)
	}
	sb.checkContained(t)
}

func TestExtractTreeNeedsLimits(t *testing.T) {
	sb := newSandbox(t)
	for _, l := range []Limits{{}, {MaxBytes: 1}, {MaxFiles: 1}, {MaxBytes: -1, MaxFiles: 1}} {
		if _, err := ExtractTree(bytes.NewReader(tarStream(t, true)), sb.dest, l); !errors.Is(err, ErrInvalid) {
			t.Errorf("limits %+v: %v, want ErrInvalid", l, err)
		}
	}
	if _, err := ExtractTree(bytes.NewReader(tarStream(t, true)), filepath.Join(sb.parent, "absent"), testLimits); !errors.Is(err, unix.ENOENT) {
		t.Errorf("absent destination: %v, want ENOENT", err)
	}
}

// TestMountPointsInsideTrees: neither side crosses a mount point inside
// its tree (RESOLVE_NO_XDEV): the destination refuses to write through one,
// the source does not read through one.
func TestMountPointsInsideTrees(t *testing.T) {
	testenv.RequireRoot(t)
	mountTmpfs := func(dir string) {
		must(t, os.Mkdir(dir, 0o755))
		if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
			testenv.Unavailable(t, "tmpfs mount: "+err.Error())
		}
		t.Cleanup(func() {
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", dir, err)
			}
		})
	}

	sb := newSandbox(t)
	mountTmpfs(filepath.Join(sb.dest, "mnt"))
	_, err := ExtractTree(bytes.NewReader(tarStream(t, true, reg("mnt/x", "x"))), sb.dest, testLimits)
	if !errors.Is(err, ErrUnsafeEntry) || !errors.Is(err, unix.EXDEV) {
		t.Errorf("write under a mount point: %v, want ErrUnsafeEntry and EXDEV", err)
	}

	src := t.TempDir()
	mkfile(t, filepath.Join(src, "file"), "x", 0o644, time.Now())
	mountTmpfs(filepath.Join(src, "mnt"))
	mkfile(t, filepath.Join(src, "mnt", "other-fs"), "x", 0o644, time.Now())
	_, err = WriteTree(io.Discard, src, WriteOptions{})
	var ee *EntryError
	if !errors.Is(err, ErrUnsupportedEntry) || !errors.As(err, &ee) || ee.Name != "mnt" || ee.Reason != "mount point" {
		t.Errorf("read a tree with a mount point: %v, want ErrUnsupportedEntry naming mnt", err)
	}
	s, err := WriteTree(io.Discard, src, WriteOptions{SkipUnsupported: true})
	if err != nil || s.Files != 1 || fmt.Sprint(s.Skipped) != "[{mnt mount point}]" {
		t.Errorf("SkipUnsupported: %+v, %v: want the file sent and mnt skipped", s, err)
	}
}

// TestWriteTreeDoesNotFollowSymlinks: WriteTree reads beneath its root only.
// A directory that is a symlink is sent as a symlink, never descended.
func TestWriteTreeDoesNotFollowSymlinks(t *testing.T) {
	outside := t.TempDir()
	mkfile(t, filepath.Join(outside, "secret"), "secret", 0o600, time.Now())
	src := t.TempDir()
	must(t, os.Symlink(outside, filepath.Join(src, "d")))
	var buf bytes.Buffer
	s, err := WriteTree(&buf, src, WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Symlinks != 1 || s.Files != 0 || bytes.Contains(buf.Bytes(), []byte("secret")) {
		t.Errorf("summary %+v: the symlinked directory was followed", s)
	}
}

func TestWriteTreeSkip(t *testing.T) {
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "core-1.img"), []byte("core"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../pre-2", filepath.Join(src, "parent")); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	sum, err := WriteTree(&buf, src, WriteOptions{Skip: []string{"parent"}})
	if err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	if _, err := ExtractTree(&buf, dst, Limits{MaxBytes: 1 << 20, MaxFiles: 10}); err != nil {
		t.Fatalf("extract: %v (summary %+v)", err, sum)
	}
	if _, err := os.Lstat(filepath.Join(dst, "parent")); !os.IsNotExist(err) {
		t.Errorf("parent link carried: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "core-1.img")); err != nil || string(b) != "core" {
		t.Errorf("core-1.img: %q %v", b, err)
	}
}
