package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func cgroupInt(t *testing.T, hierarchy, cg, file string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", hierarchy, cg, file))
	if err != nil {
		t.Fatalf("read %s/%s: %v", cg, file, err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatalf("%s/%s: %q", cg, file, b)
	}
	return v
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
// real v1 cgroups, against ferry's own accounting: a node of 1 GiB with
// 256 MiB reserved (768 MiB allocatable), so a bounded hog of page cache
// makes memory scarce without touching the host.
//
//	(a) while calm, a container uses more than its guarantee;
//	(d) a container whose guarantee would oversell the node is refused;
//	(b) the hog makes memory scarce: within 1 s of the transition every
//	    container's memory limit (read back from the kernel) is its
//	    guarantee, and the container within its guarantee lives on;
//	(e) ferryd killed -9 and restarted while hardened rebuilds the state;
//	(c) the pressure passes and the ceilings come back after the relax window.
func TestElasticHardenAndRelax(t *testing.T) {
	requireHost(t)
	requireV1(t)
	const mi = 1 << 20
	d := newDaemon(t, "a", "--capacity-memory", "1G", "--reserve-memory", "256M", "--capacity-cpu", "2", "--reserve-cpu", "0.1",
		"--pressure-source", "parent", "--relax-after-memory", "3s", "--relax-after-cpu", "3s")
	d.start()

	// (a) Calm: "calm" bursts to ~150 MiB of page cache above its 64 MiB guarantee.
	// CPU guarantees, so that a CPU transition (this machine is shared and
	// its load shows in the parent's PSI) clamps them to half a core, not
	// to the floor a container without a guarantee gets.
	d.mustCtl("run", "calm", "--mem-guarantee", "64M", "--mem-limit", "512M", "--cpu-guarantee", "0.5", "--cpu-limit", "1", "--",
		"sh", "-c", "dd if=/dev/zero of=/f bs=1M count=150 2>/dev/null; cat /f >/dev/null; cat /f >/dev/null; rm /f; echo ready; sleep 1000")
	calm := d.inspect("calm")
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(d.mustCtl("logs", "calm"), "ready") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	peak := cgroupInt(t, "memory", calm.Cgroup, "memory.max_usage_in_bytes")
	if peak <= 64*mi {
		t.Fatalf("(a) calm peaked at %d bytes, not above its 64 MiB guarantee", peak)
	}
	if lim := cgroupInt(t, "memory", calm.Cgroup, "memory.limit_in_bytes"); lim != 512*mi {
		t.Fatalf("(a) calm's limit %d while the node is calm, want its ceiling %d", lim, 512*mi)
	}
	if n := d.node(); n.Memory.State != "relaxed" {
		t.Fatalf("(a) node memory %s while calm", n.Memory.State)
	}

	// (d) Oversell: 768 MiB allocatable, 64 MiB guaranteed; 720 MiB more is refused.
	_, errOut, code := d.ctl("run", "greedy", "--mem-guarantee", "720M", "--", "sleep", "1000")
	if code == 0 || grpcCode(errOut) != "ResourceExhausted" || !strings.Contains(errOut, "memory: asked 720Mi") || !strings.Contains(errOut, "free") {
		t.Fatalf("(d) oversell: exit %d %q", code, errOut)
	}
	d.assertNoTrace(t, "greedy")

	// (b) The hog: 800 MiB of page cache, read twice so it is active (working set).
	before, _ := d.waitEventNone()
	d.mustCtl("run", "hog", "--mem-guarantee", "64M", "--mem-limit", "1G", "--cpu-guarantee", "0.5", "--cpu-limit", "1", "--",
		"sh", "-c", "dd if=/dev/zero of=/big bs=1M count=800 2>/dev/null; cat /big >/dev/null; cat /big >/dev/null; echo hogged; sleep 1000")
	hog := d.inspect("hog")
	_, hardenedAt := d.waitEvent("node.hardened", "memory", before, 60*time.Second)
	clamped := false
	for time.Since(hardenedAt) < time.Second {
		cl := cgroupInt(t, "memory", calm.Cgroup, "memory.limit_in_bytes")
		hl := cgroupInt(t, "memory", hog.Cgroup, "memory.limit_in_bytes")
		if cl == 64*mi && hl == 64*mi {
			clamped = true
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !clamped {
		t.Fatalf("(b) limits not at the guarantees within 1 s of hardening: calm %d hog %d (event at %s, now %s)",
			cgroupInt(t, "memory", calm.Cgroup, "memory.limit_in_bytes"), cgroupInt(t, "memory", hog.Cgroup, "memory.limit_in_bytes"),
			hardenedAt.Format(time.RFC3339Nano), time.Now().UTC().Format(time.RFC3339Nano))
	}
	if c := d.inspect("calm"); c.State != "running" || !pidAlive(calm.Pid) {
		t.Fatalf("(b) the container within its guarantee was hurt: %s", c.State)
	}
	if oom := cgroupInt(t, "memory", hog.Cgroup, "memory.failcnt"); oom < 0 {
		t.Fatal("unreachable")
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
	if eff.Eff.Mem != 64*mi {
		t.Errorf("(b) inspect effective_ceiling %d, want the guarantee", eff.Eff.Mem)
	}

	// (e) ferryd dies while hardened; the restarted one finds the node hardened.
	lastSeq, _ := d.waitEventNone()
	d.kill9()
	d.start()
	if n := d.node(); n.Memory.State != "hardened" {
		t.Errorf("(e) after restart node memory is %s, want hardened (rebuilt from the kernel's limits)", n.Memory.State)
	}
	if hl := cgroupInt(t, "memory", hog.Cgroup, "memory.limit_in_bytes"); hl != 64*mi {
		t.Errorf("(e) hog's limit %d after restart, want its guarantee", hl)
	}
	_ = lastSeq

	// (c) The page cache was reclaimed by the clamp: pressure is gone, and
	// after the 3 s relax window the ceilings come back.
	_, _ = d.waitEvent("node.relaxed", "memory", 0, 60*time.Second)
	deadline = time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if cgroupInt(t, "memory", calm.Cgroup, "memory.limit_in_bytes") == 512*mi && cgroupInt(t, "memory", hog.Cgroup, "memory.limit_in_bytes") == 1024*mi {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if cl, hl := cgroupInt(t, "memory", calm.Cgroup, "memory.limit_in_bytes"), cgroupInt(t, "memory", hog.Cgroup, "memory.limit_in_bytes"); cl != 512*mi || hl != 1024*mi {
		t.Errorf("(c) after relaxing: calm %d hog %d, want 512Mi and 1Gi", cl, hl)
	}
	if c := d.inspect("calm"); c.State != "running" {
		t.Errorf("calm %s at the end", c.State)
	}
	d.mustCtl("rm", "-f", "calm", "hog")
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
