// Command hog is the migration benchmarks' workload: it allocates N MiB,
// writes every page, prints "ready", then every 10 ms rewrites W MiB/s
// worth of pages and prints a heartbeat (see integration/migrate_bench_test.go).
// Built static (CGO_ENABLED=0) by make build as bin/hog, so that it runs
// in a busybox rootfs and in the VM tier.
package main

import (
	"os"
	"runtime/debug"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		_, _ = os.Stderr.WriteString("usage: hog MIB DIRTY_MIB_PER_S [LOGFILE]\n")
		os.Exit(2)
	}
	mib, err1 := strconv.Atoi(os.Args[1])
	dirty, err2 := strconv.Atoi(os.Args[2])
	if err1 != nil || err2 != nil || mib <= 0 || dirty < 0 {
		_, _ = os.Stderr.WriteString("hog: bad arguments\n")
		os.Exit(2)
	}
	out := os.Stdout
	if len(os.Args) > 3 {
		f, err := os.OpenFile(os.Args[3], os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			_, _ = os.Stderr.WriteString("hog: " + err.Error() + "\n")
			os.Exit(1)
		}
		out = f
	}
	debug.SetGCPercent(-1) // the loop allocates nothing; no collector work
	const page = 4096
	buf := make([]byte, mib<<20)
	for i := 0; i < len(buf); i += page {
		buf[i] = byte(i/page) | 1
	}
	const tick = 10 * time.Millisecond
	perTick := (dirty << 20) / int(time.Second/tick)
	line := make([]byte, 0, 128)
	line = append(line, "ready "...)
	line = strconv.AppendInt(line, time.Now().UnixNano(), 10)
	line = append(line, '\n')
	_, _ = out.Write(line)
	pos := 0
	last := time.Now()
	lastWall := last.Round(0) // no monotonic reading: Sub uses the wall clock
	for seq := int64(1); ; seq++ {
		time.Sleep(tick)
		for j := 0; j < perTick; j += page {
			buf[pos]++
			pos += page
			if pos >= len(buf) {
				pos = 0
			}
		}
		now := time.Now()
		wall := now.Round(0)
		gap, mono := wall.Sub(lastWall), now.Sub(last)
		last, lastWall = now, wall
		line = append(line[:0], "hb "...)
		line = strconv.AppendInt(line, seq, 10)
		line = append(line, ' ')
		line = strconv.AppendInt(line, now.UnixNano(), 10)
		line = append(line, ' ')
		line = strconv.AppendInt(line, int64(gap/time.Microsecond), 10)
		line = append(line, ' ')
		line = strconv.AppendInt(line, int64(mono/time.Microsecond), 10)
		line = append(line, '\n')
		_, _ = out.Write(line)
	}
}
