package vmtest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// criuLockRules is the ruleset CRIU's iptables network lock loads into a
// dumped network namespace (criu/net.c): everything but CRIU's own marked
// packets is dropped.
const criuLockRules = `*filter
:CRIU - [0:0]
-I INPUT -j CRIU
-I OUTPUT -j CRIU
-A CRIU -m mark --mark 0xC114 -j ACCEPT
-A CRIU -j DROP
COMMIT
`

// TestCriuExternalTools: what CRIU runs or needs besides itself works in the
// VM, with the arguments CRIU gives it: its nftables network lock,
// iptables-restore for the iptables lock (both families, in a network
// namespace of its own as for a container), iproute2's route and rule
// save, and GNU tar with gzip for tmpfs contents (busybox's tar lacks the
// options). A gap here fails a container checkpoint, not this tier's boot.
func TestCriuExternalTools(t *testing.T) {
	requireVM(t)
	criu := testenv.RequireBinary(t, "criu")
	unshare := testenv.RequireBinary(t, "unshare")
	ctx := context.Background()

	t.Run("nftables lock", func(t *testing.T) {
		out, err := run(ctx, 60*time.Second, criu, "check", "--feature", "network_lock_nftables")
		if err != nil {
			t.Fatalf("CRIU's nftables network lock is not available: %v", err)
		}
		t.Logf("criu check --feature network_lock_nftables: %s", strings.TrimSpace(out))
	})
	for _, tool := range []string{"iptables", "ip6tables"} {
		t.Run(tool+" lock", func(t *testing.T) {
			testenv.RequireBinary(t, tool+"-restore")
			cmd := exec.CommandContext(ctx, unshare, "--net", "sh", "-c", tool+"-restore -w --noflush && "+tool+" -w -S CRIU")
			cmd.Stdin = strings.NewReader(criuLockRules)
			cmd.WaitDelay = 5 * time.Second
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%s-restore of CRIU's lock rules in a new netns: %v\n%s", tool, err, out)
			}
			if !strings.Contains(string(out), "-A CRIU -j DROP") || !strings.Contains(string(out), "--mark 0xc114") {
				t.Errorf("%s -S CRIU after the restore:\n%s", tool, out)
			}
		})
	}
	t.Run("ip route and rule save", func(t *testing.T) {
		for _, args := range [][]string{{"-4", "route", "save"}, {"-6", "route", "save"}, {"rule", "save"}} {
			// unshare runs ip from PATH, as CRIU's cr_system does.
			out, err := run(ctx, 30*time.Second, unshare, append([]string{"--net", "ip"}, args...)...)
			if err != nil {
				t.Errorf("ip %s in a new netns: %v", strings.Join(args, " "), err)
				continue
			}
			t.Logf("ip %s: %d bytes", strings.Join(args, " "), len(out))
		}
	})
	t.Run("sh runs PATH tools", func(t *testing.T) {
		// CRIU and tests run "sh -c"; a shell preferring busybox applets
		// would run busybox's ip and tar instead.
		out, err := run(ctx, 30*time.Second, "sh", "-c", "ip -V && tar --version")
		if err != nil || !strings.Contains(out, "iproute2") || !strings.Contains(out, "GNU tar") {
			t.Errorf("sh -c 'ip -V && tar --version': %v\n%s", err, out)
		}
	})
	t.Run("tar tmpfs contents", func(t *testing.T) {
		src, dst := t.TempDir(), t.TempDir()
		if err := os.WriteFile(filepath.Join(src, "file"), []byte("content"), 0o640); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("file", filepath.Join(src, "link")); err != nil {
			t.Fatal(err)
		}
		// criu/filesystems.c: tmpfs_dump and tmpfs_restore.
		var archive bytes.Buffer
		dump := exec.CommandContext(ctx, "tar", "--create", "--gzip", "--no-unquote", "--no-wildcards",
			"--one-file-system", "--check-links", "--preserve-permissions", "--sparse", "--numeric-owner",
			"--directory", src, ".")
		var stderr bytes.Buffer
		dump.Stdout, dump.Stderr = &archive, &stderr
		if err := dump.Run(); err != nil {
			t.Fatalf("tar --create as CRIU runs it: %v\n%s", err, stderr.String())
		}
		restore := exec.CommandContext(ctx, "tar", "--extract", "--gzip", "--no-unquote", "--no-wildcards",
			"--directory", dst)
		restore.Stdin = &archive
		if out, err := restore.CombinedOutput(); err != nil {
			t.Fatalf("tar --extract as CRIU runs it: %v\n%s", err, out)
		}
		if b, err := os.ReadFile(filepath.Join(dst, "link")); err != nil || string(b) != "content" {
			t.Errorf("restored tmpfs contents: %q (%v), want the file through its symlink", b, err)
		}
	})
}
