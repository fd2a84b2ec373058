// Package agent is the ferry daemon: the gRPC API server, the container
// registry and its on-disk state, request validation, and reattaching to
// running containers when ferryd starts.
//
// Each container has a monitor process (ferryd re-executed as "ferryd
// monitor") that creates it through libcontainer, is the parent of its init
// process, writes its output to a size-capped log file and records its exit
// status. Monitors outlive ferryd, so a container keeps running, logging and
// has its exit code recorded while ferryd is down or restarting.
//
// The agent must not set cgroup limits itself (package cgroup owns the
// mapping) nor touch network links (package netsetup).
package agent
