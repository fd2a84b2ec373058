package migrate

import (
	"strings"
	"testing"
	"time"
)

const (
	mib     = 1 << 20
	gibPage = 1 << 30 / DefaultPageSize // pages in 1 GiB
)

// workload simulates pre-copy against a workload: memPages present pages,
// of which hotPages are rewritten at dirtyRate pages/s, moved at bandwidth
// bytes/s. Each round's tree stays frozen 10 ms; the next round starts when
// the previous one's pages have been sent.
type workload struct {
	memPages, hotPages uint64
	dirtyRate          float64 // pages/s
	bandwidth          float64 // bytes/s
}

func (w workload) round(prev *Round) Round {
	const frozen = 10 * time.Millisecond
	start := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	pages := w.memPages
	if prev != nil {
		start = prev.Started.Add(prev.cycle())
		interval := prev.cycle().Seconds()
		pages = min(w.hotPages, uint64(w.dirtyRate*interval))
	}
	bytes := int64(pages) * DefaultPageSize
	return Round{
		PagesWritten:       pages,
		PagesSkippedParent: w.memPages - pages,
		FrozenTime:         frozen,
		Started:            start,
		BytesSent:          bytes,
		TransferTime:       time.Duration(float64(bytes) / w.bandwidth * float64(time.Second)),
	}
}

// run drives Decide the way the migration does: a round, a decision, until
// it says stop (or 20 rounds, a test failure).
func (w workload) run(t *testing.T, opts Options) ([]Round, Decision) {
	t.Helper()
	var rounds []Round
	if d := Decide(nil, opts); d.Stop || d.Reason != ReasonNoRounds {
		t.Fatalf("no rounds: %v, want continue with %s", d, ReasonNoRounds)
	}
	for len(rounds) < 20 {
		var prev *Round
		if len(rounds) > 0 {
			prev = &rounds[len(rounds)-1]
		}
		rounds = append(rounds, w.round(prev))
		d := Decide(rounds, opts)
		t.Logf("round %d: %d pages: %v", len(rounds), rounds[len(rounds)-1].PagesWritten, d)
		if d.Stop {
			return rounds, d
		}
	}
	t.Fatalf("no stop after %d rounds", len(rounds))
	return nil, Decision{}
}

func TestDecideConverging(t *testing.T) {
	// 1 GiB at 100 MiB/s, 20 MB/s dirtied: 10.2 s, then 2 s, then 0.4 s
	// of pages; the third round leaves ~80 ms of pages for the freeze.
	w := workload{memPages: gibPage, hotPages: gibPage, dirtyRate: 5000, bandwidth: 100 * mib}
	rounds, d := w.run(t, Options{})
	if d.Reason != ReasonFitsTarget || len(rounds) != 3 {
		t.Fatalf("stopped after %d rounds with %s, want 3 with %s", len(rounds), d.Reason, ReasonFitsTarget)
	}
	if d.PredictedDowntime > DefaultDowntimeTarget || d.PredictedDowntime < DefaultFixedCost {
		t.Errorf("predicted downtime %s, want between the fixed cost and the target", d.PredictedDowntime)
	}
	if d.DirtyRate < 4900 || d.DirtyRate > 5100 {
		t.Errorf("dirty rate %.0f pages/s, want about 5000", d.DirtyRate)
	}
	if d.Bandwidth < 99*mib || d.Bandwidth > 101*mib {
		t.Errorf("bandwidth %.0f B/s, want about %d", d.Bandwidth, 100*mib)
	}
}

// TestDecideFirstRoundIsNotCompared is the phaul bug: go-criu's phaul
// compares round 1 with an empty record, sees it "grow" by all its pages
// and stops. Round 1 must continue, and so must a round 2 that shrank but
// does not fit yet.
func TestDecideFirstRoundIsNotCompared(t *testing.T) {
	t0 := time.Now()
	r1 := Round{PagesWritten: gibPage, Started: t0, FrozenTime: 20 * time.Millisecond,
		BytesSent: 1 << 30, TransferTime: 10 * time.Second} // ~100 MiB/s
	d := Decide([]Round{r1}, Options{})
	if d.Stop || d.Reason != ReasonFirstRound {
		t.Fatalf("after one large round: %v, want continue (%s)", d, ReasonFirstRound)
	}
	if d.DirtyRate != 0 {
		t.Errorf("dirty rate %f after one round, want 0 (unknown)", d.DirtyRate)
	}
	// Round 1 is the whole memory: the prediction is stop-and-copy's.
	if want := DefaultFixedCost + 10*time.Second; d.PredictedDowntime < want-10*time.Millisecond || d.PredictedDowntime > want+10*time.Millisecond {
		t.Errorf("predicted %s after one round, want about %s", d.PredictedDowntime, want)
	}

	r2 := Round{PagesWritten: gibPage / 4, PagesSkippedParent: gibPage * 3 / 4, Started: t0.Add(10 * time.Second),
		FrozenTime: 20 * time.Millisecond, BytesSent: 1 << 28, TransferTime: 2500 * time.Millisecond}
	d = Decide([]Round{r1, r2}, Options{})
	if d.Stop || d.Reason != ReasonConverging {
		t.Fatalf("round 2 at a quarter of round 1, not fitting: %v, want continue (%s)", d, ReasonConverging)
	}
	if want := float64(gibPage/4) / 10; d.DirtyRate != want {
		t.Errorf("dirty rate %f pages/s, want %f (round 2's pages over 10 s since round 1 started)", d.DirtyRate, want)
	}
}

func TestDecideNotConverging(t *testing.T) {
	// A 780 MiB hot set rewritten at 117 MiB/s over a 100 MiB/s link:
	// round 2 is smaller than round 1 (the cold quarter is gone), round 3
	// is as large as round 2.
	w := workload{memPages: gibPage, hotPages: 200000, dirtyRate: 30000, bandwidth: 100 * mib}
	rounds, d := w.run(t, Options{})
	if d.Reason != ReasonNotConverging || len(rounds) != 3 {
		t.Fatalf("stopped after %d rounds with %s, want 3 with %s", len(rounds), d.Reason, ReasonNotConverging)
	}
	if d.PredictedDowntime <= DefaultDowntimeTarget {
		t.Errorf("predicted %s: a not-converging stop should not fit", d.PredictedDowntime)
	}

	// Round 2 barely smaller than round 1 (5%, under MinShrink's 10%).
	t0 := time.Now()
	r1 := Round{PagesWritten: 100000, Started: t0, BytesSent: 100000 * 4096, TransferTime: 4 * time.Second}
	r2 := Round{PagesWritten: 95000, Started: t0.Add(4 * time.Second), BytesSent: 95000 * 4096, TransferTime: 3800 * time.Millisecond}
	if d := Decide([]Round{r1, r2}, Options{}); !d.Stop || d.Reason != ReasonNotConverging {
		t.Errorf("round 2 at 95%% of round 1: %v, want stop (%s)", d, ReasonNotConverging)
	}
	if d := Decide([]Round{r1, r2}, Options{MinShrink: 0.04}); d.Stop {
		t.Errorf("round 2 at 95%% of round 1, MinShrink 4%%: %v, want continue", d)
	}
}

func TestDecideRoundLimit(t *testing.T) {
	// Each round 80% of the one before: converging, but far too slowly.
	w := workload{memPages: gibPage, hotPages: gibPage, dirtyRate: 20000, bandwidth: 100 * mib}
	rounds, d := w.run(t, Options{})
	if d.Reason != ReasonRoundLimit || len(rounds) != DefaultMaxRounds {
		t.Fatalf("stopped after %d rounds with %s, want %d with %s", len(rounds), d.Reason, DefaultMaxRounds, ReasonRoundLimit)
	}
	rounds, d = w.run(t, Options{MaxRounds: 3})
	if d.Reason != ReasonRoundLimit || len(rounds) != 3 {
		t.Fatalf("MaxRounds 3: stopped after %d rounds with %s", len(rounds), d.Reason)
	}
}

func TestDecideZeroDirty(t *testing.T) {
	// 1 GiB that nobody writes: round 2 finds nothing dirty.
	w := workload{memPages: gibPage, hotPages: 0, dirtyRate: 0, bandwidth: 100 * mib}
	rounds, d := w.run(t, Options{})
	if d.Reason != ReasonFitsTarget || len(rounds) != 2 {
		t.Fatalf("stopped after %d rounds with %s, want 2 with %s", len(rounds), d.Reason, ReasonFitsTarget)
	}
	if d.RemainingBytes != 0 || d.PredictedDowntime != DefaultFixedCost {
		t.Errorf("remaining %d B, predicted %s: want 0 B and the fixed cost", d.RemainingBytes, d.PredictedDowntime)
	}

	// A small process (64 pages) fits after round 1, even were all its
	// memory dirty again.
	w = workload{memPages: 64, hotPages: 64, dirtyRate: 1e6, bandwidth: 100 * mib}
	rounds, d = w.run(t, Options{})
	if d.Reason != ReasonFitsTarget || len(rounds) != 1 {
		t.Fatalf("small process: stopped after %d rounds with %s, want 1 with %s", len(rounds), d.Reason, ReasonFitsTarget)
	}
}

func TestDecideBandwidthCap(t *testing.T) {
	// Converges in 2 rounds at the measured 1 GiB/s.
	w := workload{memPages: gibPage, hotPages: gibPage, dirtyRate: 10000, bandwidth: 1 << 30}
	rounds, d := w.run(t, Options{})
	if d.Reason != ReasonFitsTarget || len(rounds) != 2 {
		t.Fatalf("uncapped: stopped after %d rounds with %s, want 2 with %s", len(rounds), d.Reason, ReasonFitsTarget)
	}
	uncapped := d

	// The same rounds, with the migration capped at 1 MiB/s: the remaining
	// ~1.5 MB take over a second.
	capped := Decide(rounds, Options{BandwidthCap: mib})
	if capped.Bandwidth != mib {
		t.Errorf("bandwidth %.0f, want the cap %d", capped.Bandwidth, mib)
	}
	if capped.Stop && capped.Reason == ReasonFitsTarget {
		t.Errorf("capped: %v, must not fit", capped)
	}
	want := DefaultFixedCost + time.Duration(float64(capped.RemainingBytes)/mib*float64(time.Second))
	if diff := capped.PredictedDowntime - want; diff < -time.Millisecond || diff > time.Millisecond {
		t.Errorf("capped: predicted %s, want fixed + remaining/cap = %s", capped.PredictedDowntime, want)
	}
	if capped.PredictedDowntime <= uncapped.PredictedDowntime {
		t.Errorf("capped prediction %s not above uncapped %s", capped.PredictedDowntime, uncapped.PredictedDowntime)
	}

	// A cap above what was measured changes nothing.
	if d := Decide(rounds, Options{BandwidthCap: 10 << 30}); d.Bandwidth != uncapped.Bandwidth {
		t.Errorf("cap above measured: bandwidth %.0f, want the measured %.0f", d.Bandwidth, uncapped.Bandwidth)
	}
	// With nothing measured the cap is the estimate.
	bare := []Round{{PagesWritten: 64}}
	if d := Decide(bare, Options{BandwidthCap: 100 * mib}); d.Bandwidth != 100*mib || d.Reason != ReasonFitsTarget {
		t.Errorf("nothing measured, capped: %v, want bandwidth = cap and fits-target", d)
	}
}

func TestDecideUnknownBandwidth(t *testing.T) {
	d := Decide([]Round{{PagesWritten: 1000}}, Options{})
	if d.PredictedDowntime != UnknownDowntime || d.Stop {
		t.Errorf("%v: want unknown downtime and another round", d)
	}
	if !strings.Contains(d.String(), "predicted-downtime=unknown") {
		t.Errorf("String() = %q", d.String())
	}
}

func TestDecideCountsCRIUDumpCost(t *testing.T) {
	t0 := time.Now()
	r1 := Round{PagesWritten: 10000, Started: t0, BytesSent: 10000 * 4096, TransferTime: time.Second}
	r2 := Round{PagesWritten: 1000, Started: t0.Add(time.Second), BytesSent: 1000 * 4096, TransferTime: 100 * time.Millisecond}
	base := Decide([]Round{r1, r2}, Options{})
	// CRIU spent 1 ms per page collecting them (while frozen; MemwriteTime
	// would lengthen the cycle too): each page left costs 1 ms more.
	r1.MemdumpTime = 10 * time.Second
	r2.MemdumpTime = time.Second
	d := Decide([]Round{r1, r2}, Options{})
	pages := d.RemainingBytes / DefaultPageSize
	want := base.PredictedDowntime + time.Duration(pages)*time.Millisecond
	if diff := d.PredictedDowntime - want; diff < -time.Millisecond || diff > time.Millisecond {
		t.Errorf("predicted %s, want %s (%d pages at 1 ms more)", d.PredictedDowntime, want, pages)
	}
}

func TestDecideWithoutStartTimes(t *testing.T) {
	// No Started: the interval is the previous round's cycle (frozen +
	// memwrite + transfer = 2 s).
	r1 := Round{PagesWritten: 100000, FrozenTime: 500 * time.Millisecond, MemwriteTime: 500 * time.Millisecond,
		BytesSent: 100000 * 4096, TransferTime: time.Second}
	r2 := Round{PagesWritten: 20000, BytesSent: 20000 * 4096, TransferTime: 200 * time.Millisecond}
	if d := Decide([]Round{r1, r2}, Options{}); d.DirtyRate != 10000 {
		t.Errorf("dirty rate %f, want 10000 pages/s", d.DirtyRate)
	}
	// No interval at all: an infinite rate, bounded by the memory seen.
	d := Decide([]Round{{PagesWritten: 100}, {PagesWritten: 50, BytesSent: 50 * 4096, TransferTime: time.Second}}, Options{})
	if d.RemainingBytes != 100*DefaultPageSize {
		t.Errorf("remaining %d B, want all 100 pages seen", d.RemainingBytes)
	}
}

func TestAutoMode(t *testing.T) {
	none := NodeFeatures{}
	lazy := NodeFeatures{LazyPages: true}
	dirty := NodeFeatures{MemDirtyTrack: true}
	small := Prediction{MemoryBytes: 8 * mib, WorkingSetBytes: mib, Bandwidth: 100 * mib} // 80 ms of pages
	large := Prediction{MemoryBytes: 1 << 30, WorkingSetBytes: mib, Bandwidth: 100 * mib} // 10 s of pages
	for _, tc := range []struct {
		name string
		f    Features
		p    Prediction
		mode string
		why  string
	}{
		{"soft-dirty on the source", Features{Source: dirty, Dest: none}, large, ModePreCopy, "soft-dirty"},
		{"soft-dirty on both", Features{Source: dirty, Dest: dirty}, small, ModePreCopy, "soft-dirty"},
		{"soft-dirty on the destination only", Features{Source: lazy, Dest: NodeFeatures{MemDirtyTrack: true, LazyPages: true}}, large, ModePostCopy, "post-copy predicted"},
		{"stop-and-copy fits", Features{Source: lazy, Dest: lazy}, small, ModeStopCopy, "within the 300ms target"},
		{"stop-and-copy too slow, uffd on both", Features{Source: lazy, Dest: lazy}, large, ModePostCopy, "post-copy predicted 160ms"},
		{"stop-and-copy too slow, no uffd on the destination", Features{Source: lazy, Dest: none}, large, ModeStopCopy, "unavailable on the destination"},
		{"stop-and-copy too slow, no uffd on the source", Features{Source: none, Dest: lazy}, large, ModeStopCopy, "unavailable on the source"},
		{"stop-and-copy too slow, no uffd at all", Features{}, large, ModeStopCopy, "unavailable on either end"},
		{"tighter target", Features{Source: lazy, Dest: lazy}, Prediction{MemoryBytes: 8 * mib, Bandwidth: 100 * mib, DowntimeTarget: 200 * time.Millisecond}, ModePostCopy, "over the 200ms target"},
		{"no bandwidth measured", Features{Source: lazy, Dest: lazy}, Prediction{MemoryBytes: 1 << 30}, ModeStopCopy, "no bandwidth"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mode, why := AutoMode(tc.f, tc.p)
			if mode != tc.mode || !strings.Contains(why, tc.why) {
				t.Errorf("AutoMode = %s (%s), want %s (…%s…)", mode, why, tc.mode, tc.why)
			}
		})
	}
	if got, want := small.StopCopyDowntime(), DefaultFixedCost+80*time.Millisecond; got != want {
		t.Errorf("StopCopyDowntime = %s, want %s", got, want)
	}
	if got, want := large.PostCopyDowntime(), DefaultFixedCost+10*time.Millisecond; got != want {
		t.Errorf("PostCopyDowntime = %s, want %s", got, want)
	}
}
