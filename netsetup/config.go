package netsetup

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
)

// Config is a node's network configuration.
type Config struct {
	// Bridge is the host bridge's name (at most 15 bytes). An existing
	// bridge of that name is used as it is; a non-bridge link of that name
	// is an error.
	Bridge string
	// Subnet is the L2 segment's IPv4 subnet, shared by every host on it.
	Subnet netip.Prefix
	// IPRange is this node's own slice of Subnet; zero means all of it.
	// Hosts on one segment must have disjoint ranges.
	IPRange netip.Prefix
	// Gateway is this node's address on the bridge and the containers'
	// default gateway. Zero means the first address of IPRange that is not
	// the subnet's network address, so hosts with disjoint ranges never
	// claim the same gateway on the shared segment.
	Gateway netip.Addr
	// RunDir holds the netns bind mounts, RunDir/netns/<id>. It should be
	// on a tmpfs (/run) so nothing outlives a reboot.
	RunDir string
	// StateDir holds the IPAM and endpoint state (netsetup.json).
	StateDir string
	// MTU of the bridge (when created here) and of both veth ends; 0 means 1500.
	MTU int
	// IPTables is the iptables binary for published ports; empty means
	// "iptables" on PATH. Used only when a container publishes ports.
	IPTables string
	// HostNetns is the path of the network namespace the node's bridge and
	// host-side veths live in; empty means the process's own. Tests use it
	// to run a whole "host" inside a namespace of their own.
	HostNetns string
}

const (
	defaultMTU   = 1500
	netnsSubdir  = "netns"
	stateFile    = "netsetup.json"
	lockFile     = "netsetup.lock"
	containerIf  = "eth0"
	maxIfNameLen = 15 // IFNAMSIZ - 1
)

// validate checks cfg and fills in the defaults.
func (cfg *Config) validate() error {
	if err := validIfName(cfg.Bridge); err != nil {
		return fmt.Errorf("bridge name %q: %w: %w", cfg.Bridge, err, ErrInvalid)
	}
	if err := validPrefix("subnet", cfg.Subnet); err != nil {
		return err
	}
	if cfg.Subnet.Bits() > 30 {
		return fmt.Errorf("subnet %s: needs at least 4 addresses (/30 or larger): %w", cfg.Subnet, ErrInvalid)
	}
	if !cfg.IPRange.IsValid() {
		cfg.IPRange = cfg.Subnet
	}
	if err := validPrefix("ip-range", cfg.IPRange); err != nil {
		return err
	}
	if cfg.IPRange.Bits() < cfg.Subnet.Bits() || !cfg.Subnet.Contains(cfg.IPRange.Addr()) {
		return fmt.Errorf("ip-range %s: not inside subnet %s: %w", cfg.IPRange, cfg.Subnet, ErrInvalid)
	}
	if !cfg.Gateway.IsValid() {
		gw := cfg.IPRange.Addr()
		if gw == cfg.Subnet.Addr() {
			gw = gw.Next()
		}
		cfg.Gateway = gw
	}
	cfg.Gateway = cfg.Gateway.Unmap()
	if !cfg.Gateway.Is4() || !cfg.Subnet.Contains(cfg.Gateway) ||
		cfg.Gateway == cfg.Subnet.Addr() || cfg.Gateway == broadcast(cfg.Subnet) {
		return fmt.Errorf("gateway %s: must be a host address of subnet %s: %w", cfg.Gateway, cfg.Subnet, ErrInvalid)
	}
	if n := usableInRange(cfg); n == 0 {
		return fmt.Errorf("ip-range %s: no address left to hand out (subnet %s, gateway %s): %w",
			cfg.IPRange, cfg.Subnet, cfg.Gateway, ErrInvalid)
	}
	for _, d := range []struct{ name, path string }{{"run dir", cfg.RunDir}, {"state dir", cfg.StateDir}} {
		if !filepath.IsAbs(d.path) {
			return fmt.Errorf("%s %q: must be an absolute path: %w", d.name, d.path, ErrInvalid)
		}
	}
	if cfg.HostNetns != "" && !filepath.IsAbs(cfg.HostNetns) {
		return fmt.Errorf("host netns %q: must be an absolute path: %w", cfg.HostNetns, ErrInvalid)
	}
	if cfg.IPTables == "" {
		cfg.IPTables = "iptables"
	}
	if cfg.MTU == 0 {
		cfg.MTU = defaultMTU
	}
	if cfg.MTU < 68 || cfg.MTU > 65535 {
		return fmt.Errorf("mtu %d: must be within 68..65535: %w", cfg.MTU, ErrInvalid)
	}
	return nil
}

func validPrefix(what string, p netip.Prefix) error {
	if !p.IsValid() {
		return fmt.Errorf("%s: missing or malformed CIDR: %w", what, ErrInvalid)
	}
	if !p.Addr().Is4() {
		return fmt.Errorf("%s %s: only IPv4 is supported: %w", what, p, ErrInvalid)
	}
	if p.Masked() != p {
		return fmt.Errorf("%s %s: host bits set (did you mean %s?): %w", what, p, p.Masked(), ErrInvalid)
	}
	return nil
}

// validIfName applies the kernel's rules for interface names (dev_valid_name).
func validIfName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("empty")
	case len(name) > maxIfNameLen:
		return fmt.Errorf("longer than %d bytes", maxIfNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("reserved")
	case strings.ContainsAny(name, "/: \t\n\r\x00"):
		return fmt.Errorf("contains '/', ':' or white space")
	}
	return nil
}
