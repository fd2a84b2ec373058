// Package sysctlguard decides which sysctls a container may set: only those
// that live in the container's own namespaces (IPC, UTS, network). It owns
// the allowlist and the validation of --sysctl requests; it must not write
// any sysctl itself (libcontainer applies the accepted ones inside the
// container before its process starts).
package sysctlguard
