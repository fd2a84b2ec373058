package vmtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/stats"
	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// treeScript is a small process tree: a shell holding 8 MB it never touches
// again (pages a pre-dump's parent images already hold) and a child; both
// count into files in $1 ten times a second. It forks nothing after the
// start: "read -t" on the FIFO $1/tick (opened read-write, so it never sees
// EOF) is the sleep, because a forked sleep would be a new process in every
// round, with no pages in the parent images.
const treeScript = `exec 3<>"$1/tick"
big=$(head -c 8000000 /dev/zero | tr '\0' x)
(c=0; while :; do c=$((c+1)); echo $c > "$1/child"; read -t 0.1 x <&3; done) &
i=0
while :; do i=$((i+1)); echo $i > "$1/count"; read -t 0.1 x <&3; done`

// parentMissing is what CRIU logs for a process whose pages it does not find
// in the parent images (criu/page-xfer.c): for a process that was already
// there in the previous round it means a broken parent link and a silent
// full dump (runc#2913, runc#3112). A process new since that round logs it
// too, which is why the tree forks nothing.
const parentMissing = "No parent image found"

// TestCriuPreDumpRounds is pre-copy without ferry: two criu pre-dump rounds
// (the second on top of the first), a final dump on top of the second, a
// restore, and the restored tree goes on counting. The final dump must have
// skipped pages because its parent held them; exit codes alone would not
// show a broken parent link.
func TestCriuPreDumpRounds(t *testing.T) {
	requireVM(t)
	criu := testenv.RequireBinary(t, "criu")
	ctx := context.Background()

	work := t.TempDir()
	counts := filepath.Join(work, "counts")
	imgs := filepath.Join(work, "images")
	for _, d := range []string{counts, imgs} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mkfifo(filepath.Join(counts, "tick"), 0o600); err != nil {
		t.Fatal(err)
	}
	// busybox's sh: its "read -t" takes fractions of a second (dash, the
	// VM's /bin/sh, has no -t at all).
	tree := exec.Command(testenv.RequireBinary(t, "busybox"), "sh", "-c", treeScript, "tree", counts)
	tree.Dir = work
	// Its own session and process group, stdio on /dev/null: nothing CRIU
	// would have to treat as external.
	tree.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := tree.Start(); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	pid := tree.Process.Pid
	waited := make(chan error, 1)
	go func() { waited <- tree.Wait() }()
	restoredPid := 0
	t.Cleanup(func() {
		killGroup(pid)
		killGroup(restoredPid)
		select {
		case err := <-waited:
			_ = err // killed above: its exit status says nothing
		case <-time.After(10 * time.Second):
			t.Errorf("the process tree %d did not end", pid)
		}
	})
	waitIntAbove(t, filepath.Join(counts, "count"), 5, 30*time.Second)
	waitIntAbove(t, filepath.Join(counts, "child"), 5, 10*time.Second)

	criuRun := func(dir string, args ...string) {
		t.Helper()
		start := time.Now()
		if _, err := run(ctx, 120*time.Second, criu, args...); err != nil {
			t.Logf("%s log (last lines):\n%s", args[0], logTail(filepath.Join(dir, args[0]+".log"), 30))
			t.Fatal(err)
		}
		t.Logf("criu %s -> %s: %s", args[0], filepath.Base(dir), time.Since(start).Round(time.Millisecond))
	}
	dir := func(round int) string { return filepath.Join(imgs, strconv.Itoa(round)) }
	base := func(round int) []string {
		if err := os.Mkdir(dir(round), 0o755); err != nil {
			t.Fatal(err)
		}
		// -o is relative to the image dir; -v4 so that the parent lookup is logged.
		return []string{"-t", strconv.Itoa(pid), "-D", dir(round), "-v4", "--track-mem"}
	}

	criuRun(dir(1), append([]string{"pre-dump", "-o", "pre-dump.log"}, base(1)...)...)
	// --prev-images-dir is resolved against the new image directory, so the
	// parent of images/2 is "../1"; CRIU stores it as the symlink images/2/parent.
	criuRun(dir(2), append([]string{"pre-dump", "-o", "pre-dump.log", "--prev-images-dir", "../1"}, base(2)...)...)
	if !pidAlive(pid) {
		t.Fatal("the tree died during the pre-dumps")
	}
	atDump := readInt(filepath.Join(counts, "count"))
	if most := int(time.Since(started).Seconds()*10) + 20; atDump > most {
		t.Fatalf("the tree counted to %d in %s: its 0.1 s sleep does not sleep", atDump, time.Since(started).Round(time.Millisecond))
	}
	criuRun(dir(3), append([]string{"dump", "-o", "dump.log", "--prev-images-dir", "../2"}, base(3)...)...)

	// The dump ended the tree.
	select {
	case err := <-waited:
		waited <- err // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("the tree still runs 10 s after criu dump")
	}

	st := make([]*stats.DumpStatsEntry, 4)
	for round := 1; round <= 3; round++ {
		st[round] = dumpStats(t, dir(round))
		s := st[round]
		t.Logf("round %d stats-dump: freezing %d us, frozen %d us, memdump %d us, memwrite %d us; pages scanned %d, skipped (parent had them) %d, written %d",
			round, s.GetFreezingTime(), s.GetFrozenTime(), s.GetMemdumpTime(), s.GetMemwriteTime(),
			s.GetPagesScanned(), s.GetPagesSkippedParent(), s.GetPagesWritten())
	}
	for round := 2; round <= 3; round++ {
		link, err := os.Readlink(filepath.Join(dir(round), "parent"))
		if err != nil || link != "../"+strconv.Itoa(round-1) {
			t.Errorf("images/%d/parent: %q (%v), want the symlink ../%d", round, link, err, round-1)
		}
		log := filepath.Join(dir(round), map[int]string{2: "pre-dump.log", 3: "dump.log"}[round])
		if b, _ := os.ReadFile(log); strings.Contains(string(b), parentMissing) {
			t.Errorf("round %d: CRIU logged %q for a process of the tree: the parent link is broken (a full dump in disguise):\n%s",
				round, parentMissing, grepContext(string(b), parentMissing, 3))
		}
	}
	if st[1].GetPagesWritten() < 8000000/uint64(os.Getpagesize()) {
		t.Errorf("round 1 wrote %d pages, fewer than the 8 MB the tree holds", st[1].GetPagesWritten())
	}
	if st[2].GetPagesSkippedParent() == 0 {
		t.Errorf("round 2 skipped no page because of its parent")
	}
	if st[3].GetPagesSkippedParent() == 0 {
		t.Fatalf("the final dump skipped no page because of its parent: pre-copy did not work")
	}
	if st[3].GetPagesWritten() >= st[1].GetPagesWritten() {
		t.Errorf("the final dump wrote %d pages, not fewer than round 1's %d", st[3].GetPagesWritten(), st[1].GetPagesWritten())
	}

	pidfile := filepath.Join(work, "restore.pid")
	criuRun(dir(3), "restore", "-o", "restore.log", "-v4", "-D", dir(3), "-d", "--pidfile", pidfile)
	restoredPid = readInt(pidfile)
	if restoredPid != pid {
		t.Fatalf("restored root pid %d (pidfile), want %d", restoredPid, pid)
	}
	after := waitIntAbove(t, filepath.Join(counts, "count"), atDump+10, 30*time.Second)
	childAt := readInt(filepath.Join(counts, "child"))
	waitIntAbove(t, filepath.Join(counts, "child"), childAt+5, 10*time.Second)
	t.Logf("counted to %d before the final dump, %d after the restore; the child counts too", atDump, after)
	if rs, err := restoreStats(dir(3)); err == nil {
		t.Logf("stats-restore: pages compared %d, skipped COW %d, restored %d; forking %d us, restore %d us",
			rs.GetPagesCompared(), rs.GetPagesSkippedCow(), rs.GetPagesRestored(), rs.GetForkingTime(), rs.GetRestoreTime())
	}
}

func dumpStats(t *testing.T, dir string) *stats.DumpStatsEntry {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	s, err := stats.CriuGetDumpStats(f)
	if err != nil {
		t.Fatalf("%s: decode stats-dump: %v", dir, err)
	}
	return s
}

func restoreStats(dir string) (*stats.RestoreStatsEntry, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	s, err := stats.CriuGetRestoreStats(f)
	if err != nil {
		return nil, fmt.Errorf("%s: decode stats-restore: %w", dir, err)
	}
	return s, nil
}

func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// grepContext returns the lines of s holding substr, each with the before
// lines in front of it.
func grepContext(s, substr string, before int) string {
	lines := strings.Split(s, "\n")
	var out []string
	for i, l := range lines {
		if strings.Contains(l, substr) {
			out = append(out, lines[max(0, i-before):i+1]...)
			out = append(out, "--")
		}
	}
	return strings.Join(out, "\n")
}
