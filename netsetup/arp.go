package netsetup

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Gratuitous ARP: announceRounds rounds, announceGap apart; each round sends
// a request and a reply with sender = target = the address (RFC 5227's
// announcement, and the reply form some stacks prefer). The first round
// already updates every bridge's forwarding table on the way, so it is the
// only one the caller waits for: the later ones, which only cover a lost
// frame, go out in the background (a migration's restore would otherwise
// wait 100 ms for them with the container frozen).
const (
	announceRounds = 3
	announceGap    = 50 * time.Millisecond
)

// Announce sends gratuitous ARP from inside container id's netns, on its
// eth0, so bridges and switches learn the MAC's new port and neighbours
// refresh their entries at once. The endpoint must be active (not standby).
// It returns once the first round is sent; the repeats follow in the
// background and stop if the endpoint goes to standby or away.
func (m *Manager) Announce(ctx context.Context, id string) error {
	m.all.RLock()
	defer m.all.RUnlock()
	defer m.ids.lock(id)()
	return m.announce(ctx, id)
}

// announce sends the first round and starts the repeats; the caller holds
// the locks.
func (m *Manager) announce(ctx context.Context, id string) error {
	if err := m.announceRound(ctx, id); err != nil {
		return err
	}
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		for round := 1; round < announceRounds; round++ {
			select {
			case <-m.closing:
				return
			case <-time.After(announceGap):
			}
			if err := m.repeatAnnouncement(id); err != nil {
				m.log.Debug("netsetup: announcement repeat", "container", id, "err", err)
				return
			}
		}
	}()
	return nil
}

// repeatAnnouncement sends one more round if id is still active.
func (m *Manager) repeatAnnouncement(id string) error {
	m.all.RLock()
	defer m.all.RUnlock()
	defer m.ids.lock(id)()
	return m.announceRound(context.Background(), id)
}

// announceRound sends one round of the announcement.
func (m *Manager) announceRound(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("announce %q: %w", id, err)
	}
	s, err := m.st.read()
	if err != nil {
		return err
	}
	rec := s.Endpoints[id]
	if rec == nil {
		return fmt.Errorf("announce %q: %w", id, ErrNotFound)
	}
	if rec.Standby {
		return fmt.Errorf("announce %q: endpoint is on standby (call Activate): %w", id, ErrInvalid)
	}
	ifindex, err := containerIfIndex(rec)
	if err != nil {
		return err
	}
	var fd int
	err = inNetns(rec.Netns, func() error {
		var err error
		// Protocol 0: this socket only sends, it receives nothing.
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return &OpError{Op: "open packet socket", ID: id, Netns: rec.Netns, Err: err}
	}
	defer func() { _ = unix.Close(fd) }()
	mac := MACFor(rec.IP)
	dst := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifindex, Halen: 6,
		Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	for _, f := range [][]byte{garpFrame(mac, rec.IP, arpRequest), garpFrame(mac, rec.IP, arpReply)} {
		if err := unix.Sendto(fd, f, 0, dst); err != nil {
			return &OpError{Op: "send gratuitous ARP", ID: id, Link: containerIf, Addr: rec.IP.String(), Err: err}
		}
	}
	m.log.Debug("netsetup: announced", "container", id, "ip", rec.IP, "mac", mac.String())
	return nil
}

func containerIfIndex(rec *record) (int, error) {
	ns, err := netns.GetFromPath(rec.Netns)
	if err != nil {
		return 0, &OpError{Op: "open netns", ID: rec.ID, Netns: rec.Netns, Err: err}
	}
	defer func() { _ = ns.Close() }()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return 0, &OpError{Op: "open netlink", ID: rec.ID, Netns: rec.Netns, Err: err}
	}
	defer h.Close()
	l, err := h.LinkByName(containerIf)
	if err != nil {
		return 0, &OpError{Op: "look up container interface", ID: rec.ID, Link: containerIf, Netns: rec.Netns, Err: err}
	}
	if l.Attrs().OperState != netlink.OperUp {
		return 0, &OpError{Op: "announce", ID: rec.ID, Link: containerIf, Netns: rec.Netns,
			Err: errors.New("interface is not operational (host end down?)")}
	}
	return l.Attrs().Index, nil
}

const (
	arpRequest = 1
	arpReply   = 2
)

// garpFrame builds an Ethernet broadcast frame carrying an ARP packet with
// sender = target = ip, padded to the 60-byte Ethernet minimum.
func garpFrame(mac net.HardwareAddr, ip netip.Addr, op uint16) []byte {
	f := make([]byte, 60)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:14], unix.ETH_P_ARP)
	a := f[14:]
	binary.BigEndian.PutUint16(a[0:2], 1) // hardware type Ethernet
	binary.BigEndian.PutUint16(a[2:4], unix.ETH_P_IP)
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:8], op)
	ip4 := ip.As4()
	copy(a[8:14], mac)
	copy(a[14:18], ip4[:])
	if op == arpReply {
		copy(a[18:24], mac) // target MAC: unused in a request (zero), ours in a reply
	}
	copy(a[24:28], ip4[:])
	return f
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
