package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// PSILine is one line of a pressure file: the share of wall time in which
// some (or all) non-idle tasks were stalled on the resource.
type PSILine struct {
	Avg10  float64       `json:"avg10"` // percent, the kernel's 10 s moving average, updated every 2 s
	Avg60  float64       `json:"avg60"`
	Avg300 float64       `json:"avg300"`
	Total  time.Duration `json:"total"` // cumulative stall time, exact at each read
}

// Pressure is one pressure file. Present is false where the kernel has none
// (no PSI, no unified twin of a v1 cgroup, psi=0).
type Pressure struct {
	Present bool    `json:"present"`
	Some    PSILine `json:"some"`
	Full    PSILine `json:"full"`
}

// parsePressure parses the kernel's format:
//
//	some avg10=0.00 avg60=0.00 avg300=0.00 total=0
//	full avg10=0.00 avg60=0.00 avg300=0.00 total=0
func parsePressure(s string) (Pressure, error) {
	p := Pressure{Present: true}
	seen := false
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		var dst *PSILine
		switch f[0] {
		case "some":
			dst, seen = &p.Some, true
		case "full":
			dst = &p.Full
		default:
			continue
		}
		for _, kv := range f[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return Pressure{}, fmt.Errorf("psi field %q: not key=value", kv)
			}
			if k == "total" {
				us, err := strconv.ParseUint(v, 10, 63)
				if err != nil {
					return Pressure{}, fmt.Errorf("psi total %q: %w", v, err)
				}
				dst.Total = time.Duration(us) * time.Microsecond
				continue
			}
			x, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return Pressure{}, fmt.Errorf("psi %s %q: %w", k, v, err)
			}
			switch k {
			case "avg10":
				dst.Avg10 = x
			case "avg60":
				dst.Avg60 = x
			case "avg300":
				dst.Avg300 = x
			}
		}
	}
	if !seen {
		return Pressure{}, fmt.Errorf("psi: no \"some\" line in %q", s)
	}
	return p, nil
}

// noPSI reports the errors that mean "this kernel or cgroup has no pressure
// file": absent, or ENOTSUP/EOPNOTSUPP when PSI is compiled in but off.
func noPSI(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP)
}

func readPressureWith(f files, dir, file string) (Pressure, error) {
	s, err := f.Read(dir, file)
	if err != nil {
		if noPSI(err) {
			return Pressure{}, nil
		}
		return Pressure{}, err
	}
	p, err := parsePressure(s)
	if err != nil {
		return Pressure{}, &FileError{Op: "parse", Path: filepath.Join(dir, file), Err: err}
	}
	return p, nil
}

// PressureSource is where the detector reads the pressure that stands for
// the node: the host's /proc/pressure, or one cgroup of the unified hierarchy
// (ferry's cgroup parent on a host shared with other workloads, or a test's
// own cgroup).
type PressureSource struct {
	// Dir holds the files: /proc/pressure ("cpu", "memory") or a unified
	// cgroup directory ("cpu.pressure", "memory.pressure").
	Dir string `json:"dir"`
	// Scope is the cgroup path whose tasks Dir covers: "/" for the host.
	// Stalls of containers under Scope that sit at their own ceiling are
	// discounted (see DetectorConfig).
	Scope string `json:"scope"`
	// Cgroup says Dir is a cgroup directory ("cpu.pressure",
	// "memory.pressure") rather than /proc/pressure ("cpu", "memory").
	Cgroup bool `json:"cgroup"`
}

// HostPressure is the host-wide source, /proc/pressure under procRoot ("":
// /proc).
func HostPressure(procRoot string) PressureSource {
	if procRoot == "" {
		procRoot = "/proc"
	}
	return PressureSource{Dir: filepath.Join(procRoot, "pressure"), Scope: "/"}
}

// CgroupPressure is the pressure of one cgroup: dir is its directory in the
// unified hierarchy (on a v1 host, /sys/fs/cgroup/unified/<path>) and scope
// its cgroup path.
func CgroupPressure(dir, scope string) PressureSource {
	return PressureSource{Dir: dir, Scope: scope, Cgroup: true}
}

// Read reads the source's pressure for r.
func (s PressureSource) Read(r Resource) (Pressure, error) {
	name := string(r)
	if s.Cgroup {
		name += ".pressure"
	}
	p := filepath.Join(s.Dir, name)
	b, err := os.ReadFile(p)
	if err != nil {
		return Pressure{}, &FileError{Op: "read", Path: p, Err: err}
	}
	ps, err := parsePressure(string(b))
	if err != nil {
		return Pressure{}, &FileError{Op: "parse", Path: p, Err: err}
	}
	return ps, nil
}

// covers reports whether the cgroup at path is inside the source's scope.
func (s PressureSource) covers(path string) bool {
	scope := filepath.Clean("/" + s.Scope)
	if scope == "/" {
		return true
	}
	path = filepath.Clean("/" + path)
	return path == scope || strings.HasPrefix(path, scope+"/")
}
