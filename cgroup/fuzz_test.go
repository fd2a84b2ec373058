package cgroup

import (
	"errors"
	"math"
	"testing"
)

// FuzzParseSize: any input either parses to a non-negative size or fails
// with ErrInvalid; never a panic, never a negative.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"64Mi", "1G", "0", "-1", "1e400", "NaN", "9223372036854775807", "1.5Ti", "k", " 3 K"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseSize(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseSize(%q): error %v not ErrInvalid", s, err)
			}
			return
		}
		if v < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, v)
		}
	})
}

// FuzzParseCPU: a parsed CPU amount is finite and non-negative.
func FuzzParseCPU(f *testing.F) {
	for _, s := range []string{"0.5", "250m", "-1", "Inf", "1e30", "m", "0x10"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseCPU(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseCPU(%q): error %v not ErrInvalid", s, err)
			}
			return
		}
		if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
			t.Fatalf("ParseCPU(%q) = %v", s, v)
		}
	})
}

// FuzzNormalize: an accepted spec has guarantee <= ceiling and no negatives.
func FuzzNormalize(f *testing.F) {
	f.Add(0.5, 1.0, int64(64<<20), int64(128<<20), int64(10))
	f.Add(-1.0, 0.0, int64(0), int64(-5), int64(0))
	f.Fuzz(func(t *testing.T, gc, cc float64, gm, cm, pids int64) {
		s := Spec{Guarantee: Amount{CPU: gc, Memory: gm}, Ceiling: Amount{CPU: cc, Memory: cm}, PidsMax: pids}
		if err := s.Normalize(); err != nil {
			return
		}
		if s.Guarantee.CPU > s.Ceiling.CPU || s.Guarantee.Memory > s.Ceiling.Memory || s.Guarantee.CPU < 0 || s.Guarantee.Memory < 0 || s.PidsMax < 0 {
			t.Fatalf("accepted %+v", s)
		}
		_ = s.Resources()
	})
}
