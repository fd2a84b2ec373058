// Package cgroup owns ferry's resource model: a container's guarantee and
// ceiling for CPU and memory, their parsing and validation, and their mapping
// onto cgroup settings. It must not create or delete containers; the agent
// hands it a container's cgroup and it sets limits there.
//
// For now the mapping is static (the ceiling is a hard limit, the guarantee a
// weight and a soft limit); the elastic harden/relax loop builds on it.
package cgroup
