package vmtest

import (
	"context"
	"os/exec"
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

// TestNetfilterForCRIU: both ways CRIU locks a container's network work in
// the VM (its nftables lock, and iptables-restore for the iptables lock),
// so the modules and the iptables binaries in the initramfs are complete.
func TestNetfilterForCRIU(t *testing.T) {
	requireVM(t)
	criu := testenv.RequireBinary(t, "criu")
	unshare := testenv.RequireBinary(t, "unshare")
	ctx := context.Background()
	if out, err := run(ctx, 60*time.Second, criu, "check", "--feature", "network_lock_nftables"); err != nil {
		t.Errorf("CRIU's nftables network lock is not available: %v", err)
	} else {
		t.Logf("criu check --feature network_lock_nftables: %s", strings.TrimSpace(out))
	}
	for _, tool := range []string{"iptables", "ip6tables"} {
		testenv.RequireBinary(t, tool+"-restore")
		// In a network namespace of its own, as CRIU does for a container.
		cmd := exec.CommandContext(ctx, unshare, "--net", "sh", "-c", tool+"-restore -w --noflush && "+tool+" -w -S CRIU")
		cmd.Stdin = strings.NewReader(criuLockRules)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("%s-restore of CRIU's lock rules in a new netns: %v\n%s", tool, err, out)
			continue
		}
		if !strings.Contains(string(out), "-A CRIU -j DROP") || !strings.Contains(string(out), "--mark 0xc114") {
			t.Errorf("%s -S CRIU after the restore:\n%s", tool, out)
		}
	}
	if out, err := run(ctx, 30*time.Second, "iptables", "-V"); err == nil {
		t.Logf("%s", strings.TrimSpace(out))
	}
}
