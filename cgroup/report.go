package cgroup

import (
	"sort"
	"time"
)

// ResourceReport is the node's view of one resource. CPU is in cores,
// memory in bytes (Unit says which).
type ResourceReport struct {
	Resource    Resource `json:"resource"`
	Unit        string   `json:"unit"` // "cores" or "bytes"
	Capacity    float64  `json:"capacity"`
	Reserved    float64  `json:"reserved"`    // held back for the system and ferryd
	Allocatable float64  `json:"allocatable"` // capacity − reserved
	Guaranteed  float64  `json:"guaranteed"`  // admitted guarantees + incoming migrations
	Incoming    float64  `json:"incoming"`    // the part of guaranteed held for incoming migrations
	// Unguaranteed is allocatable − guaranteed, and UnguaranteedShare its
	// share of allocatable: what can still be promised.
	Unguaranteed      float64   `json:"unguaranteed"`
	UnguaranteedShare float64   `json:"unguaranteed_share"`
	Used              float64   `json:"used"`           // containers' working sets; CPU cores over the last tick
	PressureAvg10     float64   `json:"pressure_avg10"` // the source's PSI some avg10, percent
	PressureShare     float64   `json:"pressure_share"` // the detector's windowed PSI share (0..1), self-limited stalls discounted
	State             State     `json:"state"`
	Since             time.Time `json:"since"`
}

// ContainerReport is one tracked container.
type ContainerReport struct {
	ID            string `json:"id"`
	Path          string `json:"path"`
	Guarantee     Amount `json:"guarantee"`
	Ceiling       Amount `json:"ceiling"`   // the relaxed ceiling of its spec
	Effective     Amount `json:"effective"` // the ceiling it has now
	MemoryLimit   int64  `json:"memory_limit"`
	MemoryPending bool   `json:"memory_pending"`
	Usage         *Stats `json:"usage,omitempty"`
}

// NodeReport is the node's elastic state, for ferryctl and the metrics
// endpoint.
type NodeReport struct {
	Time       time.Time         `json:"time"`
	Driver     string            `json:"driver"`
	CPU        ResourceReport    `json:"cpu"`
	Memory     ResourceReport    `json:"memory"`
	Scarcest   Resource          `json:"scarcest"`
	Containers []ContainerReport `json:"containers"`
}

// Scarcest is the resource whose unguaranteed remainder (allocatable −
// guaranteed) is the smallest share of its allocatable: the one the next
// admission is likeliest to be refused for. A resource with nothing
// allocatable counts as share 0. Ties go to memory, which cannot be taken
// back from a container the way CPU time can.
func Scarcest(allocatable, guaranteed Amount) Resource {
	share := func(alloc, g float64) float64 {
		if alloc <= 0 {
			return 0
		}
		return (alloc - g) / alloc
	}
	if share(allocatable.CPU, guaranteed.CPU) < share(float64(allocatable.Memory), float64(guaranteed.Memory)) {
		return CPU
	}
	return Memory
}

// Scarcest is Scarcest of the node's book.
func (n *Node) Scarcest() Resource { return Scarcest(n.Allocatable(), n.Guaranteed()) }

// Report assembles the node report from the book, the last tick and the
// state machines.
func (c *Controller) Report() NodeReport {
	n := c.cfg.Node
	capa, res, alloc, guar, inc := n.Capacity(), n.Reserved(), n.Allocatable(), n.Guaranteed(), n.Incoming()
	c.mu.Lock()
	defer c.mu.Unlock()
	rep := NodeReport{Time: c.clock.Now(), Driver: c.cfg.Driver.Version(), Scarcest: Scarcest(alloc, guar)}
	for _, r := range AllResources {
		m := c.machines[r]
		rr := ResourceReport{Resource: r, State: m.state, Since: m.since, PressureAvg10: c.lastSrc[r].Some.Avg10,
			PressureShare: m.last["psi"]}
		if r == CPU {
			rr.Unit = "cores"
			rr.Capacity, rr.Reserved, rr.Allocatable, rr.Guaranteed, rr.Incoming, rr.Used =
				capa.CPU, res.CPU, alloc.CPU, guar.CPU, inc.CPU, c.used.CPU
		} else {
			rr.Unit = "bytes"
			rr.Capacity, rr.Reserved, rr.Allocatable, rr.Guaranteed, rr.Incoming, rr.Used =
				float64(capa.Memory), float64(res.Memory), float64(alloc.Memory), float64(guar.Memory), float64(inc.Memory), float64(c.used.Memory)
		}
		rr.Unguaranteed = rr.Allocatable - rr.Guaranteed
		if rr.Allocatable > 0 {
			rr.UnguaranteedShare = rr.Unguaranteed / rr.Allocatable
		}
		if r == CPU {
			rep.CPU = rr
		} else {
			rep.Memory = rr
		}
	}
	for id, t := range c.containers {
		cr := ContainerReport{ID: id, Path: t.c.Path, Guarantee: t.c.Spec.Guarantee, Ceiling: t.c.Spec.Ceiling,
			Effective: t.target.Ceiling, MemoryLimit: t.applied.MemoryLimit, MemoryPending: t.applied.MemoryPending}
		if t.last != nil {
			st := *t.last
			cr.Usage = &st
		}
		rep.Containers = append(rep.Containers, cr)
	}
	sort.Slice(rep.Containers, func(i, j int) bool { return rep.Containers[i].ID < rep.Containers[j].ID })
	return rep
}
