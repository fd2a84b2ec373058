package sysctlguard

import (
	"context"
	"sort"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// BenchmarkGuardOverhead measures what the guard costs a container's own,
// allowed sysctl traffic: a helper in a private netns does 100k reads and then
// 100k writes (the value it already holds) of net.ipv4.ip_local_port_range
// through one descriptor, and 100k rounds of open, read, close (what
// sysctl(8) does), from
//
//	bare:      a cgroup without the program, none of ours attached anywhere;
//	guarded:   the cgroup the guard is attached to;
//	null:      a cgroup with a program that only returns 1, which separates
//	           the kernel's own cost of the hook from the guard program's;
//	bystander: another cgroup while the guard is attached elsewhere (the
//	           kernel's sysctl hook is then switched on for the whole host).
//
// Each b.N iteration runs all four, in an order rotated per iteration (use
// -benchtime=9x or so); the metrics are medians over iterations, in ns per
// sysctl operation, and ratios to bare. ns/op is the guarded read.
func BenchmarkGuardOverhead(b *testing.B) {
	const ops = 100000
	m := testManager(b)
	guardedCg, otherCg := testCgroup(b), testCgroup(b)
	checkHostUnchanged(b)
	s := script{Main: []step{
		{Op: "unshare", NS: "net"},
		{Op: "bench", Key: "net.ipv4.ip_local_port_range", Value: "32768 60999", N: ops},
	}}
	measure := func(cg string) [3]float64 {
		out := runInCgroup(b, cg, s)
		if len(out) != 2 || out[0].Errno != 0 || out[1].Errno != 0 {
			b.Fatalf("bench helper: %+v", out)
		}
		return [3]float64{out[1].ReadNs, out[1].WriteNs, out[1].OpenNs}
	}
	null, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.CGroupSysctl, AttachType: ebpf.AttachCGroupSysctl, License: "ferry",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	closeAtEnd(b, null)
	withGuard := func(cg string) [3]float64 {
		g, err := m.Attach(context.Background(), guardedCg, "bench", fullPolicy(b))
		if err != nil {
			b.Fatal(err)
		}
		res := measure(cg)
		if n, err := g.Denied(); err != nil || n != 0 {
			b.Fatalf("allowed writes were denied: %d, %v", n, err)
		}
		if err := g.Detach(); err != nil {
			b.Fatal(err)
		}
		return res
	}
	modes := []struct {
		name string
		run  func() [3]float64
	}{
		{"bare", func() [3]float64 { return measure(otherCg) }},
		{"guarded", func() [3]float64 { return withGuard(guardedCg) }},
		{"null", func() [3]float64 {
			l, err := link.AttachCgroup(link.CgroupOptions{Path: guardedCg, Attach: ebpf.AttachCGroupSysctl, Program: null})
			if err != nil {
				b.Fatal(err)
			}
			defer func() {
				if err := l.Close(); err != nil {
					b.Fatal(err)
				}
			}()
			return measure(guardedCg)
		}},
		{"bystander", func() [3]float64 { return withGuard(otherCg) }},
	}
	kinds := []string{"read", "write", "openread"}
	res := map[string][]float64{} // "read-guarded" -> per iteration
	for i := 0; i < b.N; i++ {
		for j := range modes {
			md := modes[(i+j)%len(modes)]
			r := md.run()
			for k, kind := range kinds {
				res[kind+"-"+md.name] = append(res[kind+"-"+md.name], r[k])
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(median(res["read-guarded"]), "ns/op")
	for _, kind := range kinds {
		bare := median(res[kind+"-bare"])
		for _, md := range modes {
			v := median(res[kind+"-"+md.name])
			b.ReportMetric(v, kind+"-"+md.name+"-ns")
			if md.name != "bare" {
				b.ReportMetric(v/bare, kind+"-"+md.name+"-ratio")
			}
		}
	}
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
