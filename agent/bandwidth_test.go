package agent

import (
	"testing"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/migrate"
)

// TestPeerBandwidth: auto mode's bandwidth is the last successful
// stop-and-copy to that node, over its dump and transfer together (its
// pages move during the dump); other modes, other nodes, failures and
// tiny transfers say nothing; a cap below it wins.
func TestPeerBandwidth(t *testing.T) {
	a := &Agent{migrations: map[string]*api.Migration{
		"old":   {PeerNode: "b", State: MigrationSucceeded, Mode: migrate.ModeStopCopy, StartedAt: "2026-01-01T00:00:00Z", BytesSent: 100 << 20, DumpMs: 900, TransferMs: 100},
		"new":   {PeerNode: "b", State: MigrationSucceeded, Mode: migrate.ModeStopCopy, StartedAt: "2026-01-02T00:00:00Z", BytesSent: 200 << 20, DumpMs: 1500, TransferMs: 500},
		"post":  {PeerNode: "b", State: MigrationSucceeded, Mode: migrate.ModePostCopy, StartedAt: "2026-01-03T00:00:00Z", BytesSent: 1 << 30, DumpMs: 100, TransferMs: 5},
		"fail":  {PeerNode: "b", State: MigrationFailed, Mode: migrate.ModeStopCopy, StartedAt: "2026-01-04T00:00:00Z", BytesSent: 1 << 30, DumpMs: 100, TransferMs: 5},
		"tiny":  {PeerNode: "b", State: MigrationSucceeded, Mode: migrate.ModeStopCopy, StartedAt: "2026-01-05T00:00:00Z", BytesSent: 1 << 20, DumpMs: 10, TransferMs: 5},
		"other": {PeerNode: "c", State: MigrationSucceeded, Mode: migrate.ModeStopCopy, StartedAt: "2026-01-06T00:00:00Z", BytesSent: 1 << 30, DumpMs: 100, TransferMs: 5},
	}}
	if got, want := a.peerBandwidth("b", 0), float64(100<<20); got != want {
		t.Errorf("peerBandwidth(b) = %.0f, want %.0f (the newest stop-and-copy: 200 MiB in 2 s)", got, want)
	}
	if got, want := a.peerBandwidth("b", 1<<20), float64(1<<20); got != want {
		t.Errorf("with a 1 MiB/s cap: %.0f, want %.0f", got, want)
	}
	if got := a.peerBandwidth("d", 0); got != 0 {
		t.Errorf("a node never migrated to: %.0f, want 0", got)
	}
}
