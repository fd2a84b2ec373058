package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// BenchmarkMigrateShapedWire measures ferry's total migration time where
// the wire, not the machine, is the bottleneck:
//
//	FERRY_BIN=$PWD/bin go test -run '^$' -bench MigrateShapedWire -benchtime 1x -v ./integration/
//
// The budget for a migration's total time is 1.5 x N / the wire's
// bandwidth + a fixed cost. BenchmarkMigrate's wire is a veth at memory
// speed (~3 GB/s), where N / bandwidth is a fraction of what CRIU alone
// takes to dump and restore N (the runc CLI, no network at all, is over
// that budget there); the budget describes a link slower than the
// machine, as between two hosts. Here the same two ferryds' wire is held
// to FERRY_BENCH_WIRE (default 1gbit; tc's rate syntax) by a token bucket
// (tc tbf) on both ends, its bandwidth is measured with plain TCP, the
// fixed cost as in BenchmarkMigrate (the 16 MiB warm-up's total less its
// 16 MiB at that bandwidth), and every cell is one migration of the hog
// (N MiB touched, W MiB/s dirtied) in stop-and-copy and in post-copy.
func BenchmarkMigrateShapedWire(b *testing.B) {
	requireBenchHost(b)
	rate := os.Getenv("FERRY_BENCH_WIRE")
	if rate == "" {
		rate = "1gbit"
	}
	rig := newMigRig(b)
	shapeWire(b, rig, rate)
	rig.enablePostcopy(b)
	if rig.pcOff != "" {
		b.Fatalf("post-copy: %s", rig.pcOff)
	}
	warm := &migFigures{n: 16}
	rig.ferryCell(b, "mw-warm", "stopcopy", warm.n, warm.w, &warm.ferry)
	rig.ferryCell(b, "mw-warm-pc", "postcopy", warm.n, warm.w, &warm.ferryPC)
	wireMiBps, err := wireBandwidth(rig, 256)
	if err != nil {
		b.Fatalf("wire bandwidth: %v", err)
	}
	b.Logf("wire held to %s: plain TCP from A's namespace to B's moved 256 MiB at %.0f MiB/s", rate, wireMiBps)
	b.Logf("load average before: %s", loadAvg())

	var results []*migFigures
	for _, n := range []int{256, 1024} {
		for _, w := range migBenchDirty {
			b.Run(fmt.Sprintf("N=%d/W=%d", n, w), func(b *testing.B) {
				f := &migFigures{n: n, w: w}
				rig.ferryCell(b, fmt.Sprintf("mw-%d-%d", n, w), "stopcopy", n, w, &f.ferry)
				rig.ferryCell(b, fmt.Sprintf("mwp-%d-%d", n, w), "postcopy", n, w, &f.ferryPC)
				results = append(results, f)
				b.ReportMetric(0, "ns/op")
				b.ReportMetric(f.ferry.cmd, "stopcopy-total-ms")
				b.ReportMetric(f.ferryPC.cmd, "postcopy-total-ms")
				b.ReportMetric(f.ferry.seen, "stopcopy-downtime-ms")
				b.ReportMetric(f.ferryPC.seen, "postcopy-downtime-ms")
				b.ReportMetric(float64(n)/wireMiBps*1000, "wire-ms")
			})
		}
	}
	b.Logf("load average after: %s", loadAvg())
	var t strings.Builder
	fmt.Fprintf(&t, "ferry over a wire held to %s, one run per cell, ms; seen = the workload's longest heartbeat gap across the migration\n", rate)
	fmt.Fprintf(&t, "%5s %4s | %8s %8s %8s | %8s %8s %8s\n", "N", "W", "stop:seen", "frozen", "MiB", "post:seen", "pages", "MiB")
	for _, f := range results {
		fmt.Fprintf(&t, "%5d %4d | %8.0f %8.0f %8.0f | %8.0f %8.0f %8.0f\n", f.n, f.w, f.ferry.seen, f.ferry.frozen, f.ferry.mib,
			f.ferryPC.seen, f.ferryPC.postcopy, f.ferryPC.mib)
	}
	writeTotalTimes(&t, wireMiBps, warm, results)
	b.Logf("\n%s", t.String())
}

// shapeWire holds both ends of the rig's wire to rate with a token bucket
// (the namespaces go with the rig, and the qdiscs with them).
func shapeWire(b *testing.B, rig *migRig, rate string) {
	b.Helper()
	bits, err := tcRateBits(rate)
	if err != nil {
		b.Fatalf("FERRY_BENCH_WIRE=%q: %v", rate, err)
	}
	// The bucket holds 10 ms of the rate (more than the kernel's timer
	// tick and a 64 KiB GSO packet); packets wait in the queue up to 50 ms.
	burst := strconv.FormatInt(max(bits/8/100, 128<<10), 10)
	for _, end := range []struct{ ns, dev string }{{rig.a.netns, rig.wireA}, {rig.b.netns, rig.wireB}} {
		nsRun(b, end.ns, "tc", "qdisc", "add", "dev", end.dev, "root", "tbf", "rate", rate, "burst", burst, "latency", "50ms")
	}
}

// tcRateBits reads a tc rate ("1gbit", "500mbit", "100kbit", "2500000000bit").
func tcRateBits(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}}
	for _, u := range units {
		if v, ok := strings.CutSuffix(strings.ToLower(s), u.suffix); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil || n <= 0 {
				return 0, fmt.Errorf("not a rate: %q", s)
			}
			return int64(n * float64(u.mult)), nil
		}
	}
	return 0, fmt.Errorf("not a rate (want a number and gbit, mbit, kbit or bit): %q", s)
}
