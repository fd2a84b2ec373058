package netsetup

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func baseConfig() Config {
	return Config{
		Bridge: "ferry0", Subnet: netip.MustParsePrefix("10.88.0.0/24"),
		RunDir: "/run/ferry", StateDir: "/var/lib/ferry/net",
	}
}

func TestConfigDefaults(t *testing.T) {
	c := baseConfig()
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
	if c.IPRange != c.Subnet || c.Gateway.String() != "10.88.0.1" || c.MTU != 1500 {
		t.Fatalf("defaults: range %s gateway %s mtu %d", c.IPRange, c.Gateway, c.MTU)
	}
	// A node's slice: the gateway is the slice's first address, so two hosts
	// on one segment do not claim the same gateway.
	c = baseConfig()
	c.IPRange = netip.MustParsePrefix("10.88.0.64/26")
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
	if c.Gateway.String() != "10.88.0.64" {
		t.Fatalf("gateway %s, want 10.88.0.64", c.Gateway)
	}
}

func TestConfigInvalid(t *testing.T) {
	for name, mod := range map[string]func(*Config){
		"no bridge":            func(c *Config) { c.Bridge = "" },
		"bridge too long":      func(c *Config) { c.Bridge = strings.Repeat("b", 16) },
		"bridge with slash":    func(c *Config) { c.Bridge = "a/b" },
		"no subnet":            func(c *Config) { c.Subnet = netip.Prefix{} },
		"ipv6 subnet":          func(c *Config) { c.Subnet = netip.MustParsePrefix("fd00::/64") },
		"host bits":            func(c *Config) { c.Subnet = netip.MustParsePrefix("10.88.0.5/24") },
		"subnet too small":     func(c *Config) { c.Subnet = netip.MustParsePrefix("10.88.0.0/31") },
		"range outside":        func(c *Config) { c.IPRange = netip.MustParsePrefix("10.89.0.0/26") },
		"range larger":         func(c *Config) { c.IPRange = netip.MustParsePrefix("10.88.0.0/16") },
		"range host bits":      func(c *Config) { c.IPRange = netip.MustParsePrefix("10.88.0.65/26") },
		"gateway outside":      func(c *Config) { c.Gateway = netip.MustParseAddr("10.89.0.1") },
		"gateway is network":   func(c *Config) { c.Gateway = netip.MustParseAddr("10.88.0.0") },
		"gateway is broadcast": func(c *Config) { c.Gateway = netip.MustParseAddr("10.88.0.255") },
		"range only gateway":   func(c *Config) { c.IPRange = netip.MustParsePrefix("10.88.0.0/31") },
		"relative run dir":     func(c *Config) { c.RunDir = "run" },
		"relative state dir":   func(c *Config) { c.StateDir = "" },
		"relative host netns":  func(c *Config) { c.HostNetns = "netns/a" },
		"mtu too small":        func(c *Config) { c.MTU = 60 },
	} {
		c := baseConfig()
		mod(&c)
		if err := c.validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: validate() = %v, want ErrInvalid", name, err)
		}
	}
}
