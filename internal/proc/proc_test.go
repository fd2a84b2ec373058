package proc

import (
	"errors"
	"os"
	"testing"
)

func TestParseStartTime(t *testing.T) {
	stat := []byte("1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 0")
	got, err := parseStartTime(stat)
	if err != nil {
		t.Fatal(err)
	}
	if got != 987654 {
		t.Fatalf("start time %d, want 987654", got)
	}
	if _, err := parseStartTime([]byte("12 (x) Z 1 2 3")); err == nil {
		t.Fatal("short stat accepted")
	}
	zombie := []byte("1 (x) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0 0")
	if _, err := parseStartTime(zombie); !errors.Is(err, ErrGone) {
		t.Fatalf("zombie: got %v, want ErrGone", err)
	}
}

func TestAliveSelf(t *testing.T) {
	st, err := StartTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !Alive(os.Getpid(), st) {
		t.Fatal("own process not alive")
	}
	if Alive(os.Getpid(), st+1) {
		t.Fatal("wrong start time taken for the same process")
	}
	if _, err := StartTime(-1); !errors.Is(err, ErrGone) {
		t.Fatalf("pid -1: %v", err)
	}
}
