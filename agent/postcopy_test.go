package agent

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

func TestParseRollup(t *testing.T) {
	const s = `5559d5716000-7ffcf3507000 ---p 00000000 00:00 0                          [rollup]
Rss:                1696 kB
Pss_Anon:            112 kB
Anonymous:           300 kB
AnonHugePages:         0 kB
`
	a, p := parseRollup(s)
	if a != 300<<10 || p != 112<<10 {
		t.Fatalf("anon %d pss_anon %d", a, p)
	}
	if a, p := parseRollup("garbage\nAnonymous: x kB\n"); a != 0 || p != 0 {
		t.Fatalf("garbage parsed as %d %d", a, p)
	}
}

func TestCowGrowthOfOneProcess(t *testing.T) {
	// A process that forked nothing shares (almost) no anonymous pages:
	// the growth is small, and a pid that is gone is skipped.
	g, err := cowGrowth([]int{1 << 30, os.Getpid()})
	if err != nil {
		t.Fatal(err)
	}
	if g < 0 || g > 8<<20 {
		t.Fatalf("growth %d for one process", g)
	}
}

func TestLowerPriority(t *testing.T) {
	// As startLazyDaemon does: a process in a session of its own, then its
	// niceness and its autogroup's.
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	lowerPriority(cmd.Process.Pid)
	// getpriority(2) returns 20 - nice.
	prio, err := syscall.Getpriority(syscall.PRIO_PROCESS, cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if 20-prio != lazyNice {
		t.Errorf("niceness %d, want %d", 20-prio, lazyNice)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/autogroup", cmd.Process.Pid))
	if errors.Is(err, os.ErrNotExist) {
		return // a kernel without autogroup: niceness alone counts
	}
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("nice %d", lazyNice); !strings.Contains(string(b), want) {
		t.Errorf("autogroup %q, want %q", strings.TrimSpace(string(b)), want)
	}
}
