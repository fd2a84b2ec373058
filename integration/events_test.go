package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type event struct {
	Seq        uint64            `json:"seq"`
	Type       string            `json:"type"`
	Container  string            `json:"container"`
	Attributes map[string]string `json:"attributes"`
}

// TestEvents: lifecycle events are replayed in order and followed live.
func TestEvents(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a")
	d.start()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	follow := exec.CommandContext(ctx, filepath.Join(binDir, "ferryctl"), "--socket", d.socket, "events", "-o", "json", "--type", "container.started")
	stdout, err := follow.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); _ = follow.Wait() }()
	time.Sleep(300 * time.Millisecond) // let the stream open

	d.mustCtl("run", "ev", "--", "sh", "-c", "exit 4")
	live := make(chan event, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var e event
			if json.Unmarshal(sc.Bytes(), &e) == nil && e.Container == "ev" {
				live <- e
				return
			}
		}
	}()
	select {
	case e := <-live:
		if e.Type != "container.started" {
			t.Errorf("filtered stream delivered %s", e.Type)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the followed stream did not deliver container.started")
	}

	d.waitState("ev", "exited", 10*time.Second)
	d.mustCtl("rm", "ev")
	out := d.mustCtl("events", "--follow=false", "-o", "json")
	var types []string
	var last uint64
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var e event
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("bad event line %q: %v", l, err)
		}
		if e.Seq <= last {
			t.Errorf("seq %d after %d", e.Seq, last)
		}
		last = e.Seq
		if e.Container == "ev" {
			types = append(types, e.Type)
			if e.Type == "container.exited" && e.Attributes["exit_code"] != "4" {
				t.Errorf("exited event exit_code %q, want 4", e.Attributes["exit_code"])
			}
		}
	}
	if got := strings.Join(types, ","); got != "container.started,container.exited,container.removed" {
		t.Errorf("events for ev: %s", got)
	}
}
