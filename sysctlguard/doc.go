// Package sysctlguard decides which sysctls a container may set, and enforces
// it in the kernel for as long as the container lives.
//
// It owns two things:
//
//   - The allowlist: only sysctls of namespaces the container has of its own
//     (IPC keys, kernel.domainname for UTS, net.* minus the keys that are
//     global on Linux). Validate checks --sysctl requests against it; Policy
//     is the same list, optionally narrowed by the operator (NewPolicy refuses
//     any pattern that would name a global key) and bound to the container's
//     namespaces (Policy.For).
//
//   - The guard: a BPF_PROG_TYPE_CGROUP_SYSCTL program, built with cilium/ebpf's
//     asm package, attached to the container's cgroup in the unified hierarchy
//     (Manager.Attach). Every write to /proc/sys by a process of that cgroup,
//     through whatever mount or descriptor, is checked at write time against
//     the policy held in an LPM trie; a write the policy does not allow fails
//     with EPERM and is counted and reported (Guard.Denied, Guard.Watch).
//     Reads pass. Each container has its own program and maps, pinned under
//     <pin root>/<id>/ on a BPF filesystem so the guard outlives ferryd and is
//     found again (Manager.Reconcile, Manager.Open) and never attached twice.
//
// It must not write any sysctl itself (libcontainer applies the accepted ones
// inside the container before its process starts), must not create or remove
// cgroups (the caller hands it the container's cgroup directory), and touches
// no pin outside its pin root.
package sysctlguard
