package cgroup

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ErrInvalid classes every parse and validation error of this package.
var ErrInvalid = errors.New("invalid resource value")

var sizeSuffixes = []struct {
	suffix string
	mult   float64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"k", 1 << 10}, {"K", 1 << 10}, {"m", 1 << 20}, {"M", 1 << 20}, {"g", 1 << 30}, {"G", 1 << 30}, {"t", 1 << 40}, {"T", 1 << 40},
	{"B", 1}, {"b", 1},
}

// ParseSize parses a memory size: a byte count, or a number with a suffix
// (K/M/G/T and Ki/Mi/Gi/Ti are powers of 1024, KB/MB/GB/TB powers of 1000).
func ParseSize(s string) (int64, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, fmt.Errorf("size %q: empty: %w", s, ErrInvalid)
	}
	num, mult := in, 1.0
	for _, sf := range sizeSuffixes {
		if strings.HasSuffix(in, sf.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(in, sf.suffix)), sf.mult
			break
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, fmt.Errorf("size %q: not a number with an optional K/M/G/T suffix: %w", s, ErrInvalid)
	}
	if v < 0 {
		return 0, fmt.Errorf("size %q: negative: %w", s, ErrInvalid)
	}
	b := v * mult
	if b >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q: too large: %w", s, ErrInvalid)
	}
	return int64(b), nil
}

// ParseCPU parses a CPU amount in cores: "0.5", "2", or millicores "500m".
func ParseCPU(s string) (float64, error) {
	in := strings.TrimSpace(s)
	div := 1.0
	if strings.HasSuffix(in, "m") {
		in, div = strings.TrimSuffix(in, "m"), 1000
	}
	v, err := strconv.ParseFloat(in, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, fmt.Errorf("cpu %q: not a number of cores (e.g. 0.5, 2, 250m): %w", s, ErrInvalid)
	}
	if v < 0 {
		return 0, fmt.Errorf("cpu %q: negative: %w", s, ErrInvalid)
	}
	v /= div
	if v > 1<<20 {
		return 0, fmt.Errorf("cpu %q: too large: %w", s, ErrInvalid)
	}
	return v, nil
}

// FormatSize renders bytes with a binary suffix, e.g. 64Mi.
func FormatSize(b int64) string {
	switch {
	case b == 0:
		return "0"
	case b%(1<<30) == 0:
		return strconv.FormatInt(b>>30, 10) + "Gi"
	case b%(1<<20) == 0:
		return strconv.FormatInt(b>>20, 10) + "Mi"
	case b%(1<<10) == 0:
		return strconv.FormatInt(b>>10, 10) + "Ki"
	}
	return strconv.FormatInt(b, 10)
}

type rounding int

const (
	roundDown rounding = iota // what is free: never promise more than there is
	roundUp                   // what is asked: never show less than was asked
)

// formatQuantity renders cores ("0.5 cores") or bytes ("1.5Gi") for messages,
// with at most two decimals rounded in the given direction.
func formatQuantity(r Resource, v float64, mode rounding) string {
	if r == CPU {
		return trimDecimals(v, mode) + " cores"
	}
	return formatBytesApprox(v, mode)
}

// formatBytesApprox renders a byte count in the largest binary unit it
// reaches, with at most two decimals: 1610612736 → "1.5Gi".
func formatBytesApprox(v float64, mode rounding) string {
	units := []struct {
		suffix string
		size   float64
	}{{"Ti", 1 << 40}, {"Gi", 1 << 30}, {"Mi", 1 << 20}, {"Ki", 1 << 10}}
	for _, u := range units {
		if math.Abs(v) >= u.size {
			return trimDecimals(v/u.size, mode) + u.suffix
		}
	}
	return strconv.FormatFloat(v, 'f', 0, 64)
}

func trimDecimals(v float64, mode rounding) string {
	scaled := v * 100
	if mode == roundUp {
		scaled = math.Ceil(scaled - 1e-6)
	} else {
		scaled = math.Floor(scaled + 1e-6)
	}
	return strconv.FormatFloat(scaled/100, 'f', -1, 64)
}
