package netsetup

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestMACFor(t *testing.T) {
	got := MACFor(netip.MustParseAddr("10.88.1.2")).String()
	if got != "02:42:0a:58:01:02" {
		t.Fatalf("MACFor(10.88.1.2) = %s", got)
	}
	m := MACFor(netip.MustParseAddr("255.0.0.7"))
	if m[0]&0x02 == 0 || m[0]&0x01 != 0 {
		t.Fatalf("%s: want locally administered unicast", m)
	}
	// An IPv4-mapped IPv6 form gives the same MAC.
	if a, b := MACFor(netip.MustParseAddr("::ffff:10.88.1.2")).String(), got; a != b {
		t.Fatalf("mapped form: %s, want %s", a, b)
	}
}

func TestVethName(t *testing.T) {
	seen := map[string]string{}
	for _, id := range []string{"a", "b", "web", "web.1", strings.Repeat("x", 128), "Web"} {
		n := VethName(id)
		if len(n) != maxIfNameLen || !strings.HasPrefix(n, vethPrefix) || validIfName(n) != nil {
			t.Fatalf("VethName(%q) = %q: want 15 bytes with prefix %q", id, n, vethPrefix)
		}
		if VethName(id) != n {
			t.Fatalf("VethName(%q) not deterministic", id)
		}
		if other, dup := seen[n]; dup {
			t.Fatalf("VethName(%q) = VethName(%q) = %s", id, other, n)
		}
		seen[n] = id
	}
}

func TestValidID(t *testing.T) {
	for _, id := range []string{"a", "web-1", "db_2.x", "A1", strings.Repeat("a", 128)} {
		if err := validID(id); err != nil {
			t.Errorf("validID(%q) = %v", id, err)
		}
	}
	for _, id := range []string{"", ".", "..", "../x", "a/b", "-a", ".a", "a b", strings.Repeat("a", 129)} {
		if err := validID(id); !errors.Is(err, ErrInvalid) {
			t.Errorf("validID(%q) = %v, want ErrInvalid", id, err)
		}
	}
}

func TestBroadcast(t *testing.T) {
	for p, want := range map[string]string{
		"10.0.0.0/24": "10.0.0.255", "10.0.0.64/26": "10.0.0.127", "10.0.0.0/8": "10.255.255.255", "10.1.2.3/32": "10.1.2.3",
	} {
		if got := broadcast(netip.MustParsePrefix(p)); got.String() != want {
			t.Errorf("broadcast(%s) = %s, want %s", p, got, want)
		}
	}
}

func TestGarpFrame(t *testing.T) {
	ip := netip.MustParseAddr("10.1.2.3")
	mac := MACFor(ip)
	req, rep := garpFrame(mac, ip, arpRequest), garpFrame(mac, ip, arpReply)
	for _, f := range [][]byte{req, rep} {
		if len(f) != 60 || f[12] != 0x08 || f[13] != 0x06 || string(f[0:6]) != "\xff\xff\xff\xff\xff\xff" {
			t.Fatalf("bad ethernet header % x", f[:14])
		}
		if string(f[14+14:14+18]) != "\x0a\x01\x02\x03" || string(f[14+24:14+28]) != "\x0a\x01\x02\x03" {
			t.Fatalf("sender and target IP must both be the address: % x", f[14:42])
		}
		if string(f[14+8:14+14]) != string(mac) {
			t.Fatalf("sender MAC % x, want %s", f[22:28], mac)
		}
	}
	if req[14+7] != 1 || rep[14+7] != 2 {
		t.Fatalf("ops: request %d, reply %d", req[21], rep[21])
	}
}
