package cgroup

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const benchEpisodes = 20

func reportLatencies(b *testing.B, name string, d []time.Duration) {
	b.Helper()
	slices.Sort(d)
	ms := func(x time.Duration) float64 { return float64(x.Microseconds()) / 1000 }
	b.ReportMetric(ms(d[len(d)/2]), name+"-median-ms")
	b.ReportMetric(ms(d[len(d)-1]), name+"-max-ms")
}

// BenchmarkHardenLatencyReal measures, on this machine's real cgroups, the
// time from the onset of memory pressure to every container's hardened
// limit being in place, over benchEpisodes episodes: a helper starts
// rewriting a 400Mi file in a 64Mi v1 memory cgroup (the detector's source);
// "onset" is the first increase of that cgroup's memory.pressure total
// (polled every 2 ms), "applied" is when the transition event arrives, which
// the controller sends after writing the limits. The default thresholds and
// windows are used, except a 300 ms leave window so the episodes are short.
// It also reports stimulus → applied (helper start included).
func BenchmarkHardenLatencyReal(b *testing.B) {
	r := newHogRig(b, func(c *DetectorConfig) { c.Memory.LeaveWindow = 300 * time.Millisecond })
	pressureFile := filepath.Join(DefaultRoot, "unified", r.tree.path("hog"), "memory.pressure")
	stallTotal := func() time.Duration {
		bs, err := os.ReadFile(pressureFile)
		if err != nil {
			b.Fatal(err)
		}
		p, err := parsePressure(string(bs))
		if err != nil {
			b.Fatal(err)
		}
		return p.Some.Total
	}
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		var onsetLat, stimLat, applyTime []time.Duration
		for ep := 0; ep < benchEpisodes; ep++ {
			time.Sleep(time.Second) // calm: a covered window of no stall
			base := stallTotal()
			onset := make(chan time.Time, 1)
			ctx, stop := context.WithCancel(context.Background())
			go func() {
				for ctx.Err() == nil {
					if stallTotal()-base > time.Millisecond {
						onset <- time.Now()
						return
					}
					time.Sleep(2 * time.Millisecond)
				}
			}()
			stim := time.Now()
			h := r.tree.start("hog", "rewrite:400", r.file)
			e := r.wait(b, Hardened, 15*time.Second)
			applied := time.Now()
			stop()
			var on time.Time
			select {
			case on = <-onset:
			default:
				b.Fatalf("episode %d: hardened without a recorded onset", ep)
			}
			if got := r.tree.read("memory", "c", "memory.limit_in_bytes"); got != "33554432" {
				b.Fatalf("episode %d: limit %s after hardening", ep, got)
			}
			onsetLat = append(onsetLat, applied.Sub(on))
			stimLat = append(stimLat, applied.Sub(stim))
			applyTime = append(applyTime, time.Duration(e.Values["apply_seconds"]*float64(time.Second)))
			h.kill()
			r.wait(b, Relaxed, 15*time.Second)
		}
		b.Logf("onset→applied: %v", onsetLat)
		reportLatencies(b, "onset-to-applied", onsetLat)
		reportLatencies(b, "stimulus-to-applied", stimLat)
		reportLatencies(b, "apply", applyTime)
	}
}

// BenchmarkHardenLatencyFake measures the same path against the fake
// cgroupfs and the fake clock, with 50 containers: the simulated time from a
// step of memory stall (30%, 100%) to the tick that hardens, and the wall
// time that tick takes (sampling all containers, the state machines, the
// writes of 50 containers' limits).
func BenchmarkHardenLatencyFake(b *testing.B) {
	for _, stall := range []time.Duration{30 * time.Millisecond, 100 * time.Millisecond} {
		b.Run(fmt.Sprintf("stall-%d%%", stall*100/tick), func(b *testing.B) {
			fs, psi, clk := newFakeV1(b), newFakePSI(b), newFakeClock()
			node, _ := NewNode(Amount{CPU: 64, Memory: 64 * gi}, Amount{})
			cfg := DefaultDetectorConfig()
			cfg.Source = HostPressure(strings.TrimSuffix(psi.dir, "/pressure"))
			cfg.Memory.LeaveWindow = time.Second // short episodes
			c, err := NewController(ControllerConfig{Node: node, Driver: fs.driver(), Detector: cfg, Clock: clk})
			if err != nil {
				b.Fatal(err)
			}
			for i := 0; i < 50; i++ {
				ct := Container{ID: fmt.Sprint("c", i), Path: fmt.Sprint("/ferry/c", i),
					Spec: Spec{Guarantee: Amount{CPU: 0.5, Memory: 64 * mi}, Ceiling: Amount{CPU: 1, Memory: 256 * mi}}}
				fs.addContainer(ct.Path)
				if err := c.Add(context.Background(), ct); err != nil {
					b.Fatal(err)
				}
			}
			tickOnce := func(s time.Duration) time.Duration {
				psi.add(Memory, s)
				clk.Advance(tick)
				start := time.Now()
				if err := c.Tick(context.Background()); err != nil {
					b.Fatal(err)
				}
				return time.Since(start)
			}
			b.ResetTimer()
			for n := 0; n < b.N; n++ {
				var sim, wall []time.Duration
				for ep := 0; ep < benchEpisodes; ep++ {
					for c.State(Memory) != Relaxed {
						tickOnce(0)
					}
					for i := 0; i < 10; i++ {
						tickOnce(0)
					}
					on := clk.Now()
					var took time.Duration
					for c.State(Memory) != Hardened {
						took = tickOnce(stall)
					}
					sim = append(sim, clk.Now().Sub(on))
					wall = append(wall, took)
					if l, _, _ := c.Effective("c0"); l.Ceiling.Memory != 64*mi {
						b.Fatalf("not applied: %+v", l)
					}
				}
				reportLatencies(b, "sim-onset-to-applied", sim)
				reportLatencies(b, "tick-wall", wall)
			}
		})
	}
}

// BenchmarkRealV1StatsAndApply is the per-container cost of one tick on the
// real v1 hierarchies: Stats reads 12 files (memory, cpu, cpuacct and the
// unified twin's pressure); Apply (unchanged limits) writes 6 and reads 2.
func BenchmarkRealV1StatsAndApply(b *testing.B) {
	tree := newTestTree(b)
	c := tree.mk("c")
	tree.start("c", "sleep", "-")
	d, err := NewV1Driver("")
	if err != nil {
		b.Fatal(err)
	}
	l := Limits{Guarantee: Amount{CPU: 0.25, Memory: 32 * mi}, Ceiling: Amount{CPU: 0.5, Memory: 128 * mi}, PidsMax: 64}
	b.Run("stats", func(b *testing.B) {
		for b.Loop() {
			if _, err := d.Stats(c); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("apply", func(b *testing.B) {
		for b.Loop() {
			if _, err := d.Apply(c, l); err != nil {
				b.Fatal(err)
			}
		}
	})
}
