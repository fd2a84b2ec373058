package vmtest

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// pagemapSoftDirty is bit 55 of a /proc/PID/pagemap entry
// (Documentation/admin-guide/mm/pagemap.rst); bit 63 is "page present".
const (
	pagemapSoftDirty = 1 << 55
	pagemapPresent   = 1 << 63
)

// TestKernelHasSoftDirty: the kernel tracks soft-dirty pages (what CRIU's
// pre-dump needs), seen by CRIU and directly through clear_refs and pagemap.
func TestKernelHasSoftDirty(t *testing.T) {
	requireVM(t)
	uname := unix.Utsname{}
	if err := unix.Uname(&uname); err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s", unix.ByteSliceToString(uname.Release[:]))

	criu := testenv.RequireBinary(t, "criu")
	out, err := run(context.Background(), 60*time.Second, criu, "check", "--feature", "mem_dirty_track")
	if err != nil {
		t.Fatalf("CRIU does not see memory dirty tracking: %v", err)
	}
	t.Logf("criu check --feature mem_dirty_track: %s", strings.TrimSpace(out))

	// The kernel's own interface, without CRIU: writing 4 to clear_refs clears
	// the soft-dirty bit of every page of the process; a write sets it again.
	page := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Munmap(mem) }()
	mem[0] = 1 // fault the page in
	addr := uintptr(unsafe.Pointer(&mem[0]))
	pagemap, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pagemap.Close() }()
	entry := func() uint64 {
		t.Helper()
		var b [8]byte
		if _, err := pagemap.ReadAt(b[:], int64(addr/uintptr(page))*8); err != nil {
			t.Fatalf("read pagemap entry of %#x: %v", addr, err)
		}
		e := binary.LittleEndian.Uint64(b[:])
		if e&pagemapPresent == 0 {
			t.Fatalf("pagemap entry %#x of %#x: page not present", e, addr)
		}
		return e
	}
	if e := entry(); e&pagemapSoftDirty == 0 {
		t.Fatalf("a newly written page is not soft-dirty (pagemap entry %#x)", e)
	}
	clearRefs := func() {
		t.Helper()
		f, err := os.OpenFile("/proc/self/clear_refs", os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = f.Close() }()
		if _, err := f.WriteString("4"); err != nil {
			t.Fatalf("write 4 to /proc/self/clear_refs (clear soft-dirty bits): %v", err)
		}
	}
	clearRefs()
	if e := entry(); e&pagemapSoftDirty != 0 {
		t.Fatalf("the page is still soft-dirty after clear_refs 4 (pagemap entry %#x)", e)
	}
	_ = mem[1] // a read does not dirty it
	if e := entry(); e&pagemapSoftDirty != 0 {
		t.Fatalf("a read made the page soft-dirty (pagemap entry %#x)", e)
	}
	mem[1] = 2
	if e := entry(); e&pagemapSoftDirty == 0 {
		t.Fatalf("a write after clear_refs 4 did not make the page soft-dirty (pagemap entry %#x)", e)
	}
}

// TestCgroupV2: /sys/fs/cgroup is a pure cgroup v2 hierarchy with the
// controllers ferry uses enabled for children, and limits set on a child
// cgroup reach a process in it.
func TestCgroupV2(t *testing.T) {
	requireVM(t)
	const root = "/sys/fs/cgroup"
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Fatalf("%s has filesystem magic %#x, want cgroup2 (%#x)", root, st.Type, unix.CGROUP2_SUPER_MAGIC)
	}
	// No v1 hierarchy at all: a process is in exactly one cgroup, "0::".
	if self := readTrim(t, "/proc/self/cgroup"); strings.Count(self, "\n") != 0 || !strings.HasPrefix(self, "0::/") {
		t.Fatalf("/proc/self/cgroup = %q, want the single v2 line 0::/...", self)
	}
	available := strings.Fields(readTrim(t, filepath.Join(root, "cgroup.controllers")))
	enabled := strings.Fields(readTrim(t, filepath.Join(root, "cgroup.subtree_control")))
	t.Logf("controllers: %v; enabled for children of the root: %v", available, enabled)
	for _, c := range []string{"cpu", "memory", "pids", "io", "cpuset"} {
		if !slices.Contains(available, c) {
			t.Errorf("controller %s not available (cgroup.controllers %v)", c, available)
		}
		if !slices.Contains(enabled, c) {
			t.Errorf("controller %s not enabled in the root's cgroup.subtree_control %v", c, enabled)
		}
	}
	for _, f := range []string{"cpu.pressure", "memory.pressure", "io.pressure"} {
		if _, err := os.Stat(filepath.Join(root, f)); err != nil {
			t.Errorf("PSI: %v", err)
		}
	}

	dir := filepath.Join(root, fmt.Sprintf("ferry-vmtest-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := removeCgroup(dir); err != nil {
			t.Error(err)
		}
	})
	limits := [][2]string{{"memory.max", "67108864"}, {"pids.max", "16"}, {"cpu.max", "50000 100000"}, {"memory.low", "33554432"}}
	for _, kv := range limits {
		if err := os.WriteFile(filepath.Join(dir, kv[0]), []byte(kv[1]), 0o644); err != nil {
			t.Fatalf("write %s to %s: %v", kv[1], kv[0], err)
		}
		if got := readTrim(t, filepath.Join(dir, kv[0])); got != kv[1] {
			t.Errorf("%s = %q after writing %q", kv[0], got, kv[1])
		}
	}
	// Start a process straight into the cgroup (clone3 CLONE_INTO_CGROUP, v2 only).
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Close(fd) }()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a process in %s: %v", dir, err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	want := "0::/" + filepath.Base(dir)
	if got := readTrim(t, "/proc/"+strconv.Itoa(cmd.Process.Pid)+"/cgroup"); got != want {
		t.Fatalf("/proc/%d/cgroup = %q, want %q", cmd.Process.Pid, got, want)
	}
	if got := readTrim(t, filepath.Join(dir, "pids.current")); got != "1" {
		t.Errorf("pids.current = %q, want 1", got)
	}
	if n, err := strconv.ParseInt(readTrim(t, filepath.Join(dir, "memory.current")), 10, 64); err != nil || n <= 0 {
		t.Errorf("memory.current = %d (%v), want the process's memory", n, err)
	}
}
