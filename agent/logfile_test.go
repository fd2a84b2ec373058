package agent

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestCappedLogRotates(t *testing.T) {
	p := filepath.Join(t.TempDir(), "container.log")
	l, err := openCappedLog(p, 100)
	if err != nil {
		t.Fatal(err)
	}
	line := bytes.Repeat([]byte("x"), 39)
	line = append(line, '\n')
	for i := 0; i < 10; i++ {
		if _, err := l.Write(line); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	cur, _ := os.ReadFile(p)
	old, _ := os.ReadFile(p + ".1")
	// 40-byte lines under a 100-byte cap: two lines a file, the newest kept.
	if len(cur) != 80 || len(old) != 80 {
		t.Fatalf("current %d bytes, rotated %d bytes; want 80 and 80", len(cur), len(old))
	}
	ents, _ := os.ReadDir(filepath.Dir(p))
	if len(ents) != 2 {
		t.Fatalf("%d log files, want 2", len(ents))
	}
}
