package migrate

import (
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// A hand encoder for the few protobuf fields of CRIU's stats files, so the
// tests need no protobuf library.
func pbVarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func pbUint(b []byte, field int, v uint64) []byte {
	return pbVarint(pbVarint(b, uint64(field)<<3), v)
}

func pbMessage(b []byte, field int, msg []byte) []byte {
	return append(pbVarint(pbVarint(b, uint64(field)<<3|2), uint64(len(msg))), msg...)
}

// statsFile frames a stats_entry the way CRIU does: two magics and the size.
func statsFile(entry []byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 0x55105940)
	b = binary.LittleEndian.AppendUint32(b, 0x57093306)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(entry)))
	return append(b, entry...)
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestReadDumpStatsSynthetic(t *testing.T) {
	var dump []byte
	for field, v := range map[int]uint64{1: 141, 2: 10909, 3: 446, 4: 1200, 5: 300, 6: 200, 7: 62, 9: 5} {
		dump = pbUint(dump, field, v)
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "stats-dump"), statsFile(pbMessage(nil, 1, dump)))

	s, err := ReadDumpStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := DumpStats{
		FreezingTime: 141 * time.Microsecond, FrozenTime: 10909 * time.Microsecond,
		MemdumpTime: 446 * time.Microsecond, MemwriteTime: 1200 * time.Microsecond,
		PagesScanned: 300, PagesSkippedParent: 200, PagesWritten: 62, PagesLazy: 5,
	}
	if *s != want {
		t.Errorf("ReadDumpStats = %+v, want %+v", *s, want)
	}
	if err := s.CheckParentUsed(); err != nil {
		t.Errorf("CheckParentUsed with 200 pages skipped: %v", err)
	}
	started := time.Now()
	r := s.Round(started, 62*4096, 3*time.Millisecond)
	if r.PagesWritten != 62 || r.PagesSkippedParent != 200 || r.FrozenTime != want.FrozenTime ||
		r.MemdumpTime != want.MemdumpTime || r.MemwriteTime != want.MemwriteTime ||
		!r.Started.Equal(started) || r.BytesSent != 62*4096 || r.TransferTime != 3*time.Millisecond {
		t.Errorf("Round = %+v", r)
	}
}

func TestReadRestoreStatsSynthetic(t *testing.T) {
	var restore []byte
	for field, v := range map[int]uint64{1: 7, 2: 3, 3: 313, 4: 9252, 5: 62} {
		restore = pbUint(restore, field, v)
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "stats-restore"), statsFile(pbMessage(nil, 2, restore)))
	s, err := ReadRestoreStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := RestoreStats{ForkingTime: 313 * time.Microsecond, RestoreTime: 9252 * time.Microsecond,
		PagesCompared: 7, PagesSkippedCow: 3, PagesRestored: 62}
	if *s != want {
		t.Errorf("ReadRestoreStats = %+v, want %+v", *s, want)
	}
}

func TestReadStatsErrors(t *testing.T) {
	var restore []byte
	for field, v := range map[int]uint64{1: 7, 2: 3, 3: 313, 4: 9252} {
		restore = pbUint(restore, field, v)
	}
	good := statsFile(pbMessage(nil, 2, restore))
	wrongMagic := append([]byte(nil), good...)
	wrongMagic[5] ^= 0xff
	for _, tc := range []struct {
		name string
		file []byte // nil: no file
		want error
		msg  string
	}{
		{"missing", nil, fs.ErrNotExist, "no such file"},
		{"empty", []byte{}, ErrMalformedStats, "shorter than the 12-byte header"},
		{"short", good[:7], ErrMalformedStats, "shorter than the 12-byte header"},
		{"wrong magic", wrongMagic, ErrMalformedStats, "secondary magic"},
		{"truncated payload", good[:len(good)-2], ErrMalformedStats, "claimed"},
		{"garbage payload", statsFile([]byte{0xff, 0xff, 0xff}), ErrMalformedStats, "malformed"},
		{"restore stats only", good, ErrMalformedStats, "no dump entry"},
		// dump_stats_entry has required fields.
		{"dump entry missing required fields", statsFile(pbMessage(nil, 1, pbUint(nil, 7, 5))), ErrMalformedStats, "required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.file != nil {
				writeFile(t, filepath.Join(dir, "stats-dump"), tc.file)
			}
			_, err := ReadDumpStats(dir)
			var se *StatsError
			if !errors.Is(err, tc.want) || !errors.As(err, &se) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("ReadDumpStats = %v, want a *StatsError wrapping %v and saying %q", err, tc.want, tc.msg)
			}
			if se.Path != filepath.Join(dir, "stats-dump") {
				t.Errorf("StatsError.Path = %q", se.Path)
			}
		})
	}
}

func TestCheckParentUsed(t *testing.T) {
	full := &DumpStats{PagesScanned: 1000, PagesWritten: 1000}
	if err := full.CheckParentUsed(); !errors.Is(err, ErrParentIgnored) || !strings.Contains(err.Error(), "scanned 1000 pages") {
		t.Errorf("full dump: %v, want ErrParentIgnored", err)
	}
	if err := (&DumpStats{}).CheckParentUsed(); err != nil {
		t.Errorf("empty dump: %v", err)
	}
}

// startBoundedProcess starts a shell loop that ends by itself after 60 s,
// double-forked (setsid in the background of a shell that exits at once)
// so that init, not this test, is its parent, and returns its pid and a
// pidfd for it. Cleanup kills it.
func startBoundedProcess(t *testing.T) (int, int) {
	t.Helper()
	out, err := exec.Command("sh", "-c",
		`setsid sh -c 'i=0; while [ $i -lt 600 ]; do i=$((i+1)); sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`).Output()
	if err != nil {
		t.Fatalf("start process: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("pid %q: %v", out, err)
	}
	return pid, pidfdFor(t, pid)
}

// pidfdFor opens a pidfd, so that cleanup signals that process and never a
// later one that reused its pid.
func pidfdFor(t *testing.T, pid int) int {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	t.Cleanup(func() {
		if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			t.Errorf("kill %d: %v", pid, err)
		}
		_ = unix.Close(fd)
	})
	return fd
}

func runCRIU(t *testing.T, criu, dir, log string, args ...string) {
	t.Helper()
	out, err := exec.Command(criu, args...).CombinedOutput()
	if err != nil {
		logText, _ := os.ReadFile(filepath.Join(dir, log))
		t.Fatalf("criu %s: %v\n%s\n%s:\n%s", strings.Join(args, " "), err, out, log, tail(string(logText), 20))
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestReadStatsRealCRIU dumps a real process with the installed CRIU,
// reads its stats-dump, restores it (once init has reaped the dumped
// process: CRIU restores the same pid and fails with "File exists" while
// a zombie holds it) and reads its stats-restore.
func TestReadStatsRealCRIU(t *testing.T) {
	testenv.RequireRoot(t)
	criu := testenv.RequireBinary(t, "criu")

	pid, _ := startBoundedProcess(t)
	dir := t.TempDir()
	runCRIU(t, criu, dir, "dump.log", "dump", "-t", strconv.Itoa(pid), "-D", dir, "--shell-job", "-o", "dump.log")

	s, err := ReadDumpStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stats-dump: %+v", *s)
	if s.PagesWritten == 0 || s.FrozenTime <= 0 {
		t.Errorf("PagesWritten %d, FrozenTime %s: want both > 0", s.PagesWritten, s.FrozenTime)
	}
	// CRIU counts microseconds: a shell loop freezes for milliseconds, not
	// for hours.
	if s.FrozenTime > 30*time.Second || s.FreezingTime > s.FrozenTime+time.Second {
		t.Errorf("FrozenTime %s, FreezingTime %s: units wrong?", s.FrozenTime, s.FreezingTime)
	}
	if s.PagesScanned < s.PagesWritten || s.PagesSkippedParent != 0 || s.PagesLazy != 0 {
		t.Errorf("a full dump without parent: %+v", *s)
	}
	// Without a parent nothing is skipped: exactly what CheckParentUsed
	// flags when a parent was meant to be used.
	if err := s.CheckParentUsed(); !errors.Is(err, ErrParentIgnored) {
		t.Errorf("CheckParentUsed on a full dump: %v, want ErrParentIgnored", err)
	}

	t.Run("restore", func(t *testing.T) {
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); errors.Is(err, fs.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("dumped process %d not reaped by its parent after 30 s: CRIU cannot restore its pid", pid)
			}
			time.Sleep(50 * time.Millisecond)
		}
		runCRIU(t, criu, dir, "restore.log", "restore", "-D", dir, "--shell-job", "-d", "-o", "restore.log")
		pidfdFor(t, pid)

		r, err := ReadRestoreStats(dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("stats-restore: %+v", *r)
		if r.PagesRestored == 0 || r.RestoreTime <= 0 || r.RestoreTime > 30*time.Second {
			t.Errorf("stats-restore %+v: want pages restored and a restore time in (0, 30s]", *r)
		}
	})
}
