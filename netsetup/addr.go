package netsetup

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"regexp"
)

// MACFor derives a container's MAC from its IPv4 address: 02:42 followed by
// the four address bytes. 0x02 marks it locally administered and unicast.
// Because the MAC is a function of the address, it moves with the address:
// a neighbour's ARP entry stays right when a container migrates, and two
// hosts on one segment never derive the same MAC for different addresses.
func MACFor(ip netip.Addr) net.HardwareAddr {
	b := ip.Unmap().As4()
	return net.HardwareAddr{0x02, 0x42, b[0], b[1], b[2], b[3]}
}

// VethName is the host-side veth name of container id: "fr" and the first
// 13 hex digits of the id's SHA-256, 15 bytes in all (IFNAMSIZ). The id
// itself is kept in the link's alias ("ferry:<id>") and in the state file.
func VethName(id string) string {
	sum := sha256.Sum256([]byte(id))
	return vethPrefix + hex.EncodeToString(sum[:])[:maxIfNameLen-len(vethPrefix)]
}

const (
	vethPrefix = "fr"
	aliasPfx   = "ferry:"
)

var vethNameRE = regexp.MustCompile(`^` + vethPrefix + `[0-9a-f]{13}$`)

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// validID: ids name files under RunDir/netns, so they must be plain names.
func validID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("container id %q: must match %s: %w", id, idRE, ErrInvalid)
	}
	return nil
}

func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	v := binary.BigEndian.Uint32(b[:]) | (^uint32(0) >> p.Bits())
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func prefixSize(p netip.Prefix) uint64 { return uint64(1) << (32 - p.Bits()) }

// hostAddr reports whether a may be given to a container: inside the subnet,
// and neither its network nor its broadcast address nor this node's gateway.
func hostAddr(cfg *Config, a netip.Addr) bool {
	return a.Is4() && cfg.Subnet.Contains(a) && a != cfg.Subnet.Addr() &&
		a != broadcast(cfg.Subnet) && a != cfg.Gateway
}

func usableInRange(cfg *Config) uint64 {
	n := uint64(0)
	a := cfg.IPRange.Addr()
	for i := uint64(0); i < prefixSize(cfg.IPRange) && n < 2; i++ {
		if hostAddr(cfg, a) {
			n++
		}
		a = a.Next()
	}
	return n
}
