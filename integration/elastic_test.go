package integration

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func cgroupInt(t testing.TB, hierarchy, cg, file string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", hierarchy, cg, file))
	if err != nil {
		t.Fatalf("read %s/%s: %v", cg, file, err)
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return math.MaxInt64
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("%s/%s: %q", cg, file, b)
	}
	return v
}

// memLimit is the memory limit in force: v1 memory.limit_in_bytes, v2
// memory.high (where reclaim and throttling start; memory.max follows it
// down only as far as usage allows).
func memLimit(t testing.TB, cg string) int64 {
	t.Helper()
	if cgroupV2() {
		return cgroupInt(t, "", cg, "memory.high")
	}
	return cgroupInt(t, "memory", cg, "memory.limit_in_bytes")
}

// memMax is the hard limit: v1 memory.limit_in_bytes, v2 memory.max.
func memMax(t testing.TB, cg string) int64 {
	t.Helper()
	if cgroupV2() {
		return cgroupInt(t, "", cg, "memory.max")
	}
	return cgroupInt(t, "memory", cg, "memory.limit_in_bytes")
}

// memPeak is the most memory the cgroup was charged.
func memPeak(t testing.TB, cg string) int64 {
	t.Helper()
	if cgroupV2() {
		return cgroupInt(t, "", cg, "memory.peak")
	}
	return cgroupInt(t, "memory", cg, "memory.max_usage_in_bytes")
}

type nodeView struct {
	Memory struct {
		State       string  `json:"state"`
		Allocatable float64 `json:"allocatable"`
		Guaranteed  float64 `json:"guaranteed"`
	} `json:"memory"`
	CPU struct {
		State string `json:"state"`
	} `json:"cpu"`
	Scarcest string `json:"scarcest"`
}

func (d *daemon) node() nodeView {
	d.t.Helper()
	var n nodeView
	if err := json.Unmarshal([]byte(d.mustCtl("node", "-o", "json")), &n); err != nil {
		d.t.Fatal(err)
	}
	return n
}

// waitEvent waits for an event of type typ about resource with a seq above
// after and returns it. (This machine is shared: CPU may harden too.)
func (d *daemon) waitEvent(typ, resource string, after uint64, within time.Duration) (event, time.Time) {
	d.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		out := d.mustCtl("events", "--follow=false", "-o", "json", "--type", typ)
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			var e struct {
				event
				Time string `json:"time"`
			}
			if l != "" && json.Unmarshal([]byte(l), &e) == nil && e.Seq > after && e.Attributes["resource"] == resource {
				at, _ := time.Parse(time.RFC3339Nano, e.Time)
				return e.event, at
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.t.Fatalf("no %s event within %s", typ, within)
	return event{}, time.Time{}
}

// TestElasticHardenAndRelax runs the elastic story on real containers and
// real cgroups (v1 here, v2 in the VM tier), against ferry's own
// accounting: a node of 512 MiB with 128 MiB reserved (384 MiB
// allocatable), so a bounded hog of file pages makes memory scarce without
// touching the host.
//
//	(a) while calm, a container uses more than its guarantee;
//	(d) a container whose guarantee would oversell the node is refused;
//	(b) the hog makes memory scarce: within 1 s of the transition every
//	    container's memory limit (read back from the kernel: v1
//	    memory.limit_in_bytes, v2 memory.high, then memory.max as usage
//	    allows) is its guarantee, and the container within its guarantee
//	    lives on;
//	(e) ferryd killed -9 and restarted while hardened rebuilds the state;
//	(c) the pressure passes (the hog drops its file; on v2, where it is on
//	    tmpfs, the hog is removed) and the ceilings come back after the
//	    relax window.
func TestElasticHardenAndRelax(t *testing.T) {
	requireHost(t)
	const mi = 1 << 20
	d := newDaemon(t, "a", "--capacity-memory", "512M", "--reserve-memory", "128M", "--capacity-cpu", "2", "--reserve-cpu", "0.1",
		"--pressure-source", "parent", "--relax-after-memory", "3s", "--relax-after-cpu", "3s")
	d.start()

	// (a) Calm: "calm" bursts to ~100 MiB of file pages above its 32 MiB
	// guarantee. CPU guarantees, so that a CPU transition (this machine is
	// shared and its load shows in the parent's PSI) clamps them to half a
	// core, not to the floor a container without a guarantee gets.
	d.mustCtl("run", "calm", "--mem-guarantee", "32M", "--mem-limit", "256M", "--cpu-guarantee", "0.5", "--cpu-limit", "1", "--",
		"sh", "-c", "dd if=/dev/zero of=/f bs=1M count=100 2>/dev/null; cat /f >/dev/null; cat /f >/dev/null; rm /f; echo ready; sleep 1000")
	calm := d.inspect("calm")
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(d.mustCtl("logs", "calm"), "ready") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if peak := memPeak(t, calm.Cgroup); peak <= 32*mi {
		t.Fatalf("(a) calm peaked at %d bytes, not above its 32 MiB guarantee", peak)
	}
	if lim := memMax(t, calm.Cgroup); lim != 256*mi {
		t.Fatalf("(a) calm's limit %d while the node is calm, want its ceiling %d", lim, 256*mi)
	}
	if n := d.node(); n.Memory.State != "relaxed" {
		t.Fatalf("(a) node memory %s while calm", n.Memory.State)
	}

	// (d) Oversell: 384 MiB allocatable, 32 MiB guaranteed; 360 MiB more is refused.
	_, errOut, code := d.ctl("run", "greedy", "--mem-guarantee", "360M", "--", "sleep", "1000")
	if code == 0 || grpcCode(errOut) != "ResourceExhausted" || !strings.Contains(errOut, "memory: asked 360Mi") || !strings.Contains(errOut, "free") {
		t.Fatalf("(d) oversell: exit %d %q", code, errOut)
	}
	d.assertNoTrace(t, "greedy")

	// (b) The hog: 400 MiB of file pages, read twice so they are active
	// (working set); it drops the file 15 s later (on the VM tier's tmpfs
	// the pages could not be reclaimed otherwise).
	before, _ := d.waitEventNone()
	d.mustCtl("run", "hog", "--mem-guarantee", "32M", "--mem-limit", "512M", "--cpu-guarantee", "0.5", "--cpu-limit", "1", "--",
		"sh", "-c", "dd if=/dev/zero of=/big bs=1M count=400 2>/dev/null; cat /big >/dev/null; cat /big >/dev/null; echo hogged; sleep 15; rm /big; echo dropped; sleep 1000")
	hog := d.inspect("hog")
	_, hardenedAt := d.waitEvent("node.hardened", "memory", before, 120*time.Second)
	clamped := false
	for time.Since(hardenedAt) < time.Second {
		if memLimit(t, calm.Cgroup) == 32*mi && memLimit(t, hog.Cgroup) == 32*mi {
			clamped = true
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !clamped {
		t.Fatalf("(b) limits not at the guarantees within 1 s of hardening: calm %d hog %d (event at %s, now %s)",
			memLimit(t, calm.Cgroup), memLimit(t, hog.Cgroup), hardenedAt.Format(time.RFC3339Nano), time.Now().UTC().Format(time.RFC3339Nano))
	}
	if c := d.inspect("calm"); c.State != "running" || !pidAlive(calm.Pid) {
		t.Fatalf("(b) the container within its guarantee was hurt: %s", c.State)
	}
	if n := d.node(); n.Memory.State != "hardened" {
		t.Fatalf("(b) node memory %s after the transition", n.Memory.State)
	}
	var eff struct {
		Eff struct {
			Mem int64 `json:"memory_bytes"`
		} `json:"effective_ceiling"`
	}
	_ = json.Unmarshal([]byte(d.mustCtl("inspect", "hog")), &eff)
	if eff.Eff.Mem != 32*mi {
		t.Errorf("(b) inspect effective_ceiling %d, want the guarantee", eff.Eff.Mem)
	}

	// (e) ferryd dies while hardened; the restarted one finds the node hardened.
	d.kill9()
	d.start()
	if n := d.node(); n.Memory.State != "hardened" {
		t.Errorf("(e) after restart node memory is %s, want hardened (rebuilt from the kernel's limits)", n.Memory.State)
	}
	if hl := memLimit(t, hog.Cgroup); hl != 32*mi {
		t.Errorf("(e) hog's limit %d after restart, want its guarantee", hl)
	}

	// (c) The pressure goes, and after the 3 s relax window the ceilings
	// come back. Here the clamp reclaims the hog's page cache, and the hog
	// drops its file. On the VM tier the file is on tmpfs, whose pages no
	// clamp can reclaim (no swap): the hog, held at memory.high, is
	// throttled too hard to drop it, so the test removes the hog.
	hogGone := cgroupV2()
	if hogGone {
		d.mustCtl("rm", "-f", "hog")
	}
	_, _ = d.waitEvent("node.relaxed", "memory", 0, 120*time.Second)
	deadline = time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if memMax(t, calm.Cgroup) == 256*mi && memLimit(t, calm.Cgroup) == 256*mi &&
			(hogGone || memMax(t, hog.Cgroup) == 512*mi && memLimit(t, hog.Cgroup) == 512*mi) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if cl := memMax(t, calm.Cgroup); cl != 256*mi {
		t.Errorf("(c) after relaxing: calm %d, want 256Mi", cl)
	}
	if !hogGone {
		if hl := memMax(t, hog.Cgroup); hl != 512*mi {
			t.Errorf("(c) after relaxing: hog %d, want 512Mi", hl)
		}
	}
	if c := d.inspect("calm"); c.State != "running" {
		t.Errorf("calm %s at the end", c.State)
	}
	d.mustCtl("rm", "-f", "calm")
	if !hogGone {
		d.mustCtl("rm", "-f", "hog")
	}
	d.assertNoTrace(t, "calm")
	d.assertNoTrace(t, "hog")
}

// waitEventNone returns the highest event seq so far.
func (d *daemon) waitEventNone() (uint64, error) {
	out := d.mustCtl("events", "--follow=false", "-o", "json")
	var last uint64
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var e event
		if json.Unmarshal([]byte(l), &e) == nil && e.Seq > last {
			last = e.Seq
		}
	}
	return last, nil
}
