package cgroup

import (
	"errors"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	good := map[string]int64{"0": 0, "1024": 1024, "64Mi": 64 << 20, "64M": 64 << 20, "1G": 1 << 30,
		"1.5Gi": 3 << 29, "10KB": 10000, "2MiB": 2 << 20, " 3k ": 3 << 10, "7B": 7}
	for in, want := range good {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "-5M", "abc", "12X", "M", "1e400", "NaN", "Inf"} {
		if _, err := ParseSize(in); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseSize(%q) err = %v, want ErrInvalid", in, err)
		} else if !strings.Contains(err.Error(), in) {
			t.Errorf("error %q does not name the input %q", err, in)
		}
	}
}

func TestParseCPU(t *testing.T) {
	good := map[string]float64{"0.5": 0.5, "2": 2, "250m": 0.25, "0": 0}
	for in, want := range good {
		got, err := ParseCPU(in)
		if err != nil || got != want {
			t.Errorf("ParseCPU(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "x", "1.2.3", "NaN", "Inf", "1e30"} {
		if _, err := ParseCPU(in); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseCPU(%q) err = %v, want ErrInvalid", in, err)
		}
	}
}

func TestNormalize(t *testing.T) {
	s := Spec{Guarantee: Amount{CPU: 0.5, Memory: 64 << 20}}
	if err := s.Normalize(); err != nil {
		t.Fatal(err)
	}
	if s.Ceiling != s.Guarantee {
		t.Fatalf("ceiling %+v did not default to guarantee %+v", s.Ceiling, s.Guarantee)
	}
	bad := []struct {
		spec Spec
		want string
	}{
		{Spec{Guarantee: Amount{CPU: 2}, Ceiling: Amount{CPU: 1}}, "cpu guarantee 2 above cpu limit 1"},
		{Spec{Guarantee: Amount{Memory: 128 << 20}, Ceiling: Amount{Memory: 64 << 20}}, "memory guarantee 128Mi above memory limit 64Mi"},
		{Spec{Guarantee: Amount{CPU: -1}}, "cpu guarantee -1"},
		{Spec{Ceiling: Amount{Memory: -5}}, "memory limit -5"},
		{Spec{PidsMax: -2}, "pids -2"},
		{Spec{Ceiling: Amount{Memory: 1024}}, "below the minimum"},
	}
	for _, b := range bad {
		err := b.spec.Normalize()
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), b.want) {
			t.Errorf("Normalize(%+v) = %v, want error containing %q", b.spec, err, b.want)
		}
	}
}

func TestResourcesMapping(t *testing.T) {
	s := Spec{Guarantee: Amount{CPU: 0.5, Memory: 64 << 20}, Ceiling: Amount{CPU: 1.5, Memory: 256 << 20}, PidsMax: 100}
	r := s.Resources()
	if r.CpuShares != 512 || r.CpuQuota != 150000 || r.CpuPeriod != 100000 {
		t.Errorf("cpu: shares %d quota %d period %d", r.CpuShares, r.CpuQuota, r.CpuPeriod)
	}
	if r.Memory != 256<<20 || r.MemoryReservation != 64<<20 || r.PidsLimit == nil || *r.PidsLimit != 100 {
		t.Errorf("memory %d reservation %d pids %v", r.Memory, r.MemoryReservation, r.PidsLimit)
	}
	if got := SharesForCores(0.001); got != 2 {
		t.Errorf("tiny guarantee gave %d shares, want the kernel minimum 2", got)
	}
}
