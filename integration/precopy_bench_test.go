package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
)

// BenchmarkVMPreCopy (the VM tier: it needs soft-dirty; make bench-vm) is
// pre-copy against stop-and-copy downtime, side by side in one run, for the
// hog workload (N MiB touched, W MiB/s dirtied; N = 256 by default,
// FERRY_VM_BENCH_MIB overrides it) at W = 0 and 16: for each W the hog
// runs on A and moves to B with --mode stopcopy, then again with --mode
// precopy (target 300 ms, at most 8 rounds). Reported: the largest gap in
// the hog's heartbeats across the migration (the downtime it saw), ferry's
// frozen time, the rounds, bytes moved, total time, and the ratio pre-copy
// / stop-and-copy. Software emulation is slow, TLS in it slower (a few MB/s
// through the tunnel): the ratio is the figure, not the absolute times.
func BenchmarkVMPreCopy(b *testing.B) {
	if out, err := exec.Command("criu", "check", "--feature", "mem_dirty_track").CombinedOutput(); err != nil {
		testenv.Unavailable(b, "no soft-dirty on this kernel ("+strings.TrimSpace(string(out))+"): run it in the VM tier, make bench-vm")
	}
	n := 256
	if v := os.Getenv("FERRY_VM_BENCH_MIB"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 {
			b.Fatalf("FERRY_VM_BENCH_MIB %q: want MiB", v)
		}
	}
	tmp := b.TempDir()
	rootfs := hogRootfs(b, filepath.Join(tmp, "rootfs"), buildHog(b, tmp))
	p := newMigrationPairWith(b, false, "--remote-rootfs", tmp)

	type cell struct {
		mode                     string
		w                        int
		seen, frozen, total, mib float64
		rounds                   int
	}
	var cells []cell
	run := func(mode string, w int) cell {
		name := fmt.Sprintf("hog-%s-%d", mode, w)
		p.a.mustCtl("run", name, "--rootfs", rootfs, "--cpu-guarantee", "0.25", "--cpu-limit", "1",
			"--", "/hog", strconv.Itoa(n), strconv.Itoa(w))
		logs := func(d *daemon) func() (string, error) {
			return func() (string, error) {
				out, errOut, code := d.ctl("logs", name)
				if code != 0 {
					return out, fmt.Errorf("ferryctl logs: exit %d: %s", code, errOut)
				}
				return out, nil
			}
		}
		waitHeartbeats(b, mode+" on A", logs(p.a), time.Time{}, migHeartbeats, 10*time.Minute)
		t0 := time.Now()
		out, errOut, code := p.a.ctlWithin(30*time.Minute, "migrate", name, "--to", p.addrB, "--mode", mode)
		t1 := time.Now()
		if code != 0 {
			b.Fatalf("migrate %s: exit %d\n%s%s", name, code, out, errOut)
		}
		b.Logf("ferryctl migrate %s:\n%s", name, out)
		readies, hbs := waitHeartbeats(b, mode+" on B", logs(p.b), t1, migHeartbeats, 5*time.Minute)
		checkContinuity(b, name, readies, hbs)
		gap, ok := migrationGap(hbs, t0, t1)
		if !ok {
			b.Fatalf("%s: no heartbeat gap overlaps the migration", name)
		}
		rec := lastMigration(b, p.a)
		p.b.mustCtl("rm", "-f", name)
		return cell{mode: mode, w: w, seen: msf(gap.gap), frozen: float64(rec.FrozenMs), total: msf(t1.Sub(t0)),
			mib: float64(rec.BytesSent) / (1 << 20), rounds: len(rec.PrecopyRounds)}
	}
	for _, w := range []int{0, 16} {
		b.Run(fmt.Sprintf("N=%d/W=%d", n, w), func(b *testing.B) {
			stop := run("stopcopy", w)
			pre := run("precopy", w)
			cells = append(cells, stop, pre)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(stop.seen, "stopcopy-downtime-ms")
			b.ReportMetric(pre.seen, "precopy-downtime-ms")
			b.ReportMetric(float64(pre.rounds), "precopy-rounds")
			if stop.seen > 0 {
				b.ReportMetric(pre.seen/stop.seen, "downtime-ratio")
			}
		})
	}
	var t strings.Builder
	fmt.Fprintf(&t, "pre-copy vs stop-and-copy in the VM, N=%d MiB, one run per cell (ms, MiB)\n", n)
	fmt.Fprintf(&t, "%4s %-8s | %7s %7s %7s %7s %6s\n", "W", "mode", "seen", "frozen", "total", "MiB", "rounds")
	for _, c := range cells {
		fmt.Fprintf(&t, "%4d %-8s | %7.0f %7.0f %7.0f %7.1f %6d\n", c.w, c.mode, c.seen, c.frozen, c.total, c.mib, c.rounds)
	}
	for i := 0; i+1 < len(cells); i += 2 {
		if cells[i].seen > 0 {
			fmt.Fprintf(&t, "W=%d: pre-copy / stop-and-copy downtime = %.2f\n", cells[i].w, cells[i+1].seen/cells[i].seen)
		}
	}
	b.Logf("\n%s", t.String())
}
