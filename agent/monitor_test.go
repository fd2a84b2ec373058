package agent

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestAwaitRestore(t *testing.T) {
	run := func(cmds string, imagesErr error) (int, error) {
		t.Helper()
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.WriteString(cmds); err != nil {
			t.Fatal(err)
		}
		_ = w.Close()
		n := 0
		err = awaitRestore(r, func() error { n++; return imagesErr })
		return n, err
	}
	if n, err := run("ir", nil); err != nil || n != 1 {
		t.Errorf("i then r: images-in ran %d times, err %v; want once, nil", n, err)
	}
	if n, err := run("r", nil); err != nil || n != 0 {
		t.Errorf("r alone: images-in ran %d times, err %v; want none, nil", n, err)
	}
	if _, err := run("i", nil); err == nil || !strings.Contains(err.Error(), "gave up") {
		t.Errorf("the pipe's end before r: %v, want ferryd gave up", err)
	}
	boom := errors.New("boom")
	if _, err := run("ir", boom); !errors.Is(err, boom) {
		t.Errorf("images-in failing: %v, want its error", err)
	}
	if _, err := run("x", nil); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Errorf("unknown command: %v", err)
	}
}
