package cgroup

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const mi = int64(1) << 20

func TestV1ApplyWritesTheRightFiles(t *testing.T) {
	fs := newFakeV1(t)
	fs.addContainer("/ferry/web")
	d := fs.driver()
	l := Limits{Guarantee: Amount{CPU: 0.5, Memory: 64 * mi}, Ceiling: Amount{CPU: 1.5, Memory: 256 * mi}, PidsMax: 100}
	a, err := d.Apply("/ferry/web", l)
	if err != nil {
		t.Fatal(err)
	}
	if a != (Applied{MemoryLimit: 256 * mi}) {
		t.Errorf("applied %+v", a)
	}
	for _, c := range []struct{ hier, file, want string }{
		{"cpu", "cpu.shares", "512"},
		{"cpu", "cpu.cfs_period_us", "100000"},
		{"cpu", "cpu.cfs_quota_us", "150000"},
		{"memory", "memory.soft_limit_in_bytes", "67108864"},
		{"memory", "memory.limit_in_bytes", "268435456"},
		{"memory", "memory.memsw.limit_in_bytes", v1Unlimited}, // unlimited memsw is left alone
		{"pids", "pids.max", "100"},
	} {
		if got := fs.get(c.hier, "/ferry/web", c.file); got != c.want {
			t.Errorf("%s/%s = %q, want %q", c.hier, c.file, got, c.want)
		}
	}
	// The soft limit (guarantee) is written before the hard limit.
	w := fs.writeLog()
	if slices.Index(w, "memory/ferry/web/memory.soft_limit_in_bytes=67108864") > slices.Index(w, "memory/ferry/web/memory.limit_in_bytes=268435456") {
		t.Errorf("hard limit before soft limit: %v", w)
	}

	// Hardened: ceiling := guarantee.
	l.Ceiling = l.Guarantee
	fs.setUsage("/ferry/web", 100*mi, 10*mi)
	if a, err = d.Apply("/ferry/web", l); err != nil || a != (Applied{MemoryLimit: 64 * mi}) {
		t.Fatalf("harden: %+v %v", a, err)
	}
	if q, m := fs.get("cpu", "/ferry/web", "cpu.cfs_quota_us"), fs.getInt("memory", "/ferry/web", "memory.limit_in_bytes"); q != "50000" || m != 64*mi {
		t.Errorf("hardened quota %s limit %d", q, m)
	}
	// Unlimited ceiling, no guarantee: -1, minimum weight.
	if _, err := d.Apply("/ferry/web", Limits{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ hier, file, want string }{
		{"cpu", "cpu.shares", "2"}, {"cpu", "cpu.cfs_quota_us", "-1"},
		{"memory", "memory.limit_in_bytes", "-1"}, {"memory", "memory.soft_limit_in_bytes", "0"}, {"pids", "pids.max", "max"},
	} {
		if got := fs.get(c.hier, "/ferry/web", c.file); got != c.want {
			t.Errorf("unlimited: %s/%s = %q, want %q", c.hier, c.file, got, c.want)
		}
	}
}

func TestV2ApplyWritesTheRightFiles(t *testing.T) {
	fs := newFakeV2(t)
	fs.addContainer("/ferry/web")
	d := fs.driver()
	l := Limits{Guarantee: Amount{CPU: 0.5, Memory: 64 * mi}, Ceiling: Amount{CPU: 1.5, Memory: 256 * mi}, PidsMax: 100}
	if _, err := d.Apply("/ferry/web", l); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ file, want string }{
		{"cpu.weight", "20"}, // 512 shares → 1 + 510·9999/262142
		{"cpu.max", "150000 100000"},
		{"memory.min", "67108864"},
		{"memory.high", "268435456"},
		{"memory.max", "268435456"},
		{"pids.max", "100"},
	} {
		if got := fs.get("", "/ferry/web", c.file); got != c.want {
			t.Errorf("%s = %q, want %q", c.file, got, c.want)
		}
	}
	// Hardening lowers memory.high before memory.max, and never OOM-kills.
	fs.setUsage("/ferry/web", 200*mi, 150*mi) // 150Mi cannot be reclaimed
	l.Ceiling = l.Guarantee
	a, err := d.Apply("/ferry/web", l)
	if err != nil {
		t.Fatal(err)
	}
	if !a.MemoryPending || a.MemoryLimit != 154*mi {
		t.Errorf("applied %+v, want pending, held at usage 150Mi + 4Mi", a)
	}
	if fs.oomKills() != 0 {
		t.Fatalf("memory.max written below what the kernel could reclaim: OOM kill")
	}
	if h, m := fs.get("", "/ferry/web", "memory.high"), fs.getInt("", "/ferry/web", "memory.max"); h != "67108864" || m != 154*mi {
		t.Errorf("memory.high %s memory.max %d", h, m)
	}
	w := fs.writeLog()
	if slices.Index(w, "ferry/web/memory.high=67108864") > slices.Index(w, "ferry/web/memory.max=161480704") {
		t.Errorf("memory.max before memory.high: %v", w)
	}
	// The container frees memory: the next Apply finishes the step-down.
	fs.setUsage("/ferry/web", 150*mi, 20*mi)
	if a, err = d.Apply("/ferry/web", l); err != nil || a != (Applied{MemoryLimit: 64 * mi}) {
		t.Fatalf("second step: %+v %v", a, err)
	}
	if m := fs.getInt("", "/ferry/web", "memory.max"); m != 64*mi || fs.oomKills() != 0 {
		t.Errorf("memory.max %d, ooms %d", m, fs.oomKills())
	}
	// Relaxing raises memory.max before memory.high.
	l.Ceiling = Amount{CPU: 1.5, Memory: 256 * mi}
	if _, err := d.Apply("/ferry/web", l); err != nil {
		t.Fatal(err)
	}
	w = fs.writeLog()
	w = w[slices.Index(w, "ferry/web/memory.max=67108864"):] // the relax only
	maxAt, highAt := slices.Index(w, "ferry/web/memory.max=268435456"), slices.Index(w, "ferry/web/memory.high=268435456")
	if maxAt < 0 || highAt < maxAt {
		t.Errorf("relaxing: memory.max must be raised before memory.high: %v", w)
	}
	if fs.get("", "/ferry/web", "memory.high") != "268435456" || fs.get("", "/ferry/web", "memory.max") != "268435456" {
		t.Errorf("relaxed memory.high %s memory.max %s", fs.get("", "/ferry/web", "memory.high"), fs.get("", "/ferry/web", "memory.max"))
	}
	// The parent carries the sum of the guarantees as memory.min.
	fs.put("ferry", "memory.min", "0")
	if err := d.ApplyParent("/ferry", Amount{Memory: 3 * 64 * mi}); err != nil {
		t.Fatal(err)
	}
	if got := fs.getInt("", "/ferry", "memory.min"); got != 192*mi {
		t.Errorf("parent memory.min %d", got)
	}
}

func TestV1StepDownOnEBUSYNeverBelowGuarantee(t *testing.T) {
	fs := newFakeV1(t)
	fs.addContainer("/c")
	d := fs.driver()
	relaxed := Limits{Guarantee: Amount{Memory: 64 * mi}, Ceiling: Amount{Memory: 512 * mi}}
	if _, err := d.Apply("/c", relaxed); err != nil {
		t.Fatal(err)
	}
	// 300Mi used, of which the kernel can reclaim only down to 200Mi (anonymous, no swap).
	fs.setUsage("/c", 300*mi, 200*mi)
	hard := relaxed
	hard.Ceiling.Memory = 64 * mi
	a, err := d.Apply("/c", hard)
	if err != nil {
		t.Fatalf("EBUSY must not surface as an error: %v", err)
	}
	if !a.MemoryPending || a.MemoryLimit != 204*mi {
		t.Fatalf("applied %+v, want pending and held at 200Mi + 4Mi", a)
	}
	if got := fs.getInt("memory", "/c", "memory.limit_in_bytes"); got != 204*mi {
		t.Errorf("limit %d", got)
	}
	// Retrying while nothing more can be reclaimed keeps the hold.
	if a, err = d.Apply("/c", hard); err != nil || !a.MemoryPending || a.MemoryLimit != 204*mi {
		t.Errorf("retry: %+v %v", a, err)
	}
	// The floor is below the guarantee: the hold never goes under the guarantee.
	fs.setUsage("/c", 204*mi, 40*mi)
	if a, err = d.Apply("/c", hard); err != nil || a != (Applied{MemoryLimit: 64 * mi}) {
		t.Errorf("final step: %+v %v", a, err)
	}
	// A hard limit below the guarantee is refused outright.
	bad := hard
	bad.Ceiling.Memory = 32 * mi
	if _, err := d.Apply("/c", bad); !errors.Is(err, ErrInvalid) {
		t.Errorf("ceiling below guarantee: %v", err)
	}
	if got := fs.getInt("memory", "/c", "memory.limit_in_bytes"); got != 64*mi {
		t.Errorf("limit after refused apply %d", got)
	}
}

func TestV1MemswTiedToTheLimit(t *testing.T) {
	fs := newFakeV1(t)
	fs.addContainer("/c")
	fs.set("memory", "/c", "memory.limit_in_bytes", "134217728")
	fs.set("memory", "/c", "memory.memsw.limit_in_bytes", "134217728")
	d := fs.driver()
	l := Limits{Guarantee: Amount{Memory: 64 * mi}, Ceiling: Amount{Memory: 256 * mi}}
	if _, err := d.Apply("/c", l); err != nil {
		t.Fatal(err)
	}
	w := fs.writeLog()
	sw, lim := slices.Index(w, "memory/c/memory.memsw.limit_in_bytes=268435456"), slices.Index(w, "memory/c/memory.limit_in_bytes=268435456")
	if sw < 0 || lim < 0 || sw > lim {
		t.Errorf("raising: memsw must go first: %v", w)
	}
	l.Ceiling.Memory = 64 * mi
	if _, err := d.Apply("/c", l); err != nil {
		t.Fatal(err)
	}
	if fs.getInt("memory", "/c", "memory.memsw.limit_in_bytes") != 64*mi {
		t.Errorf("lowering: memsw not kept tied: %s", fs.get("memory", "/c", "memory.memsw.limit_in_bytes"))
	}
}

func TestV1CoMountedCPUAndNoPids(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"cpu,cpuacct/c", "memory/c"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("cpu,cpuacct", filepath.Join(root, "cpuacct")); err != nil {
		t.Fatal(err)
	}
	d, err := newV1Driver(root, plainFiles{})
	if err != nil {
		t.Fatal(err)
	}
	if d.dirs["cpu"] != filepath.Join(root, "cpu,cpuacct") || d.dirs["cpuacct"] != filepath.Join(root, "cpuacct") || d.dirs["pids"] != "" {
		t.Errorf("dirs %v", d.dirs)
	}
	if _, err := newV1Driver(t.TempDir(), plainFiles{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("no hierarchies: %v", err)
	}
}

func TestV1Stats(t *testing.T) {
	fs := newFakeV1(t)
	fs.addContainer("/c")
	fs.set("memory", "/c", "memory.usage_in_bytes", "209715200")
	fs.set("memory", "/c", "memory.stat", "cache 100\ntotal_inactive_file 52428800\ntotal_rss 5\n")
	fs.set("memory", "/c", "memory.limit_in_bytes", "268435456")
	fs.set("memory", "/c", "memory.failcnt", "7")
	fs.set("memory", "/c", "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
	fs.set("cpuacct", "/c", "cpuacct.usage", "1500000000")
	fs.set("cpu", "/c", "cpu.stat", "nr_periods 10\nnr_throttled 4\nthrottled_time 2000000\n")
	fs.set("cpu", "/c", "cpu.cfs_quota_us", "50000")
	fs.set("unified", "/c", "memory.pressure", "some avg10=11.50 avg60=6.00 avg300=1.00 total=123456\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=99\n")
	s, err := fs.driver().Stats("/c")
	if err != nil {
		t.Fatal(err)
	}
	want := Stats{MemoryUsage: 200 * mi, MemoryWorkingSet: 150 * mi, MemoryLimit: 256 * mi, MemoryLimitHits: 7, OOMKills: 2,
		CPUUsage: 1500 * time.Millisecond, CPUQuota: 0.5, ThrottledPeriods: 4, ThrottledTime: 2 * time.Millisecond,
		CPUPressure:    Pressure{Present: true},
		MemoryPressure: Pressure{Present: true, Some: PSILine{Avg10: 11.5, Avg60: 6, Avg300: 1, Total: 123456 * time.Microsecond}, Full: PSILine{Avg10: 1, Total: 99 * time.Microsecond}}}
	if s != want {
		t.Errorf("stats\n got %+v\nwant %+v", s, want)
	}
	// No unified twin (pure v1): no PSI, no error.
	if err := os.RemoveAll(filepath.Join(fs.root, "unified", "c")); err != nil {
		t.Fatal(err)
	}
	if s, err = fs.driver().Stats("/c"); err != nil || s.MemoryPressure.Present {
		t.Errorf("without PSI: %+v %v", s.MemoryPressure, err)
	}
	// A removed container is an error that says which file.
	if _, err := fs.driver().Stats("/gone"); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "gone") {
		t.Errorf("gone: %v", err)
	}
}

func TestV2Stats(t *testing.T) {
	fs := newFakeV2(t)
	fs.addContainer("/c")
	fs.set("", "/c", "memory.current", "209715200")
	fs.set("", "/c", "memory.stat", "anon 1\ninactive_file 52428800\n")
	fs.set("", "/c", "memory.max", "max")
	fs.set("", "/c", "memory.events", "low 0\nhigh 3\nmax 4\noom 1\noom_kill 1\n")
	fs.set("", "/c", "cpu.stat", "usage_usec 1500000\nnr_periods 9\nnr_throttled 2\nthrottled_usec 300\n")
	fs.set("", "/c", "cpu.max", "25000 100000")
	s, err := fs.driver().Stats("/c")
	if err != nil {
		t.Fatal(err)
	}
	if s.MemoryWorkingSet != 150*mi || s.MemoryLimit != 0 || s.MemoryLimitHits != 7 || s.OOMKills != 1 ||
		s.CPUUsage != 1500*time.Millisecond || s.CPUQuota != 0.25 || s.ThrottledPeriods != 2 || s.ThrottledTime != 300*time.Microsecond || !s.CPUPressure.Present {
		t.Errorf("stats %+v", s)
	}
}

func TestWeightForShares(t *testing.T) {
	for shares, want := range map[uint64]uint64{0: 0, 1: 1, 2: 1, 1024: 39, 2048: 79, 262144: 10000, 1 << 20: 10000} {
		if got := WeightForShares(shares); got != want {
			t.Errorf("WeightForShares(%d) = %d, want %d", shares, got, want)
		}
	}
	// Proportions survive: 1, 2 and 4 cores split a contended CPU 1:2:4 on v2 as on v1.
	w1, w2, w4 := WeightForShares(SharesForCores(1)), WeightForShares(SharesForCores(2)), WeightForShares(SharesForCores(4))
	for _, r := range []float64{float64(w2) / float64(w1), float64(w4) / float64(w2)} {
		if math.Abs(r-2) > 0.05 {
			t.Errorf("weights %d %d %d are not proportional", w1, w2, w4)
		}
	}
	if guaranteeShares(0) != 2 || guaranteeShares(1000) != maxShares {
		t.Errorf("guarantee shares: %d %d", guaranteeShares(0), guaranteeShares(1000))
	}
}

func TestNewDriverPicksTheMode(t *testing.T) {
	v1, v2 := newFakeV1(t), newFakeV2(t)
	if d, err := NewDriver(v1.root); err != nil || d.Version() != "v1" {
		t.Errorf("v1 root: %v %v", d, err)
	}
	if d, err := NewDriver(v2.root); err != nil || d.Version() != "v2" {
		t.Errorf("v2 root: %v %v", d, err)
	}
}

func TestParsePressure(t *testing.T) {
	p, err := parsePressure("some avg10=3.30 avg60=8.53 avg300=9.24 total=73049976\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
	if err != nil || !p.Present || p.Some.Avg10 != 3.3 || p.Some.Total != 73049976*time.Microsecond {
		t.Errorf("%+v %v", p, err)
	}
	// Host cpu pressure before 5.13 has no "full" line.
	if p, err = parsePressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=5"); err != nil || p.Some.Total != 5*time.Microsecond {
		t.Errorf("%+v %v", p, err)
	}
	for _, bad := range []string{"", "full avg10=0 total=1", "some avg10=x", "some total=-1", "some avg10"} {
		if _, err := parsePressure(bad); err == nil {
			t.Errorf("parsePressure(%q) accepted", bad)
		}
	}
	src := HostPressure(t.TempDir())
	if _, err := src.Read(Memory); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing source: %v", err)
	}
	for _, c := range []struct {
		scope, path string
		want        bool
	}{{"/", "/x", true}, {"/ferry", "/ferry/a", true}, {"/ferry", "/ferryx/a", false}, {"/ferry", "/ferry", true}, {"ferry", "/other", false}} {
		if got := CgroupPressure("/d", c.scope).covers(c.path); got != c.want {
			t.Errorf("scope %s covers %s = %v", c.scope, c.path, got)
		}
	}
}
