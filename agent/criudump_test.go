package agent

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMountDestResolvesSymlinksInTheRootfs(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "real", "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/real", filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ dest, want string }{
		{"/etc/hosts", "/etc/hosts"},
		{root + "/etc/hosts", "/etc/hosts"}, // already under the rootfs
		{"/link/dir", "/real/dir"},          // as the container sees it
		{"/a/../etc/x", "/etc/x"},
	} {
		if got := mountDest(root, tc.dest); got != tc.want {
			t.Errorf("mountDest(%q) = %q, want %q", tc.dest, got, tc.want)
		}
	}
}

func TestCriuConfLabelAndFreezerPath(t *testing.T) {
	if f, ok := criuConfLabel([]string{"bundle=/x", criuConfAnnotation + "=/c/criu.conf"}); !ok || f != "/c/criu.conf" {
		t.Errorf("label: %q %v", f, ok)
	}
	if _, ok := criuConfLabel([]string{"bundle=/x"}); ok {
		t.Error("found a label that is not there")
	}
	if p := freezerPath(map[string]string{"freezer": "/sys/fs/cgroup/freezer/x", "memory": "/m"}); p != "/sys/fs/cgroup/freezer/x" {
		t.Errorf("v1: %q", p)
	}
	if p := freezerPath(map[string]string{"": "/sys/fs/cgroup/x"}); p != "/sys/fs/cgroup/x" {
		t.Errorf("v2: %q", p)
	}
}

func TestPSConf(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "criu.conf")
	if err := os.WriteFile(conf, []byte("network-lock skip\nlazy-pages"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := psConf(conf, dir, 4)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "network-lock skip\nlazy-pages\nps-socket 4\n" {
		t.Errorf("with the container's configuration: %q", b)
	}
	// libcontainer's default file, absent here.
	p, err = psConf(filepath.Join(dir, "runc.conf"), dir, 4)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "ps-socket 4\n" {
		t.Errorf("without one: %q", b)
	}
}
