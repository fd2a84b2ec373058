package sysctlguard

import (
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

var allNS = Namespaces{IPC: true, UTS: true, Net: true}

func TestKeyNameConversion(t *testing.T) {
	for _, c := range []struct{ key, name string }{
		{"kernel.panic", "kernel/panic"},
		{"net.ipv4.ip_local_port_range", "net/ipv4/ip_local_port_range"},
		// sysctl(8) writes a dot inside a component (a VLAN interface) as a slash.
		{"net.ipv4.conf.eth0/100.forwarding", "net/ipv4/conf/eth0.100/forwarding"},
		{"fs.mqueue.msg_max", "fs/mqueue/msg_max"},
		{"", ""},
	} {
		if got := KeyToName(c.key); got != c.name {
			t.Errorf("KeyToName(%q) = %q, want %q", c.key, got, c.name)
		}
		if got := NameToKey(c.name); got != c.key {
			t.Errorf("NameToKey(%q) = %q, want %q", c.name, got, c.key)
		}
		if got := NameToKey(KeyToName(c.key)); got != c.key {
			t.Errorf("round trip of %q gives %q", c.key, got)
		}
	}
}

// ruleMap is a policy's trie as prefix -> allow.
func ruleMap(p *Policy) map[string]bool {
	m := map[string]bool{}
	for _, r := range p.rules() {
		m[r.prefix] = r.allow
	}
	return m
}

func TestBaseTrie(t *testing.T) {
	p, err := NewPolicy(nil)
	if err != nil {
		t.Fatal(err)
	}
	got := ruleMap(p.For(allNS))
	want := map[string]bool{
		"net/": true, "net/bridge/": false, "net/core/rmem_max": false, "net/core/busy_": false,
		"net/ipv4/tcp_mem": false, "net/netfilter/nf_conntrack_max": false,
		"kernel/shmmax\x00": true, "kernel/sem\x00": true, "kernel/shm_rmid_forced\x00": true,
		"kernel/domainname\x00": true, "kernel/hostname\x00": true, "fs/mqueue/": true,
	}
	for k, v := range want {
		if a, ok := got[k]; !ok || a != v {
			t.Errorf("trie[%q] = %v (present %v), want %v", k, a, ok, v)
		}
	}
	for k, v := range got {
		if len(k) > maxName-1 {
			t.Errorf("rule %q longer than the program's buffer", k)
		}
		// Denials only make sense below an allow; the default is deny.
		if !v && !strings.HasPrefix(k, "net/") {
			t.Errorf("useless deny rule %q", k)
		}
		if strings.HasPrefix(k, "kernel/") && !strings.HasSuffix(k, "\x00") {
			t.Errorf("kernel rule %q is a prefix, want exact keys only", k)
		}
	}
	// Minimal: netdev_budget_usecs is covered by the netdev_budget prefix.
	if _, ok := got["net/core/netdev_budget_usecs"]; ok {
		t.Error("redundant rule net/core/netdev_budget_usecs kept")
	}
	if len(got) != len(p.For(allNS).rules()) {
		t.Error("duplicate rules")
	}
}

func TestExactRulesMatchOnlyTheirKey(t *testing.T) {
	p, _ := NewPolicy(nil)
	pp := p.For(allNS)
	for key, want := range map[string]bool{
		"kernel.shmmax": true, "kernel.shmmaxx": false, "kernel.shm": false,
		"kernel.domainname": true, "kernel.domainname2": false, "kernel.hostname": true, "kernel.hostnamex": false,
		"fs.mqueue.msg_max": true, "fs.mqueuex": false, "fs.file-max": false,
		"net.core.somaxconn": true, "net.core.rmem_max": false, "net.bridge.bridge-nf-call-iptables": false,
	} {
		if got := pp.Allows(key); got != want {
			t.Errorf("Allows(%q) = %v, want %v", key, got, want)
		}
	}
}

// The trie must say exactly what Validate says, for every key this machine
// has and every combination of namespaces.
func TestTrieAgreesWithValidate(t *testing.T) {
	keys := []string{
		"kernel.shmmax", "kernel.msgmax", "kernel.sem", "fs.mqueue.queues_max", "kernel.domainname",
		"kernel.hostname", "kernel.panic", "vm.swappiness", "net.ipv4.ip_forward", "net.core.somaxconn",
		"net.core.rmem_max", "net.core.busy_poll", "net.bridge.bridge-nf-call-iptables", "net.nf_conntrack_max",
		"net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_tcp_timeout_established",
	}
	_ = filepath.WalkDir("/proc/sys", func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			keys = append(keys, NameToKey(strings.TrimPrefix(path, "/proc/sys/")))
		}
		return nil
	})
	p, _ := NewPolicy(nil)
	checked := 0
	for _, ns := range []Namespaces{{}, {IPC: true}, {UTS: true}, {Net: true}, allNS, {IPC: true, Net: true}} {
		pp := p.For(ns)
		for _, k := range keys {
			if !keyRE.MatchString(k) {
				continue // Validate refuses it as malformed whatever the trie says
			}
			checked++
			if got, want := pp.Allows(k), Validate(k, "1", ns) == nil; got != want {
				t.Errorf("ns %+v key %s: trie allows %v, Validate %v", ns, k, got, want)
			}
		}
	}
	t.Logf("%d key/namespace pairs agree", checked)
}

func TestForNamespaces(t *testing.T) {
	p, _ := NewPolicy(nil)
	got := ruleMap(p.For(Namespaces{IPC: true}))
	for k, v := range got {
		if !v {
			t.Errorf("deny rule %q left without an allow above it", k)
		}
		if strings.HasPrefix(k, "net/") || k == "kernel/domainname\x00" || k == "kernel/hostname\x00" {
			t.Errorf("rule %q for a namespace the container shares with the host", k)
		}
	}
	if len(got) != len(ipcKeys)+1 {
		t.Errorf("IPC-only trie has %d rules, want %d: %v", len(got), len(ipcKeys)+1, got)
	}
	if rs := p.For(Namespaces{}).rules(); len(rs) != 0 {
		t.Errorf("no namespaces of its own: rules %v, want none", rs)
	}
	if p.Bound() || !p.For(allNS).Bound() {
		t.Error("Bound: NewPolicy must be unbound, For bound")
	}
}

func TestNarrowing(t *testing.T) {
	cases := []struct {
		narrow []string
		want   map[string]bool // the whole trie
		allow  []string
		deny   []string
	}{
		{
			narrow: []string{"net.ipv4.ip_local_port_range", "fs.mqueue.*", "kernel.shmmax"},
			want: map[string]bool{
				"net/ipv4/ip_local_port_range\x00": true, "fs/mqueue/": true, "kernel/shmmax\x00": true,
			},
			allow: []string{"net.ipv4.ip_local_port_range", "fs.mqueue.msg_max", "kernel.shmmax"},
			deny:  []string{"net.ipv4.ip_forward", "kernel.msgmax", "kernel.domainname", "kernel.panic"},
		},
		{
			// The net.core denials stay inside a narrowing to net.core.*.
			narrow: []string{"net.core.*"},
			allow:  []string{"net.core.somaxconn", "net.core.xfrm_acq_expires"},
			deny:   []string{"net.core.rmem_max", "net.core.busy_read", "net.ipv4.ip_forward", "kernel.shmmax"},
		},
		{
			// kernel.* means the kernel keys a container may write at all.
			narrow: []string{"kernel.*"},
			allow:  []string{"kernel.shmmax", "kernel.sem", "kernel.domainname"},
			deny:   []string{"kernel.panic", "kernel.pid_max", "net.ipv4.ip_forward", "fs.mqueue.msg_max"},
		},
		{
			narrow: []string{"net.ipv4.tcp_*", "net.ipv4.tcp_*"},
			want:   map[string]bool{"net/ipv4/tcp_": true, "net/ipv4/tcp_mem": false, "net/ipv4/tcp_available_": false, "net/ipv4/tcp_allowed_congestion_control": false},
			allow:  []string{"net.ipv4.tcp_syncookies"},
			deny:   []string{"net.ipv4.tcp_mem", "net.ipv4.ip_forward"},
		},
		{narrow: []string{}, want: map[string]bool{}, deny: []string{"net.ipv4.ip_forward", "kernel.shmmax"}},
		{narrow: []string{"*"}, allow: []string{"net.ipv4.ip_forward", "kernel.shmmax"}, deny: []string{"kernel.panic", "net.core.rmem_max"}},
	}
	full, _ := NewPolicy(nil)
	for _, c := range cases {
		p, err := NewPolicy(c.narrow)
		if err != nil {
			t.Errorf("NewPolicy(%q): %v", c.narrow, err)
			continue
		}
		pp := p.For(allNS)
		got := ruleMap(pp)
		if c.want != nil && !equalRules(got, c.want) {
			t.Errorf("NewPolicy(%q) trie = %v, want %v", c.narrow, got, c.want)
		}
		for _, k := range c.allow {
			if !pp.Allows(k) {
				t.Errorf("NewPolicy(%q) denies %s", c.narrow, k)
			}
		}
		for _, k := range c.deny {
			if pp.Allows(k) {
				t.Errorf("NewPolicy(%q) allows %s", c.narrow, k)
			}
		}
		// Never wider than the base list, for any key.
		for prefix := range got {
			k := NameToKey(strings.TrimSuffix(prefix, "\x00")) + "x"
			if strings.HasSuffix(prefix, "\x00") {
				k = NameToKey(strings.TrimSuffix(prefix, "\x00"))
			}
			if pp.Allows(k) && !full.For(allNS).Allows(k) {
				t.Errorf("NewPolicy(%q) widens to %s", c.narrow, k)
			}
		}
	}
}

func equalRules(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestNarrowingRefusesWidening(t *testing.T) {
	for _, pat := range []string{
		"kernel.panic", "vm.swappiness", "vm.*", "net.bridge.*", "net.bridge.bridge-nf-call-iptables",
		"net.core.rmem_max", "net.ipv4.tcp_mem", "kernel.threads-max", "fs.file-max", "fs.*x*",
	} {
		_, err := NewPolicy([]string{"net.ipv4.*", pat})
		if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `"`+pat+`"`) {
			t.Errorf("NewPolicy(%q) = %v, want ErrInvalid naming the pattern", pat, err)
		}
	}
	for _, pat := range []string{"", "kernel", "net..ipv4", "net.*.x", "a*b", "../x", "net.ipv4.conf.eth0/100.forwarding", "NET.*", strings.Repeat("a.", 70) + "*"} {
		_, err := NewPolicy([]string{pat})
		if err == nil || !errors.Is(err, ErrInvalid) {
			t.Errorf("NewPolicy(%q) = %v, want ErrInvalid", pat, err)
		}
	}
	_, err := NewPolicy([]string{"kernel.panic"})
	if err == nil || !strings.Contains(err.Error(), "global to the host") {
		t.Errorf("error %v does not say why", err)
	}
}

func TestPolicyValidate(t *testing.T) {
	p, err := NewPolicy([]string{"net.ipv4.*"})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Validate("net.ipv4.ip_local_port_range", "1024 65000", allNS); err != nil {
		t.Errorf("allowed key refused: %v", err)
	}
	for _, c := range []struct{ key, want string }{
		{"net.core.somaxconn", "operator's sysctl allowlist"},
		{"kernel.shmmax", "operator's sysctl allowlist"},
		{"kernel.panic", "global to the host"},
	} {
		err := p.Validate(c.key, "1", allNS)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.key) {
			t.Errorf("Validate(%s) = %v, want %q", c.key, err, c.want)
		}
	}
	if err := p.Validate("net.ipv4.ip_forward", "1", Namespaces{IPC: true}); !errors.Is(err, ErrInvalid) {
		t.Errorf("key of a shared netns accepted: %v", err)
	}
}

func TestTrieKeyAndEvent(t *testing.T) {
	k, err := trieKey("net/")
	if err != nil || len(k) != keySize || k[0] != 32 || string(k[4:8]) != "net/" || k[8] != 0 {
		t.Errorf("trieKey(net/) = %v, %v", k[:12], err)
	}
	if _, err := trieKey(strings.Repeat("a", maxName)); !errors.Is(err, ErrInvalid) {
		t.Errorf("over-long rule accepted: %v", err)
	}
	rec := make([]byte, eventSize)
	rec[0] = 42
	copy(rec[12:], "kernel/panic\x00garbage")
	ev, err := decodeEvent(rec)
	if err != nil || ev.ktime != 42 || ev.name != "kernel/panic" {
		t.Errorf("decodeEvent = %+v, %v", ev, err)
	}
	if _, err := decodeEvent(rec[:20]); err == nil {
		t.Error("short event accepted")
	}
}

// Attach checks its inputs before it touches the kernel: no root needed.
func TestAttachRefusesBadInput(t *testing.T) {
	m := &Manager{root: t.TempDir()}
	p, _ := NewPolicy(nil)
	if _, err := m.Attach(t.Context(), t.TempDir(), "web", p); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "Policy.For") {
		t.Errorf("unbound policy: %v", err)
	}
	for _, id := range []string{"", ".hidden", "a/b", "_tmp-x", "..", strings.Repeat("a", 200)} {
		if _, err := m.Attach(t.Context(), t.TempDir(), id, p.For(allNS)); !errors.Is(err, ErrInvalid) {
			t.Errorf("id %q: %v", id, err)
		}
	}
	if _, err := m.Attach(t.Context(), t.TempDir(), "web", p.For(allNS)); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "unified") {
		t.Errorf("cgroup dir not on cgroup2: %v", err)
	}
	if _, err := NewManager(filepath.Join(t.TempDir(), "pins")); !errors.Is(err, ErrNoBPFFS) {
		t.Errorf("pin root on tmpfs: %v", err)
	}
}
