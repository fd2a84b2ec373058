// Package proc reads what ferry needs to know about host processes from
// /proc: whether a pid still names the process ferry started, by its start
// time, so that a reused pid is never taken for a container.
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
)

// ErrGone means the pid does not exist, or exists but names another process.
var ErrGone = errors.New("process gone")

// StartTime returns the start time of pid in clock ticks since boot (field 22
// of /proc/PID/stat), the value the kernel never reuses for a live pid.
func StartTime(pid int) (uint64, error) {
	if pid <= 0 {
		return 0, fmt.Errorf("pid %d: %w", pid, ErrGone)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			return 0, fmt.Errorf("pid %d: %w", pid, ErrGone)
		}
		return 0, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	return parseStartTime(b)
}

func parseStartTime(stat []byte) (uint64, error) {
	// The comm field may hold spaces and parentheses: fields resume after the last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc stat %q", stat)
	}
	fields := bytes.Fields(stat[i+1:])
	// After the comm: state is field 3, so starttime (field 22) is index 19 here.
	if len(fields) < 20 {
		return 0, fmt.Errorf("malformed /proc stat: %d fields after comm", len(fields))
	}
	if len(fields[0]) == 1 && fields[0][0] == 'Z' {
		return 0, fmt.Errorf("zombie: %w", ErrGone)
	}
	v, err := strconv.ParseUint(string(fields[19]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("malformed start time %q: %w", fields[19], err)
	}
	return v, nil
}

// Alive reports whether pid still names the process that had startTime.
func Alive(pid int, startTime uint64) bool {
	st, err := StartTime(pid)
	return err == nil && st == startTime
}
