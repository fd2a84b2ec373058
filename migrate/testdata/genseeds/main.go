// Command genseeds writes the seed corpus of FuzzExtractTree into
// testdata/fuzz/FuzzExtractTree: tar streams of the shapes ExtractTree
// accepts and of each shape it refuses. Run it from package migrate's
// directory: go run ./testdata/genseeds
package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

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
func link(typ byte, name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: typ, Name: name, Linkname: target, Mode: 0o777}}
}
func dev(typ byte, name string, major, minor int64) entry {
	return entry{hdr: tar.Header{Typeflag: typ, Name: name, Devmajor: major, Devminor: minor}}
}
func withXattrs(e entry, kv ...string) entry {
	e.hdr.PAXRecords = map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		e.hdr.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return e
}
func withMode(e entry, mode int64) entry   { e.hdr.Mode = mode; return e }
func withMtime(e entry, t time.Time) entry { e.hdr.ModTime = t; return e }

func stream(end bool, entries ...entry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		h.Format = tar.FormatPAX
		if h.ModTime.IsZero() {
			h.ModTime = time.Unix(1700000000, 0) // whole seconds: no PAX header needed
		}
		if err := tw.WriteHeader(&h); err != nil {
			log.Fatalf("%s: %v", h.Name, err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			log.Fatalf("%s: %v", h.Name, err)
		}
	}
	var err error
	if end {
		err = tw.Close()
	} else {
		err = tw.Flush()
	}
	if err != nil {
		log.Fatal(err)
	}
	return buf.Bytes()
}

// headerOnly is a stream with one header and the start of its content:
// a file too large for the fuzz target's limit (64 KiB), in a small seed.
func headerOnly(h tar.Header) []byte {
	var buf bytes.Buffer
	h.Format = tar.FormatPAX
	h.ModTime = time.Unix(1700000000, 0)
	if err := tar.NewWriter(&buf).WriteHeader(&h); err != nil {
		log.Fatal(err)
	}
	return append(buf.Bytes(), bytes.Repeat([]byte("b"), 512)...)
}

// sparse is a PAX sparse 1.0 entry (archive/tar's writer will not make
// one): a regular entry whose preceding PAX header, hand-made, says it
// expands to 1 GiB.
func sparse() []byte {
	var pax string
	for _, kv := range []string{"GNU.sparse.major=1", "GNU.sparse.minor=0", "GNU.sparse.name=sparse", "GNU.sparse.realsize=1073741824"} {
		n := len(kv) + 3
		for len(fmt.Sprintf("%d %s\n", n, kv)) != n {
			n++
		}
		pax += fmt.Sprintf("%d %s\n", n, kv)
	}
	b := stream(true, reg("PaxHeaders/sparse", pax), reg("GNUSparseFile.0/sparse", "1\n0\n0\n"))
	blk := b[:512]
	blk[156] = 'x'
	copy(blk[148:156], "        ")
	sum := 0
	for _, c := range blk {
		sum += int(c)
	}
	copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

func main() {
	seeds := map[string][]byte{
		"valid-tree": stream(true,
			withXattrs(dir("upper/"), "trusted.overlay.opaque", "y", "user.app", "v"),
			withMtime(reg("upper/file", "hello\n"), time.Unix(1700000000, 123456789)),
			withXattrs(reg("upper/x", "x"), "security.capability", "\x01\x00\x00\x02", "user.overlay.redirect", "/a"),
			link(tar.TypeSymlink, "upper/rel", "file"),
			link(tar.TypeSymlink, "upper/abs", "/etc/passwd"),
			link(tar.TypeLink, "upper/hard", "upper/file"),
			dev(tar.TypeChar, "upper/whiteout", 0, 0),
			withMode(dir("ro/"), 0o500),
			withMode(reg("setuid", "#!/bin/sh\n"), 0o6755),
		),
		"dotdot":            stream(true, reg("../evil", "x")),
		"absolute":          stream(true, reg("/abs", "x")),
		"dotdot-inside":     stream(true, dir("a/"), reg("a/../../x", "x")),
		"symlink-etc":       stream(true, link(tar.TypeSymlink, "link", "/etc"), reg("link/passwd", "x")),
		"symlink-up":        stream(true, link(tar.TypeSymlink, "up", "../sentinel"), dir("up/d/"), reg("up/x", "x")),
		"symlink-then-file": stream(true, link(tar.TypeSymlink, "s", "../sentinel/keep"), reg("s", "x")),
		"hardlink-out":      stream(true, link(tar.TypeLink, "h", "../sentinel/keep")),
		"hardlink-symlink":  stream(true, link(tar.TypeSymlink, "s", "../sentinel/keep"), link(tar.TypeLink, "h", "s")),
		"block-device":      stream(true, dev(tar.TypeBlock, "sda", 8, 0)),
		"char-device":       stream(true, dev(tar.TypeChar, "null", 1, 3)),
		"fifo":              stream(true, dev(tar.TypeFifo, "fifo", 0, 0)),
		"duplicate":         stream(true, reg("f", "1"), reg("f", "2")),
		"no-end-marker":     stream(false, reg("f", "x")),
		"sparse":            sparse(),
	}
	var many []entry
	for i := 0; i < 17; i++ { // FuzzExtractTree allows 16
		many = append(many, link(tar.TypeSymlink, "s"+strconv.Itoa(i), "t"))
	}
	seeds["too-many-files"] = stream(true, many...)
	seeds["too-many-bytes"] = headerOnly(tar.Header{Typeflag: tar.TypeReg, Name: "big", Mode: 0o644, Size: 64<<10 + 1})

	out := filepath.Join("testdata", "fuzz", "FuzzExtractTree")
	if err := os.MkdirAll(out, 0o755); err != nil {
		log.Fatal(err)
	}
	for name, b := range seeds {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(out, "seed-"+name), []byte(body), 0o644); err != nil {
			log.Fatal(err)
		}
	}
}
