package netsetup

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
)

// Port publishes a container port on the host: connections to HostPort on
// the host's own addresses (or only HostIP) are DNATed to the container.
type Port struct {
	Proto         string     `json:"proto"` // "tcp" or "udp"
	HostPort      uint16     `json:"host_port"`
	ContainerPort uint16     `json:"container_port"`
	HostIP        netip.Addr `json:"host_ip,omitzero"` // zero: every local address
}

func (p Port) String() string {
	h := ""
	if p.HostIP.IsValid() {
		h = p.HostIP.String() + ":"
	}
	return fmt.Sprintf("%s%d->%d/%s", h, p.HostPort, p.ContainerPort, p.Proto)
}

// clashes reports whether p and q claim the same host port.
func (p Port) clashes(q Port) bool {
	return p.Proto == q.Proto && p.HostPort == q.HostPort &&
		(!p.HostIP.IsValid() || !q.HostIP.IsValid() || p.HostIP == q.HostIP)
}

func validPorts(id string, ports []Port) error {
	for i, p := range ports {
		if p.Proto != "tcp" && p.Proto != "udp" {
			return fmt.Errorf("container %q: port %s: protocol must be tcp or udp: %w", id, p, ErrInvalid)
		}
		if p.HostPort == 0 || p.ContainerPort == 0 {
			return fmt.Errorf("container %q: port %s: ports must be 1..65535: %w", id, p, ErrInvalid)
		}
		if p.HostIP.IsValid() && !p.HostIP.Is4() {
			return fmt.Errorf("container %q: port %s: host IP must be IPv4: %w", id, p, ErrInvalid)
		}
		for _, q := range ports[:i] {
			if p.clashes(q) {
				return fmt.Errorf("container %q: ports %s and %s: same host port: %w", id, q, p, ErrInvalid)
			}
		}
	}
	return nil
}

// Ferry's own chains. Nothing else in the host's tables is changed but one
// jump into each chain from the built-in chain it hangs off.
const (
	chainPorts   = "FERRY-PORTS"   // nat: one DNAT rule per published port
	chainForward = "FERRY-FORWARD" // filter: lets DNATed flows to and from the bridge pass
)

// portRule is the DNAT rule of one published port, without the chain.
func (m *Manager) portRule(id string, ip netip.Addr, p Port) []string {
	r := []string{"-p", p.Proto}
	if p.HostIP.IsValid() {
		r = append(r, "-d", p.HostIP.String()+"/32")
	}
	return append(r, "-m", p.Proto, "--dport", strconv.Itoa(int(p.HostPort)),
		"-m", "comment", "--comment", aliasPfx+id,
		"-j", "DNAT", "--to-destination", ip.String()+":"+strconv.Itoa(int(p.ContainerPort)))
}

// iptables runs iptables in the host namespace. The command is started
// from a thread that joined that namespace, so it inherits it.
func (m *Manager) iptables(args ...string) (string, error) {
	var out bytes.Buffer
	run := func() error {
		cmd := exec.Command(m.cfg.IPTables, append([]string{"-w", "5"}, args...)...)
		cmd.Stdout, cmd.Stderr = &out, &out
		return cmd.Run()
	}
	var err error
	if m.cfg.HostNetns == "" {
		err = run()
	} else {
		err = inNetns(m.cfg.HostNetns, run)
	}
	if err != nil {
		return out.String(), &OpError{Op: "iptables " + strings.Join(args, " "), Netns: m.cfg.HostNetns,
			Err: fmt.Errorf("%w: %s", err, strings.TrimSpace(out.String()))}
	}
	return out.String(), nil
}

// ensurePortChains creates ferry's chains and their jumps, idempotently.
func (m *Manager) ensurePortChains() error {
	br := m.cfg.Bridge
	for _, c := range []struct {
		table, chain string
		jumps        [][]string
		static       [][]string
	}{
		{"nat", chainPorts, [][]string{
			{"PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", chainPorts},
			// Connections from the host itself; loopback would need route_localnet.
			{"OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL", "-j", chainPorts},
		}, nil},
		{"filter", chainForward, [][]string{{"FORWARD", "-j", chainForward}}, [][]string{
			{"-o", br, "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"},
			{"-i", br, "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"},
		}},
	} {
		if _, err := m.iptables("-t", c.table, "-S", c.chain); err != nil {
			if _, err := m.iptables("-t", c.table, "-N", c.chain); err != nil {
				return err
			}
		}
		for _, r := range c.static {
			if err := m.ensureRule(c.table, "-A", c.chain, r); err != nil {
				return err
			}
		}
		for _, j := range c.jumps {
			if err := m.ensureRule(c.table, "-I", j[0], j[1:]); err != nil {
				return err
			}
		}
	}
	return nil
}

func (m *Manager) ensureRule(table, op, chain string, rule []string) error {
	if _, err := m.iptables(append([]string{"-t", table, "-C", chain}, rule...)...); err == nil {
		return nil
	}
	_, err := m.iptables(append([]string{"-t", table, op, chain}, rule...)...)
	return err
}

// publish adds rec's port rules; on failure it removes the ones it added.
func (m *Manager) publish(rec *record) (retErr error) {
	if len(rec.Ports) == 0 {
		return nil
	}
	if err := m.ensurePortChains(); err != nil {
		return err
	}
	m.warnIfNoForwarding()
	for i, p := range rec.Ports {
		if _, err := m.iptables(append([]string{"-t", "nat", "-A", chainPorts}, m.portRule(rec.ID, rec.IP, p)...)...); err != nil {
			return errors.Join(err, m.unpublish(&record{ID: rec.ID, IP: rec.IP, Ports: rec.Ports[:i]}))
		}
	}
	return nil
}

// unpublish deletes rec's port rules; a rule already gone is no error.
func (m *Manager) unpublish(rec *record) error {
	var errs []error
	for _, p := range rec.Ports {
		rule := m.portRule(rec.ID, rec.IP, p)
		if _, err := m.iptables(append([]string{"-t", "nat", "-C", chainPorts}, rule...)...); err != nil {
			continue // not there (or no chain)
		}
		if _, err := m.iptables(append([]string{"-t", "nat", "-D", chainPorts}, rule...)...); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// reconcilePorts deletes DNAT rules in ferry's chain whose container is
// not live and returns what it removed. No chain: nothing to do.
func (m *Manager) reconcilePorts(isLive map[string]bool) ([]Orphan, error) {
	out, err := m.iptables("-t", "nat", "-S", chainPorts)
	if err != nil {
		return nil, nil
	}
	var removed []Orphan
	var errs []error
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "-A" || f[1] != chainPorts {
			continue
		}
		i := slices.Index(f, "--comment")
		if i < 0 || i+1 >= len(f) {
			continue
		}
		id, ours := strings.CutPrefix(strings.Trim(f[i+1], `"`), aliasPfx)
		if !ours || isLive[id] {
			continue
		}
		// Ids have no spaces or quotes (validID), so the fields are the
		// rule's arguments as iptables printed them.
		for j := range f {
			f[j] = strings.Trim(f[j], `"`)
		}
		if _, err := m.iptables(append([]string{"-t", "nat", "-D"}, f[1:]...)...); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, Orphan{Kind: "port", Name: strings.Join(f[2:], " "), ID: id})
	}
	return removed, errors.Join(errs...)
}

// warnIfNoForwarding: published ports reach containers from other hosts
// only if the host forwards IPv4. netsetup does not switch that on: it is
// the host's policy, not a container's.
func (m *Manager) warnIfNoForwarding() {
	var v []byte
	read := func() error {
		var err error
		v, err = os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		return err
	}
	var err error
	if m.cfg.HostNetns == "" {
		err = read()
	} else {
		err = inNetns(m.cfg.HostNetns, read)
	}
	if err == nil && strings.TrimSpace(string(v)) == "0" {
		m.log.Warn("netsetup: net.ipv4.ip_forward is 0: published ports answer only connections from this host")
	}
}
