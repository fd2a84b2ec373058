package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const gi = int64(1) << 30

func mustNode(t *testing.T, capacity, reserved Amount) *Node {
	t.Helper()
	n, err := NewNode(capacity, reserved)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestAdmitRefusesOversellNamingResourceAskedAndFree(t *testing.T) {
	n := mustNode(t, Amount{CPU: 4, Memory: 22 * gi}, Amount{CPU: 0.5, Memory: 2 * gi})
	if got := n.Allocatable(); got != (Amount{CPU: 3.5, Memory: 20 * gi}) {
		t.Fatalf("allocatable %+v, want 3.5 cores and 20Gi", got)
	}
	if err := n.Admit("db", Amount{CPU: 1, Memory: 18*gi + gi/2}); err != nil {
		t.Fatal(err)
	}
	err := n.Admit("web", Amount{CPU: 0.5, Memory: 2 * gi})
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("oversell admitted: %v", err)
	}
	want := `admit "web": memory: asked 2Gi, free 1.5Gi of allocatable 20Gi: resources exhausted`
	if err.Error() != want {
		t.Errorf("message\n got %q\nwant %q", err, want)
	}
	var ee *ExhaustedError
	if !errors.As(err, &ee) || len(ee.Shortages) != 1 || ee.Shortages[0].Resource != Memory {
		t.Errorf("typed error %+v", ee)
	}
	// Both short: both named.
	err = n.Admit("big", Amount{CPU: 3, Memory: 3 * gi})
	if err == nil || !strings.Contains(err.Error(), "cpu: asked 3 cores, free 2.5 cores of allocatable 3.5 cores; memory: asked 3Gi, free 1.5Gi") {
		t.Errorf("two shortages: %v", err)
	}
	// Exactly what is free fits; then nothing more does.
	if err := n.Admit("web", Amount{CPU: 2.5, Memory: gi + gi/2}); err != nil {
		t.Fatalf("exact fit refused: %v", err)
	}
	if err := n.Admit("one-more", Amount{CPU: 0.001}); !errors.Is(err, ErrExhausted) {
		t.Fatalf("admitted past allocatable: %v", err)
	}
	if g := n.Guaranteed(); g != n.Allocatable() {
		t.Errorf("guaranteed %+v != allocatable %+v", g, n.Allocatable())
	}
	if f := n.Free(); f != (Amount{}) {
		t.Errorf("free %+v, want zero", f)
	}
}

func TestReservationsCountAndConvertWithoutDoubleCount(t *testing.T) {
	n := mustNode(t, Amount{CPU: 2, Memory: 4 * gi}, Amount{})
	if err := n.Admit("a", Amount{CPU: 1, Memory: 2 * gi}); err != nil {
		t.Fatal(err)
	}
	if err := n.Reserve("incoming", Amount{CPU: 0.5, Memory: gi}); err != nil {
		t.Fatal(err)
	}
	if in := n.Incoming(); in != (Amount{CPU: 0.5, Memory: gi}) {
		t.Errorf("incoming %+v", in)
	}
	// The reservation counts against admissions.
	err := n.Admit("b", Amount{Memory: gi + 1})
	if !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), "free 1Gi") {
		t.Fatalf("reservation not counted: %v", err)
	}
	// ... and against other reservations.
	if err := n.Reserve("incoming2", Amount{CPU: 0.6}); !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), `reserve "incoming2": cpu: asked 0.6 cores, free 0.5 cores`) {
		t.Fatalf("second reservation: %v", err)
	}
	// The migration lands: Admit turns the reservation into the admission.
	if err := n.Admit("incoming", Amount{CPU: 0.5, Memory: gi}); err != nil {
		t.Fatalf("converting a reservation: %v", err)
	}
	if g := n.Guaranteed(); g != (Amount{CPU: 1.5, Memory: 3 * gi}) {
		t.Errorf("guaranteed %+v after conversion, want 1.5 cores 3Gi (no double count)", g)
	}
	if in := n.Incoming(); in != (Amount{}) {
		t.Errorf("incoming %+v after conversion", in)
	}
	// Reserving a name that runs here is a conflict, not a second booking.
	if err := n.Reserve("a", Amount{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("reserve of an admitted id: %v", err)
	}
	// Release frees; twice is harmless.
	n.Release("a")
	n.Release("a")
	if err := n.Admit("b", Amount{CPU: 1.5, Memory: gi}); err != nil {
		t.Fatalf("after release: %v", err)
	}
	// A failed migration releases its reservation.
	if err := n.Reserve("m", Amount{CPU: 0.1}); !errors.Is(err, ErrExhausted) {
		t.Fatalf("expected full cpu: %v", err)
	}
	n.Release("b")
	if err := n.Reserve("m", Amount{CPU: 0.1}); err != nil {
		t.Fatal(err)
	}
	n.Release("m")
	if g := n.Guaranteed(); g != (Amount{CPU: 0.5, Memory: gi}) {
		t.Errorf("guaranteed %+v", g)
	}
}

func TestAdmitResizesInPlace(t *testing.T) {
	n := mustNode(t, Amount{CPU: 2, Memory: 2 * gi}, Amount{})
	if err := n.Admit("a", Amount{CPU: 1.5, Memory: gi}); err != nil {
		t.Fatal(err)
	}
	// Growing to the whole node is fine: the old guarantee does not count against the new.
	if err := n.Admit("a", Amount{CPU: 2, Memory: 2 * gi}); err != nil {
		t.Fatalf("resize: %v", err)
	}
	if g := n.Guaranteed(); g != (Amount{CPU: 2, Memory: 2 * gi}) {
		t.Errorf("guaranteed %+v", g)
	}
	if err := n.Admit("a", Amount{CPU: -1}); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative guarantee: %v", err)
	}
	if err := n.Admit("", Amount{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty id: %v", err)
	}
}

func TestFractionalCoresDoNotDrift(t *testing.T) {
	n := mustNode(t, Amount{CPU: 1, Memory: gi}, Amount{})
	for i := 0; i < 1000; i++ {
		for j := 0; j < 10; j++ {
			if err := n.Admit(string(rune('a'+j)), Amount{CPU: 0.1}); err != nil {
				t.Fatalf("round %d: %v", i, err)
			}
		}
		if err := n.Admit("x", Amount{CPU: 0.001}); !errors.Is(err, ErrExhausted) {
			t.Fatalf("round %d: 10 × 0.1 cores left room: %v", i, err)
		}
		for j := 0; j < 10; j++ {
			n.Release(string(rune('a' + j)))
		}
	}
	if g := n.Guaranteed(); g != (Amount{}) {
		t.Errorf("drift: %+v", g)
	}
}

func TestRestoreNoDoubleCountAndOversoldReported(t *testing.T) {
	n := mustNode(t, Amount{CPU: 2, Memory: 4 * gi}, Amount{})
	if err := n.Admit("a", Amount{CPU: 1, Memory: gi}); err != nil {
		t.Fatal(err)
	}
	if err := n.Reserve("m", Amount{CPU: 0.5}); err != nil {
		t.Fatal(err)
	}
	// At ferryd start: a (already booked) and m (the migration landed) run.
	if err := n.Restore(map[string]Amount{"a": {CPU: 1, Memory: gi}, "m": {CPU: 0.5}}); err != nil {
		t.Fatal(err)
	}
	if g := n.Guaranteed(); g != (Amount{CPU: 1.5, Memory: gi}) {
		t.Errorf("guaranteed %+v after restore, want 1.5 cores 1Gi", g)
	}
	if in := n.Incoming(); in != (Amount{}) {
		t.Errorf("incoming %+v", in)
	}
	// Restoring twice changes nothing.
	if err := n.Restore(map[string]Amount{"a": {CPU: 1, Memory: gi}, "m": {CPU: 0.5}}); err != nil {
		t.Fatal(err)
	}
	if g := n.Guaranteed(); g != (Amount{CPU: 1.5, Memory: gi}) {
		t.Errorf("guaranteed %+v after second restore", g)
	}
	// Running containers are never refused, but an oversold node says so.
	err := n.Restore(map[string]Amount{"a": {Memory: 3 * gi}, "b": {Memory: 2 * gi}})
	if !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), "memory: asked 5Gi") {
		t.Fatalf("oversold restore: %v", err)
	}
	if len(n.Admitted()) != 2 {
		t.Errorf("restore dropped containers: %v", n.Admitted())
	}
	if err := n.Admit("c", Amount{Memory: 1}); !errors.Is(err, ErrExhausted) {
		t.Errorf("admitted on an oversold node: %v", err)
	}
}

func TestNewNodeValidates(t *testing.T) {
	if _, err := NewNode(Amount{CPU: 1, Memory: gi}, Amount{CPU: 2}); !errors.Is(err, ErrInvalid) {
		t.Errorf("reservation above capacity: %v", err)
	}
	if _, err := NewNode(Amount{CPU: 1, Memory: gi}, Amount{Memory: 2 * gi}); !errors.Is(err, ErrInvalid) {
		t.Errorf("memory reservation above capacity: %v", err)
	}
	if _, err := NewNode(Amount{CPU: -1}, Amount{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative capacity: %v", err)
	}
}

func TestDetectCapacityAndDefaultReservation(t *testing.T) {
	dir := t.TempDir()
	proc, sys := filepath.Join(dir, "proc"), filepath.Join(dir, "sys")
	for _, d := range []string{proc, filepath.Join(sys, "devices/system/cpu")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(proc, "meminfo"), []byte("MemTotal:       24731708 kB\nMemFree: 1 kB\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sys, "devices/system/cpu/online"), []byte("0-3,8,10-11\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := DetectCapacity(proc, sys)
	if err != nil {
		t.Fatal(err)
	}
	if c != (Amount{CPU: 7, Memory: 24731708 << 10}) {
		t.Errorf("capacity %+v", c)
	}
	if r := DefaultReservation(Amount{CPU: 2, Memory: 24 * gi}); r.CPU != 0.1 || r.Memory != 24*gi/20 {
		t.Errorf("reservation of a 2-core 24Gi node: %+v", r)
	}
	if r := DefaultReservation(Amount{CPU: 64, Memory: 512 * gi}); r.CPU != 3.2 || r.Memory != 4*gi {
		t.Errorf("reservation of a big node: %+v", r)
	}
	if r := DefaultReservation(Amount{CPU: 1, Memory: gi}); r.Memory != 256<<20 {
		t.Errorf("reservation of a small node: %+v", r)
	}
}

func TestScarcest(t *testing.T) {
	for _, c := range []struct {
		name              string
		alloc, guaranteed Amount
		want              Resource
	}{
		{"memory mostly promised", Amount{CPU: 4, Memory: 16 * gi}, Amount{CPU: 1, Memory: 12 * gi}, Memory},
		{"cpu mostly promised", Amount{CPU: 4, Memory: 16 * gi}, Amount{CPU: 3.5, Memory: 2 * gi}, CPU},
		// Absolute amounts do not matter, shares do: 1 core of 2 free (50%) vs 6Gi of 16 (37.5%).
		{"share not amount", Amount{CPU: 2, Memory: 16 * gi}, Amount{CPU: 1, Memory: 10 * gi}, Memory},
		{"tie goes to memory", Amount{CPU: 2, Memory: 2 * gi}, Amount{CPU: 1, Memory: gi}, Memory},
		{"nothing allocatable", Amount{CPU: 0, Memory: 2 * gi}, Amount{}, CPU},
		{"oversold", Amount{CPU: 2, Memory: 2 * gi}, Amount{CPU: 3, Memory: gi}, CPU},
	} {
		if got := Scarcest(c.alloc, c.guaranteed); got != c.want {
			t.Errorf("%s: scarcest %s, want %s", c.name, got, c.want)
		}
	}
	n := mustNode(t, Amount{CPU: 4, Memory: 8 * gi}, Amount{})
	if err := n.Admit("a", Amount{CPU: 3, Memory: gi}); err != nil {
		t.Fatal(err)
	}
	if n.Scarcest() != CPU {
		t.Errorf("node scarcest %s", n.Scarcest())
	}
	if err := n.Reserve("m", Amount{Memory: 7 * gi}); err != nil {
		t.Fatal(err)
	}
	if n.Scarcest() != Memory {
		t.Errorf("reservations must count for scarcest: %s", n.Scarcest())
	}
}
