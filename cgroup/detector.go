package cgroup

import (
	"fmt"
	"time"
)

// DetectorConfig configures the pressure detector and the harden/relax loop.
//
// Why the defaults (DefaultDetectorConfig):
//
//   - Period 100 ms. The issue caps it at 250 ms; 100 ms puts five samples in
//     each enter window and adds at most 100 ms to the reaction. A tick reads
//     two host pressure files and twelve small files per container (measured
//     on the v1 test VM: 68 µs per container, so 50 containers cost 3.4% of
//     a core at 100 ms; raise Period towards 250 ms on dense nodes).
//   - PSI from the cumulative "total" counters, not avg10. The kernel updates
//     avg10 every 2 s as a 10 s moving average: a sudden 100% stall shows as
//     about 18% after 2 s. A delta of "total" between two reads is the exact
//     stalled share of that interval (measured here: a file re-reader in a
//     64Mi v1 cgroup stalls ~18% of every 100 ms while avg10 still shows 1–4%).
//     PSI poll() triggers were weighed and not taken: their window is at
//     least 500 ms and they fire at most once per window, so they would not
//     react sooner than this loop, and leaving the hardened state needs
//     periodic evaluation anyway.
//   - Memory: harden when PSI some ≥ 10% over 500 ms, or the containers'
//     working sets reach 95% of allocatable; relax when PSI ≤ 2% and usage
//     ≤ 85% for 30 s. Healthy page-cache churn stays well under 1%; at 10%
//     tasks lose a tenth of their time to reclaim and refaults, thrashing has
//     begun but is far from the OOM regime (systemd-oomd acts at 60% over
//     seconds), and hardening is the mild remedy. A step to ≥ 50% stall is
//     seen after one tick, a step to 10% after the 500 ms window: within a
//     second either way. Memory is incompressible, so working sets nearing
//     allocatable are scarcity in themselves. 30 s to relax because every
//     relax that is followed by a re-harden costs a reclaim of all the burst
//     (refaults, IO): at most two such cycles a minute.
//   - CPU: harden when PSI some ≥ 40% over 500 ms, or the containers use
//     100% of allocatable (they eat the system's reservation); relax when
//     PSI ≤ 10% and usage ≤ 90% for 10 s. CPU is compressible and weights
//     already split a contended CPU by guarantee, so only heavy, sustained
//     run-queue waiting hardens; lifting and re-imposing a CFS quota costs
//     nothing, hence the shorter relax window.
//   - Stalls of containers that sit at their own ceiling (v1 memory.failcnt
//     or v2 memory.events high/max rising; nr_throttled rising for CPU) are
//     subtracted from the node's PSI: such a stall says the container is
//     sized too small, not that the node is scarce, and without the discount
//     one thrashing container would harden every other one, and the clamp's
//     own reclaim would keep the node hardened for ever. The result is a lower
//     bound of the stall not explained by self-limited containers.
//   - A pending memory step-down (the kernel could not reclaim down yet) is
//     retried every second.
type DetectorConfig struct {
	Period time.Duration  `json:"period"`
	Source PressureSource `json:"source"`
	CPU    Policy         `json:"cpu"`
	Memory Policy         `json:"memory"`
	// CountSelfLimited keeps the stalls of containers at their own ceiling
	// in the node's PSI (no discount).
	CountSelfLimited bool          `json:"count_self_limited"`
	RetryInterval    time.Duration `json:"retry_interval"`
}

// MaxPeriod is the longest loop period accepted.
const MaxPeriod = 250 * time.Millisecond

// DefaultDetectorConfig returns the documented defaults (see DetectorConfig)
// with the host's /proc/pressure as the source.
func DefaultDetectorConfig() DetectorConfig {
	return DetectorConfig{
		Period: 100 * time.Millisecond,
		Source: HostPressure(""),
		Memory: Policy{
			PSI:         Threshold{Enter: 0.10, Leave: 0.02},
			Usage:       Threshold{Enter: 0.95, Leave: 0.85},
			EnterWindow: 500 * time.Millisecond,
			LeaveWindow: 30 * time.Second,
		},
		CPU: Policy{
			PSI:         Threshold{Enter: 0.40, Leave: 0.10},
			Usage:       Threshold{Enter: 1.00, Leave: 0.90},
			EnterWindow: 500 * time.Millisecond,
			LeaveWindow: 10 * time.Second,
		},
		RetryInterval: time.Second,
	}
}

func (c DetectorConfig) validate() error {
	if c.Period <= 0 || c.Period > MaxPeriod {
		return fmt.Errorf("detector period %v: must be in (0, %v]: %w", c.Period, MaxPeriod, ErrInvalid)
	}
	if c.Source.Dir == "" {
		return fmt.Errorf("detector pressure source: no directory: %w", ErrInvalid)
	}
	if c.RetryInterval <= 0 {
		return fmt.Errorf("detector retry interval %v: must be positive: %w", c.RetryInterval, ErrInvalid)
	}
	if err := c.CPU.validate(CPU); err != nil {
		return err
	}
	return c.Memory.validate(Memory)
}

func (c DetectorConfig) policy(r Resource) Policy {
	if r == CPU {
		return c.CPU
	}
	return c.Memory
}

// minHardenedCPU and minMemory are the floors of a hardened ceiling for a
// container without a guarantee: the smallest CFS quota the kernel takes
// (1 ms per 100 ms) and the smallest memory ceiling ferry accepts.
const minHardenedCPU = 0.01

// EffectiveLimits is what a container with spec s gets in the given states:
// its ceiling while relaxed, its guarantee while hardened (HardenToGuarantee).
// A container without a guarantee for a resource is hardened to the floor
// (0.01 cores, 4Mi): it was promised nothing, and on v1/v2 the step-down then
// holds it at what it cannot give back rather than killing it.
func EffectiveLimits(s Spec, cpu, memory State) Limits {
	l := Limits(s)
	if cpu == Hardened {
		l.Ceiling.CPU = hardened(s.Guarantee.CPU, s.Ceiling.CPU, minHardenedCPU)
	}
	if memory == Hardened {
		l.Ceiling.Memory = int64(hardened(float64(s.Guarantee.Memory), float64(s.Ceiling.Memory), minMemory))
	}
	return l
}

func hardened(guarantee, ceiling, floor float64) float64 {
	h := guarantee
	if h <= 0 {
		h = floor
	}
	if ceiling > 0 && ceiling < h {
		h = ceiling
	}
	return h
}
