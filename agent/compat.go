package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// What a migration's handshake checks beyond versions: that the peer has
// the same base rootfs (by content), and a CPU CRIU can restore on.

// rootfsDigests caches content digests of base rootfs trees: a tree is
// hashed again only when the names, sizes or modification times under it
// changed.
type rootfsDigests struct {
	mu    sync.Mutex
	cache map[string]digestEntry
}

type digestEntry struct {
	statSig, digest string
}

// digest returns the sha256 of the tree at root: every entry's relative
// name, type and permission bits, a symlink's target and a regular file's
// content, in name order. Symlinks are never followed.
func (d *rootfsDigests) digest(root string) (string, error) {
	type ent struct {
		rel  string
		info fs.FileInfo
	}
	var ents []ent
	err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := de.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		ents = append(ents, ent{rel, info})
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("rootfs %s: %w", root, err)
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].rel < ents[j].rel })
	sig := sha256.New()
	for _, e := range ents {
		_, _ = fmt.Fprintf(sig, "%s\x00%o\x00%d\x00%d\n", e.rel, e.info.Mode(), e.info.Size(), e.info.ModTime().UnixNano())
	}
	statSig := hex.EncodeToString(sig.Sum(nil))
	d.mu.Lock()
	if c, ok := d.cache[root]; ok && c.statSig == statSig {
		d.mu.Unlock()
		return c.digest, nil
	}
	d.mu.Unlock()

	h := sha256.New()
	for _, e := range ents {
		m := e.info.Mode()
		_, _ = fmt.Fprintf(h, "%s\x00%o\x00", e.rel, m&(fs.ModeType|fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky))
		switch {
		case m&fs.ModeSymlink != 0:
			t, err := os.Readlink(filepath.Join(root, e.rel))
			if err != nil {
				return "", err
			}
			_, _ = fmt.Fprintf(h, "%s", t)
		case m.IsRegular():
			f, err := os.Open(filepath.Join(root, e.rel))
			if err != nil {
				return "", err
			}
			_, err = io.Copy(h, f)
			_ = f.Close()
			if err != nil {
				return "", err
			}
		}
		_, _ = h.Write([]byte{'\n'})
	}
	digest := "sha256:" + hex.EncodeToString(h.Sum(nil))
	d.mu.Lock()
	if d.cache == nil {
		d.cache = map[string]digestEntry{}
	}
	d.cache[root] = digestEntry{statSig: statSig, digest: digest}
	d.mu.Unlock()
	return digest, nil
}

// cpuinfoMax bounds the cpuinfo image a peer may send.
const cpuinfoMax = 64 << 10

// cpuinfoDump returns this CPU as CRIU describes it (cpuinfo.img).
func (a *Agent) cpuinfoDump() ([]byte, error) {
	d, err := os.MkdirTemp(a.cfg.RunDir, "cpuinfo-")
	if err != nil {
		return nil, err
	}
	defer func() { _ = os.RemoveAll(d) }()
	if out, err := exec.Command(a.criuPath(), "cpuinfo", "dump", "--images-dir", d).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("criu cpuinfo dump: %w: %s", err, lastLine(string(out), err))
	}
	return os.ReadFile(filepath.Join(d, "cpuinfo.img"))
}

// cpuinfoCheck says whether CRIU can restore here what was dumped on the
// CPU img describes.
func (a *Agent) cpuinfoCheck(img []byte) error {
	if len(img) == 0 {
		return errors.New("no CPU description from the source")
	}
	if len(img) > cpuinfoMax {
		return fmt.Errorf("cpuinfo: %d bytes, over %d", len(img), cpuinfoMax)
	}
	d, err := os.MkdirTemp(a.cfg.RunDir, "cpuinfo-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(d) }()
	if err := os.WriteFile(filepath.Join(d, "cpuinfo.img"), img, 0o600); err != nil {
		return err
	}
	if out, err := exec.Command(a.criuPath(), "cpuinfo", "check", "--images-dir", d, "--log-file", "check.log").CombinedOutput(); err != nil {
		why := strings.TrimSpace(string(out))
		if b, rerr := os.ReadFile(filepath.Join(d, "check.log")); rerr == nil {
			why = lastErrorLine(string(b), why)
		}
		return fmt.Errorf("criu cpuinfo check: %s", why)
	}
	return nil
}

// lastErrorLine picks the last "Error" line of a CRIU log, or def.
func lastErrorLine(log, def string) string {
	lines := strings.Split(log, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], "Error") {
			return strings.TrimSpace(lines[i])
		}
	}
	return def
}
