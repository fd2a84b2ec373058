// Package migrate owns ferry's live-migration algorithm: which mode to use
// (AutoMode), when pre-copy has converged (Decide, from the rounds' CRIU
// stats read by ReadDumpStats and ferry's own transfer measurements), and
// the safe carriage of directory trees, CRIU's image directories and a
// container's overlayfs upper layer, from one agent to the other (WriteTree
// on the source, ExtractTree on the destination). The handshake, the round
// loop, the final dump, restore and rollback build on these.
//
// It does not own the transport: trees are written to an io.Writer and
// read from an io.Reader, and the agent carries the bytes inside its
// mutual-TLS gRPC stream. Where CRIU or the peer sits behind a step, the
// step takes a small interface or plain data (stats, Round, Features), so
// the algorithm is tested without either.
//
// It must not touch what other packages own: containers' cgroups and
// limits (package cgroup), network namespaces, links and addresses
// (package netsetup), sysctls (package sysctlguard), the agent's on-disk
// state and its gRPC server and API (package agent). On the destination it
// writes only beneath the directory it is given, whatever the peer sends;
// library code here never prints.
package migrate
