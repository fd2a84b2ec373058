package netsetup

import (
	"log/slog"
	"os"
	"testing"
)

func discardLog() *slog.Logger { return slog.New(slog.DiscardHandler) }

// testLog logs to stderr when the tests run with -v.
func testLog(t *testing.T) *slog.Logger {
	if !testing.Verbose() {
		return discardLog()
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
}
