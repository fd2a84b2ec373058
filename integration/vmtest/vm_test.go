package vmtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// requireVM skips t outside the VM tier; inside it needs root (and fails
// under CI=true without it, like every privileged test).
func requireVM(t *testing.T) {
	t.Helper()
	if os.Getenv("FERRY_VM") != "1" {
		t.Skip("runs only inside the VM tier (scripts/vm/run.sh, make test-vm), whose /init sets FERRY_VM=1")
	}
	testenv.RequireRoot(t)
}

// run runs name with args under a timeout and returns its combined output;
// a failure names the command and carries its output.
func run(ctx context.Context, within time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// readInt reads a file holding one decimal number; -1 when it is missing or
// (being rewritten) empty.
func readInt(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return -1
	}
	return n
}

// waitIntAbove waits until the number in path exceeds n.
func waitIntAbove(t *testing.T, path string, n int, within time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(within)
	v := -1
	for time.Now().Before(deadline) {
		if v = readInt(path); v > n {
			return v
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: %d after %s, want above %d", path, v, within, n)
	return v
}

// pidAlive reports whether pid exists and is not a zombie.
func pidAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && len(b) > i+2 && b[i+2] != 'Z'
}

// removeCgroup kills what is left in a cgroup v2 directory tree and removes
// it, deepest first.
func removeCgroup(dir string) error {
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
		if err == nil && de.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		// cgroup.kill (5.14+) kills every process of the subtree.
		_ = os.WriteFile(filepath.Join(dirs[i], "cgroup.kill"), []byte("1"), 0o644)
	}
	var err error
	for try := 0; try < 50; try++ {
		err = nil
		for i := len(dirs) - 1; i >= 0; i-- {
			if rerr := os.Remove(dirs[i]); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				err = rerr
			}
		}
		if err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup %s: %w", dir, err)
}

// killGroup SIGKILLs process group pgid and waits (bounded) until its leader is gone.
func killGroup(pgid int) {
	if pgid <= 0 {
		return
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	for i := 0; i < 50 && pidAlive(pgid); i++ {
		time.Sleep(100 * time.Millisecond)
	}
}
