package sysctlguard

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// ErrInvalid classes every rejected sysctl.
var ErrInvalid = errors.New("invalid sysctl")

// Namespaces says which namespaces the container has of its own.
type Namespaces struct {
	IPC, UTS, Net bool
}

// ipcKeys are the kernel.* sysctls that belong to the IPC namespace
// (ipc/ipc_sysctl.c in the kernel), plus fs.mqueue.* (ipc/mq_sysctl.c).
var ipcKeys = map[string]bool{
	"kernel.msgmax": true, "kernel.msgmnb": true, "kernel.msgmni": true,
	"kernel.sem": true, "kernel.shmall": true, "kernel.shmmax": true,
	"kernel.shmmni": true, "kernel.shm_rmid_forced": true,
	// Also per IPC namespace, and written by CRIU when it restores one.
	"kernel.auto_msgmni": true, "kernel.msg_next_id": true, "kernel.sem_next_id": true, "kernel.shm_next_id": true,
}

// utsKeys belong to the UTS namespace (kernel/utsname_sysctl.c). A run sets
// the hostname through --hostname, but the key must stay writable inside:
// CRIU restores a UTS namespace by writing both through /proc/sys.
var utsKeys = map[string]bool{"kernel.domainname": true, "kernel.hostname": true}

// globalNetPrefixes are net.* sysctls that are not per network namespace on
// Linux: writing them from a container would change them for the host.
// Sources: net/bridge/br_netfilter_hooks.c registers net.bridge.* in the init
// netns only; net/core/sysctl_net_core.c keeps the net_core_table (buffer and
// backlog maxima, BPF JIT, flow limits) global and only netns_core_table
// (somaxconn, txrehash, ...) per netns; net.ipv4.tcp_mem, udp_mem and
// route.flush-free settings of net/ipv4/sysctl_net_ipv4.c's ipv4_table are
// global; nf_conntrack_max is writable only in the init netns.
var globalNetPrefixes = []string{
	"net.bridge.",
	"net.core.rmem_default", "net.core.rmem_max", "net.core.wmem_default", "net.core.wmem_max",
	"net.core.netdev_max_backlog", "net.core.netdev_budget", "net.core.netdev_budget_usecs",
	"net.core.bpf_jit", "net.core.optmem_max", "net.core.message_", "net.core.dev_weight",
	"net.core.flow_limit", "net.core.rps_sock_flow_entries", "net.core.netdev_tstamp_prequeue",
	"net.core.busy_", "net.core.default_qdisc", "net.core.tstamp_allow_data", "net.core.warnings",
	"net.core.high_order_alloc_disable", "net.core.max_skb_frags", "net.core.mem_pcpu_rsv",
	"net.ipv4.tcp_mem", "net.ipv4.udp_mem", "net.ipv4.route.max_size",
	"net.ipv4.inet_peer_", "net.ipv4.cipso_", "net.ipv4.tcp_available_", "net.ipv4.tcp_allowed_congestion_control",
	"net.netfilter.nf_conntrack_max", "net.nf_conntrack_max",
}

var keyRE = regexp.MustCompile(`^[a-z0-9_]+(\.[a-zA-Z0-9_@:+-]+)+$`)

// valueRE accepts what sysctl files take: numbers, words, and space or
// tab separated lists of them. No newlines or control characters.
var valueRE = regexp.MustCompile(`^[A-Za-z0-9_.:,/+ \t-]{1,256}$`)

// Validate accepts key=value only when key lives in one of ns's private
// namespaces and is not on the global list. The error names the key and why.
func Validate(key, value string, ns Namespaces) error {
	if !keyRE.MatchString(key) || strings.Contains(key, "..") {
		return fmt.Errorf("sysctl %q: malformed key: %w", key, ErrInvalid)
	}
	if !valueRE.MatchString(value) || strings.TrimSpace(value) == "" {
		return fmt.Errorf("sysctl %q: malformed value %q: %w", key, value, ErrInvalid)
	}
	switch {
	case ipcKeys[key] || strings.HasPrefix(key, "fs.mqueue."):
		if !ns.IPC {
			return fmt.Errorf("sysctl %q: belongs to the IPC namespace, which the container does not have of its own: %w", key, ErrInvalid)
		}
		return nil
	case utsKeys[key]:
		if !ns.UTS {
			return fmt.Errorf("sysctl %q: belongs to the UTS namespace, which the container does not have of its own: %w", key, ErrInvalid)
		}
		return nil
	case strings.HasPrefix(key, "net."):
		for _, p := range globalNetPrefixes {
			if strings.HasPrefix(key, p) {
				return fmt.Errorf("sysctl %q: global to the host, not per network namespace: %w", key, ErrInvalid)
			}
		}
		if !ns.Net {
			return fmt.Errorf("sysctl %q: belongs to the network namespace, which the container does not have of its own: %w", key, ErrInvalid)
		}
		return nil
	}
	return fmt.Errorf("sysctl %q: global to the host (not in any namespace a container owns): %w", key, ErrInvalid)
}
