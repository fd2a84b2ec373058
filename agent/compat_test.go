package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestRootfsDigest(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), []byte("one"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(root, "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	var d rootfsDigests
	d1, err := d.digest(root)
	if err != nil {
		t.Fatal(err)
	}
	if d2, _ := d.digest(root); d2 != d1 {
		t.Fatalf("digest not stable: %s %s", d1, d2)
	}
	// A copy elsewhere with the same content has the same digest.
	other := t.TempDir()
	if err := os.MkdirAll(filepath.Join(other, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(other, "bin", "busybox"), []byte("one"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(other, "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	if d3, _ := d.digest(other); d3 != d1 {
		t.Fatalf("same content, other digest: %s %s", d1, d3)
	}
	// Changed content of the same size: the cache notices (mtime) and
	// the digest changes.
	later := time.Now().Add(time.Minute)
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), []byte("two"), 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.Chtimes(filepath.Join(root, "bin", "busybox"), later, later)
	if d4, _ := d.digest(root); d4 == d1 {
		t.Fatal("changed content, same digest")
	}
	// Another link target changes it too.
	_ = os.Remove(filepath.Join(other, "bin", "sh"))
	_ = os.Symlink("/bin/busybox", filepath.Join(other, "bin", "sh"))
	if d5, _ := d.digest(other); d5 == d1 {
		t.Fatal("changed link target, same digest")
	}
}
