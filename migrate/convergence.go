package migrate

import (
	"fmt"
	"math"
	"time"
)

// Reasons a Decision gives. The first three continue the pre-copy, the
// others stop it and go to the final (frozen) dump.
const (
	ReasonNoRounds      = "no-rounds"      // continue: run the first pre-dump
	ReasonFirstRound    = "first-round"    // continue: one round says nothing about the dirty rate yet
	ReasonConverging    = "converging"     // continue: rounds shrink but the final dump would not fit yet
	ReasonFitsTarget    = "fits-target"    // stop: the predicted downtime fits the target
	ReasonNotConverging = "not-converging" // stop: the last round did not shrink by MinShrink
	ReasonRoundLimit    = "round-limit"    // stop: MaxRounds pre-dumps done
)

// Defaults for the zero fields of Options.
const (
	DefaultDowntimeTarget = 300 * time.Millisecond
	DefaultMaxRounds      = 8
	DefaultMinShrink      = 0.10
	// DefaultFixedCost is the part of the downtime that does not scale with
	// memory: freeze, dump of the non-memory state, restore on the peer,
	// network re-plumbing. Measured on the development machine: a tiny
	// container's checkpoint took about 220 ms (memory included) and its
	// restore 125-155 ms. Callers should pass a value measured on their
	// hosts (the previous migration's stats-restore, say).
	DefaultFixedCost = 150 * time.Millisecond
	// DefaultPageSize is the size of the pages CRIU counts.
	DefaultPageSize = 4096
)

// UnknownDowntime is the PredictedDowntime when there are pages left to
// move but neither a measured bandwidth nor a cap to predict with.
const UnknownDowntime = time.Duration(math.MaxInt64)

// Round is what ferry knows about one pre-dump round once its pages have
// reached the peer: CRIU's stats-dump for it (DumpStats.Round fills these)
// and ferry's own measurements.
type Round struct {
	// From CRIU's stats-dump of the pre-dump.
	PagesWritten       uint64        // pages this round had to write: dirty since the previous round (all present pages in round 1)
	PagesSkippedParent uint64        // pages left out because the previous round already had them
	FrozenTime         time.Duration // how long the tree stayed frozen
	MemdumpTime        time.Duration // collecting the pages while frozen
	MemwriteTime       time.Duration // writing them out after the thaw

	// ferry's own measurements.
	Started      time.Time     // when ferry started the pre-dump (the freeze began)
	BytesSent    int64         // bytes of this round that reached the peer
	TransferTime time.Duration // wall time of sending them
}

// cycle is how long a round kept the pre-copy busy after it started: the
// freeze, CRIU's write-out and ferry's transfer, taken one after the other.
// With a page server the write-out is the transfer, so this counts it twice;
// the error is on the side of a longer cycle, more dirty pages, a longer
// predicted downtime.
func (r Round) cycle() time.Duration { return r.FrozenTime + r.MemwriteTime + r.TransferTime }

// Options tunes Decide. Zero fields take the defaults above.
type Options struct {
	DowntimeTarget time.Duration // the freeze the migration aims at (default 300ms)
	MaxRounds      int           // pre-dump rounds at most (default 8)
	// MinShrink is the fraction by which each round must write fewer pages
	// than the one before it (default 0.10): round n must write at most
	// (1-MinShrink) × round n-1's pages, or the pre-copy stops as
	// not-converging. Round 1 is compared with nothing.
	MinShrink    float64
	BandwidthCap float64       // bytes/s the migration may use; 0 means no cap
	FixedCost    time.Duration // downtime that does not scale with memory (default DefaultFixedCost)
	PageSize     int64         // bytes per page (default 4096)
}

func (o Options) withDefaults() Options {
	if o.DowntimeTarget <= 0 {
		o.DowntimeTarget = DefaultDowntimeTarget
	}
	if o.MaxRounds <= 0 {
		o.MaxRounds = DefaultMaxRounds
	}
	if o.MinShrink <= 0 || o.MinShrink >= 1 {
		o.MinShrink = DefaultMinShrink
	}
	if o.BandwidthCap < 0 {
		o.BandwidthCap = 0
	}
	if o.FixedCost <= 0 {
		o.FixedCost = DefaultFixedCost
	}
	if o.PageSize <= 0 {
		o.PageSize = DefaultPageSize
	}
	return o
}

// Decision says whether to run another pre-dump round or go to the final
// dump, and the figures it was made from, for the migration's log and
// events.
type Decision struct {
	Stop   bool
	Reason string // one of the Reason constants
	Rounds int    // rounds the decision looked at

	// PredictedDowntime is what the final dump would cost if it ran now:
	// FixedCost + RemainingBytes × the per-page cost of CRIU's own dumping
	// + RemainingBytes / Bandwidth. UnknownDowntime when it cannot be
	// predicted.
	PredictedDowntime time.Duration
	RemainingBytes    int64   // bytes the final dump is predicted to write
	DirtyRate         float64 // pages dirtied per second (0 until two rounds ran)
	Bandwidth         float64 // bytes/s to the peer, measured and capped
}

func (d Decision) String() string {
	pd := "unknown"
	if d.PredictedDowntime != UnknownDowntime {
		pd = d.PredictedDowntime.Round(time.Millisecond).String()
	}
	return fmt.Sprintf("stop=%t reason=%s rounds=%d predicted-downtime=%s remaining=%dB dirty-rate=%.0fpages/s bandwidth=%.0fB/s",
		d.Stop, d.Reason, d.Rounds, pd, d.RemainingBytes, d.DirtyRate, d.Bandwidth)
}

// Decide applies the pre-copy round rule to the rounds done so far.
//
// From the rounds it estimates the dirty rate (pages the last round had to
// write over the time since the round before it started) and the bandwidth
// (all bytes sent over all transfer time, capped by BandwidthCap). The
// final dump would write the pages dirtied during the last round's cycle;
// after round 1, whose pages are all the memory there is, that is bounded by
// round 1's own pages. Then, in this order:
//
//   - the predicted downtime fits DowntimeTarget → stop, fits-target;
//   - from round 2 on, the last round did not write at least MinShrink
//     fewer pages than the one before → stop, not-converging;
//   - MaxRounds reached → stop, round-limit;
//   - otherwise run another round.
//
// Round 1 is never compared with a previous round: go-criu's phaul compares
// it with an empty record, sees it "grow" and always stops after one round.
func Decide(rounds []Round, opts Options) Decision {
	o := opts.withDefaults()
	n := len(rounds)
	d := Decision{Rounds: n}
	if n == 0 {
		d.Reason = ReasonNoRounds
		return d
	}
	last := rounds[len(rounds)-1]
	d.Bandwidth = bandwidth(rounds, o.BandwidthCap)

	var remainingPages float64
	if n == 1 {
		// Upper bound: the final dump cannot write more than all the
		// memory, which is what round 1 wrote.
		remainingPages = float64(last.PagesWritten)
	} else {
		d.DirtyRate = dirtyRate(rounds[n-2], last)
		remainingPages = d.DirtyRate * last.cycle().Seconds()
		// The NaN of an infinite rate (no interval measured) times a zero
		// cycle lands here too.
		if limit := float64(maxPresentPages(rounds)); !(remainingPages <= limit) {
			remainingPages = limit
		}
	}
	remainingPages = math.Ceil(remainingPages)
	d.RemainingBytes = int64(remainingPages) * o.PageSize
	d.PredictedDowntime = predictDowntime(o.FixedCost, remainingPages*dumpCostPerPage(rounds), d.RemainingBytes, d.Bandwidth)

	switch {
	case d.PredictedDowntime <= o.DowntimeTarget:
		d.Stop, d.Reason = true, ReasonFitsTarget
	case n >= 2 && float64(last.PagesWritten) > (1-o.MinShrink)*float64(rounds[n-2].PagesWritten):
		d.Stop, d.Reason = true, ReasonNotConverging
	case n >= o.MaxRounds:
		d.Stop, d.Reason = true, ReasonRoundLimit
	case n == 1:
		d.Reason = ReasonFirstRound
	default:
		d.Reason = ReasonConverging
	}
	return d
}

// dirtyRate is the pages cur had to write per second of the time since
// prev started. Without both start times it takes prev's cycle instead.
func dirtyRate(prev, cur Round) float64 {
	interval := cur.Started.Sub(prev.Started)
	if prev.Started.IsZero() || cur.Started.IsZero() || interval <= 0 {
		interval = prev.cycle()
	}
	if interval <= 0 {
		if cur.PagesWritten == 0 {
			return 0
		}
		return math.Inf(1)
	}
	return float64(cur.PagesWritten) / interval.Seconds()
}

// bandwidth is all bytes sent over all transfer time, so that a tiny last
// round (latency-bound) does not drag the estimate down, capped by limit.
func bandwidth(rounds []Round, limit float64) float64 {
	var bytes int64
	var t time.Duration
	for _, r := range rounds {
		if r.TransferTime > 0 && r.BytesSent > 0 {
			bytes += r.BytesSent
			t += r.TransferTime
		}
	}
	bw := 0.0
	if t > 0 {
		bw = float64(bytes) / t.Seconds()
	}
	if limit > 0 && (bw == 0 || bw > limit) {
		bw = limit
	}
	return bw
}

// dumpCostPerPage is the seconds CRIU spent per written page collecting
// (while frozen) and writing it out, over all rounds.
func dumpCostPerPage(rounds []Round) float64 {
	var pages uint64
	var t time.Duration
	for _, r := range rounds {
		pages += r.PagesWritten
		t += r.MemdumpTime + r.MemwriteTime
	}
	if pages == 0 {
		return 0
	}
	return t.Seconds() / float64(pages)
}

// maxPresentPages is the most pages any round saw (written + skipped): the
// dirty pages of a final dump cannot outnumber them by much.
func maxPresentPages(rounds []Round) uint64 {
	var m uint64
	for _, r := range rounds {
		if p := r.PagesWritten + r.PagesSkippedParent; p > m {
			m = p
		}
	}
	return m
}

func predictDowntime(fixed time.Duration, dumpSeconds float64, bytes int64, bw float64) time.Duration {
	if bytes == 0 {
		return fixed + seconds(dumpSeconds)
	}
	if bw <= 0 || math.IsInf(dumpSeconds, 0) {
		return UnknownDowntime
	}
	return fixed + seconds(dumpSeconds+float64(bytes)/bw)
}

// seconds converts s to a Duration, saturating instead of overflowing.
func seconds(s float64) time.Duration {
	if math.IsNaN(s) || s*float64(time.Second) >= float64(math.MaxInt64) {
		return UnknownDowntime
	}
	return time.Duration(s * float64(time.Second))
}

// Migration modes AutoMode chooses between.
const (
	ModePreCopy  = "precopy"  // pre-dump rounds while running, then a short final dump
	ModeStopCopy = "stopcopy" // no pre-dump: freeze, dump everything, copy, restore
	ModePostCopy = "postcopy" // freeze, dump all but the memory, restore, fetch pages on fault (userfaultfd)
)

// NodeFeatures is what one agent found at the handshake.
type NodeFeatures struct {
	// MemDirtyTrack: `criu check --feature mem_dirty_track` passes (the
	// kernel has soft-dirty), so CRIU can pre-dump here.
	MemDirtyTrack bool
	// LazyPages: `criu check --feature uffd-noncoop` passes and CRIU's page
	// pipes fit (CAP_SYS_RESOURCE, or fs.pipe-max-size ≥ 4 MiB): post-copy
	// can run here.
	LazyPages bool
}

// Features are both ends' NodeFeatures.
type Features struct {
	Source, Dest NodeFeatures
}

// Prediction holds what AutoMode predicts the downtimes from.
type Prediction struct {
	MemoryBytes     int64         // the container's memory CRIU would dump (resident anonymous + dirty file pages)
	WorkingSetBytes int64         // what a post-copy restore fetches before the container runs on (0: none counted)
	Bandwidth       float64       // bytes/s to the peer, already capped
	FixedCost       time.Duration // as in Options (default DefaultFixedCost)
	DowntimeTarget  time.Duration // as in Options (default 300ms)
}

// StopCopyDowntime is FixedCost + MemoryBytes/Bandwidth.
func (p Prediction) StopCopyDowntime() time.Duration {
	return predictDowntime(p.fixed(), 0, p.MemoryBytes, p.Bandwidth)
}

// PostCopyDowntime is FixedCost + WorkingSetBytes/Bandwidth.
func (p Prediction) PostCopyDowntime() time.Duration {
	return predictDowntime(p.fixed(), 0, p.WorkingSetBytes, p.Bandwidth)
}

func (p Prediction) fixed() time.Duration {
	if p.FixedCost <= 0 {
		return DefaultFixedCost
	}
	return p.FixedCost
}

func (p Prediction) target() time.Duration {
	if p.DowntimeTarget <= 0 {
		return DefaultDowntimeTarget
	}
	return p.DowntimeTarget
}

// AutoMode chooses the migration mode and says why, in words fit for the
// migration's event:
//
//   - precopy when the source can pre-dump (soft-dirty). Only the source
//     runs pre-dump; restoring a chain of pre-dumped images needs nothing
//     of the destination's kernel.
//   - otherwise stopcopy when its predicted downtime fits the target: it is
//     the mode with no window in which the container lives on two hosts;
//   - otherwise postcopy when both ends can run it (the destination handles
//     the faults, the source serves the pages);
//   - otherwise stopcopy, over the target, since it is all that is left.
//
// With no bandwidth to predict from (the agent probes the channel first;
// this is when the probe failed), stopcopy is kept: post-copy is only worth
// its risk (losing the source's pages loses the container) when it is
// known to be needed.
func AutoMode(f Features, p Prediction) (mode string, why string) {
	if f.Source.MemDirtyTrack {
		return ModePreCopy, "the source kernel tracks dirty memory (soft-dirty): pre-dump rounds while the container runs"
	}
	target := p.target()
	stop := p.StopCopyDowntime()
	if stop == UnknownDowntime {
		return ModeStopCopy, "no soft-dirty on the source, and no bandwidth measured to predict stop-and-copy's downtime with"
	}
	if stop <= target {
		return ModeStopCopy, fmt.Sprintf("no soft-dirty on the source; stop-and-copy predicted %s, within the %s target",
			stop.Round(time.Millisecond), target)
	}
	if f.Source.LazyPages && f.Dest.LazyPages {
		return ModePostCopy, fmt.Sprintf("no soft-dirty on the source; stop-and-copy predicted %s, over the %s target; post-copy predicted %s",
			stop.Round(time.Millisecond), target, p.PostCopyDowntime().Round(time.Millisecond))
	}
	missing := "on the source"
	switch {
	case !f.Source.LazyPages && !f.Dest.LazyPages:
		missing = "on either end"
	case !f.Dest.LazyPages:
		missing = "on the destination"
	}
	return ModeStopCopy, fmt.Sprintf("no soft-dirty on the source; stop-and-copy predicted %s, over the %s target, but post-copy (lazy pages) is unavailable %s",
		stop.Round(time.Millisecond), target, missing)
}
