package agent

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ferry-agent/ferry/cgroup"
)

// metricsCollector reads the agent's state at scrape time: nothing is
// sampled in the background for metrics alone.
type metricsCollector struct {
	a *Agent

	ctrCPU, ctrMem                     *prometheus.Desc
	guarCPU, guarMem, ceilCPU, ceilMem *prometheus.Desc
	effCPU, effMem                     *prometheus.Desc
	denied                             *prometheus.Desc
	state, transitions, refusals       *prometheus.Desc
	nodeAlloc, nodeGuar, nodeUsed      *prometheus.Desc
	pressure, containers               *prometheus.Desc
}

func newMetricsCollector(a *Agent) *metricsCollector {
	c := []string{"container"}
	r := []string{"resource"}
	d := prometheus.NewDesc
	return &metricsCollector{
		a:           a,
		ctrCPU:      d("ferry_container_cpu_usage_seconds_total", "CPU time used by the container.", c, nil),
		ctrMem:      d("ferry_container_memory_working_set_bytes", "Memory working set of the container (usage minus inactive file cache).", c, nil),
		guarCPU:     d("ferry_container_cpu_guarantee_cores", "CPU guarantee.", c, nil),
		guarMem:     d("ferry_container_memory_guarantee_bytes", "Memory guarantee.", c, nil),
		ceilCPU:     d("ferry_container_cpu_ceiling_cores", "CPU ceiling while the node is relaxed (0: none).", c, nil),
		ceilMem:     d("ferry_container_memory_ceiling_bytes", "Memory ceiling while the node is relaxed (0: none).", c, nil),
		effCPU:      d("ferry_container_cpu_effective_ceiling_cores", "CPU ceiling in force now.", c, nil),
		effMem:      d("ferry_container_memory_effective_ceiling_bytes", "Memory ceiling in force now.", c, nil),
		denied:      d("ferry_container_sysctl_denied_total", "Sysctl writes refused by the container's guard.", c, nil),
		state:       d("ferry_node_hardened", "1 while the node holds every container to its guarantee for this resource.", r, nil),
		transitions: d("ferry_node_transitions_total", "Harden/relax transitions.", []string{"resource", "to"}, nil),
		refusals:    d("ferry_admission_refusals_total", "Containers refused because their guarantee would oversell the node.", r, nil),
		nodeAlloc:   d("ferry_node_allocatable", "Allocatable (cores or bytes): capacity minus the reservation.", r, nil),
		nodeGuar:    d("ferry_node_guaranteed", "Sum of guarantees, incoming migrations included (cores or bytes).", r, nil),
		nodeUsed:    d("ferry_node_used", "Used by containers (cores or bytes).", r, nil),
		pressure:    d("ferry_node_pressure_avg10", "PSI some avg10 of the pressure source, percent.", r, nil),
		containers:  d("ferry_containers", "Containers by state.", []string{"state"}, nil),
	}
}

func (m *metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.ctrCPU, m.ctrMem, m.guarCPU, m.guarMem, m.ceilCPU, m.ceilMem, m.effCPU,
		m.effMem, m.denied, m.state, m.transitions, m.refusals, m.nodeAlloc, m.nodeGuar, m.nodeUsed, m.pressure, m.containers} {
		ch <- d
	}
}

func (m *metricsCollector) Collect(ch chan<- prometheus.Metric) {
	g := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	ctr := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, l...)
	}
	rep := m.a.NodeReport()
	for _, c := range rep.Containers {
		g(m.guarCPU, c.Guarantee.CPU, c.ID)
		g(m.guarMem, float64(c.Guarantee.Memory), c.ID)
		g(m.ceilCPU, c.Ceiling.CPU, c.ID)
		g(m.ceilMem, float64(c.Ceiling.Memory), c.ID)
		g(m.effCPU, c.Effective.CPU, c.ID)
		g(m.effMem, float64(c.Effective.Memory), c.ID)
		if c.Usage != nil {
			ctr(m.ctrCPU, c.Usage.CPUUsage.Seconds(), c.ID)
			g(m.ctrMem, float64(c.Usage.MemoryWorkingSet), c.ID)
		}
	}
	for _, r := range []cgroup.ResourceReport{rep.CPU, rep.Memory} {
		res := string(r.Resource)
		hard := 0.0
		if r.State == cgroup.Hardened {
			hard = 1
		}
		g(m.state, hard, res)
		g(m.nodeAlloc, r.Allocatable, res)
		g(m.nodeGuar, r.Guaranteed, res)
		g(m.nodeUsed, r.Used, res)
		g(m.pressure, r.PressureAvg10, res)
	}
	met, refusals := m.a.ElasticMetrics()
	for _, res := range []cgroup.Resource{cgroup.CPU, cgroup.Memory} {
		for _, to := range []cgroup.State{cgroup.Hardened, cgroup.Relaxed} {
			ctr(m.transitions, float64(met.Transitions[string(res)+":"+string(to)]), string(res), string(to))
		}
		ctr(m.refusals, float64(refusals[res]), string(res))
	}
	states := map[string]float64{StateCreated: 0, StateRunning: 0, StateStopped: 0, StateExited: 0}
	for _, c := range m.a.List() {
		m.a.mu.Lock()
		states[c.state()]++
		m.a.mu.Unlock()
		ctr(m.denied, float64(m.a.sysctlDenied(c)), c.name)
	}
	for st, n := range states {
		g(m.containers, n, st)
	}
}

// MetricsHandler serves the agent's Prometheus metrics, with Go runtime and
// process metrics of ferryd.
func (a *Agent) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newMetricsCollector(a), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}
