// Package cgroup owns ferry's elastic resources: a container's guarantee and
// ceiling for CPU and memory (parsing, validation, mapping onto cgroup
// settings), the node's admission book (guarantees are never oversold), the
// v1 and v2 drivers that write guarantees and effective ceilings into a
// container's cgroup and read usage and pressure back, the pressure detector
// with its per-resource hysteresis, the harden/relax loop, and the node
// report.
//
// It must not create, move or delete cgroups or processes: the agent (via
// libcontainer) makes a container's cgroup and hands its path here; this
// package only writes limit files in it and in its parent, and reads.
//
// How the agent uses it:
//
//   - ferryd start: NewNode(capacity, reservation), then Node.Restore with
//     the guarantees of the containers found on disk; NewController, then
//     Controller.Rebuild with those containers (it reads the kernel's limits
//     back to know whether the node was hardened), then go Controller.Run.
//   - run: Node.Admit before anything is created (ErrExhausted →
//     RESOURCE_EXHAUSTED), create the container with
//     Controller.EffectiveSpec(spec).Resources(), then Controller.Add once
//     its cgroup exists; Node.Release if the run fails.
//   - rm: Controller.Remove, then Node.Release.
//   - incoming migration: Node.Reserve at the handshake, Node.Admit once
//     restored (the reservation turns into the admission), Controller.Add;
//     Node.Release when it fails. Outgoing: Remove and Release after the
//     peer confirmed.
//   - report: Controller.Report (with Scarcest) and Controller.Metrics;
//     transitions arrive through ControllerConfig.OnEvent and are logged.
package cgroup
