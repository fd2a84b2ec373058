package sysctlguard

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// maxName is the size of the buffer the BPF program reads a sysctl's name
// into, the terminating NUL included; it is also the trie's key length.
// The longest names the kernel registers (net/ipv6/neigh/<16-byte ifname>/
// base_reachable_time_ms and the like) stay well below it.
const maxName = 128

// maxRules bounds the trie: the base list has about 45 rules, and each
// narrowing pattern adds at most one.
const maxRules = 1024

// KeyToName turns a sysctl key as sysctl(8) and the OCI spec write it
// ("net.ipv4.conf.eth0/100.forwarding") into the name the kernel hands the
// BPF program ("net/ipv4/conf/eth0.100/forwarding"): dots and slashes swap.
func KeyToName(key string) string { return swapDotSlash(key) }

// NameToKey is the inverse of KeyToName.
func NameToKey(name string) string { return swapDotSlash(name) }

func swapDotSlash(s string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case '.':
			return '/'
		case '/':
			return '.'
		}
		return r
	}, s)
}

// rule is one longest-prefix-match entry over the NUL-terminated name the
// kernel reports: a name that starts with prefix (and with no longer
// prefix in the table) is allowed or denied. A rule for one exact key ends
// in "\x00", so it can only match that name; a rule without it covers a
// whole subtree (or every key that starts with the given letters).
type rule struct {
	prefix string
	allow  bool
}

// String shows a rule in key form: "kernel.shmmax" (exact), "net.*"
// (prefix), "net.core.busy_*" (prefix in the middle of a component).
func (r rule) String() string {
	verdict := "deny"
	if r.allow {
		verdict = "allow"
	}
	return verdict + " " + prefixToPattern(r.prefix)
}

func prefixToPattern(prefix string) string {
	if exact, ok := strings.CutSuffix(prefix, "\x00"); ok {
		return NameToKey(exact)
	}
	return NameToKey(prefix) + "*"
}

// nsRule is a rule of the base allowlist, with the namespace a container
// must own for an allow rule to apply.
type nsRule struct {
	rule
	needs func(Namespaces) bool
}

// baseRules is validate.go's allowlist as trie rules: IPC keys, the UTS
// domainname, net.* minus the keys that are global on Linux. Writes to
// anything else are denied (the trie's default).
func baseRules() []nsRule {
	ipc := func(ns Namespaces) bool { return ns.IPC }
	uts := func(ns Namespaces) bool { return ns.UTS }
	net := func(ns Namespaces) bool { return ns.Net }
	var rs []nsRule
	for k := range ipcKeys {
		rs = append(rs, nsRule{rule{KeyToName(k) + "\x00", true}, ipc})
	}
	rs = append(rs, nsRule{rule{"fs/mqueue/", true}, ipc})
	for k := range utsKeys {
		rs = append(rs, nsRule{rule{KeyToName(k) + "\x00", true}, uts})
	}
	rs = append(rs, nsRule{rule{"net/", true}, net})
	for _, p := range globalNetPrefixes {
		rs = append(rs, nsRule{rule{KeyToName(p), false}, nil})
	}
	return rs
}

// Policy is the set of sysctls a container's processes may write: validate.go's
// namespaced allowlist, optionally narrowed by the operator, restricted to the
// namespaces the container owns. Reads are never restricted.
type Policy struct {
	narrow []rule // nil: no narrowing; else allow rules, default deny
	ns     *Namespaces
	table  []rule // the trie's entries, computed once
}

// patternRE accepts a key (as in Validate) or a key prefix ending in "*":
// "net.ipv4.ip_local_port_range", "net.ipv4.*", "net.ipv4.tcp_*", "*".
var patternRE = regexp.MustCompile(`^([a-z0-9_]+(\.[a-zA-Z0-9_@:+-]+)*(\.?\*)?|\*)$`)

// NewPolicy returns the allowlist narrowed to the operator's patterns. A
// pattern is a key ("net.ipv4.ip_local_port_range") or a prefix ending in "*"
// ("net.ipv4.*", "fs.mqueue.*"). A container may write a key only if it is on
// validate.go's namespaced allowlist and matches a pattern, so narrowing can
// never widen the list; a pattern that names only keys global to the host is
// refused with an error naming it (ErrInvalid), since it could only be a
// mistake. narrowTo == nil means no narrowing; an empty non-nil list allows no
// writes at all. The result must be bound to a container's namespaces with
// For before Attach.
func NewPolicy(narrowTo []string) (*Policy, error) {
	p := &Policy{}
	if narrowTo == nil {
		p.table = p.compute()
		return p, nil
	}
	p.narrow = []rule{}
	base := baseRulesFor(Namespaces{IPC: true, UTS: true, Net: true})
	seen := map[string]bool{}
	for _, pat := range narrowTo {
		prefix, err := patternToPrefix(pat)
		if err != nil {
			return nil, err
		}
		if !overlaps(base, prefix) {
			if strings.HasSuffix(prefix, "\x00") {
				return nil, fmt.Errorf("sysctl allowlist pattern %q: names a key global to the host; the allowlist can only be narrowed: %w", pat, ErrInvalid)
			}
			return nil, fmt.Errorf("sysctl allowlist pattern %q: covers only keys global to the host; the allowlist can only be narrowed: %w", pat, ErrInvalid)
		}
		if !seen[prefix] {
			seen[prefix] = true
			p.narrow = append(p.narrow, rule{prefix, true})
		}
	}
	p.table = p.compute()
	if len(p.table) > maxRules {
		return nil, fmt.Errorf("sysctl allowlist: %d patterns make %d rules, more than the guard holds (%d): %w", len(narrowTo), len(p.table), maxRules, ErrInvalid)
	}
	return p, nil
}

// patternToPrefix converts an operator pattern to a trie prefix.
func patternToPrefix(pat string) (string, error) {
	if !patternRE.MatchString(pat) || strings.Contains(pat, "..") {
		return "", fmt.Errorf("sysctl allowlist pattern %q: malformed (want a key like net.ipv4.ip_local_port_range or a prefix like net.ipv4.*): %w", pat, ErrInvalid)
	}
	var prefix string
	if stem, ok := strings.CutSuffix(pat, "*"); ok {
		prefix = KeyToName(stem)
	} else {
		if !keyRE.MatchString(pat) {
			return "", fmt.Errorf("sysctl allowlist pattern %q: malformed key (a prefix needs a trailing *): %w", pat, ErrInvalid)
		}
		prefix = KeyToName(pat) + "\x00"
	}
	if len(prefix) > maxName-1 {
		return "", fmt.Errorf("sysctl allowlist pattern %q: longer than %d bytes: %w", pat, maxName-2, ErrInvalid)
	}
	return prefix, nil
}

// overlaps reports whether some name under prefix is allowed by rules: either
// the rule in force at prefix allows, or an allow rule lies below prefix.
func overlaps(rules []rule, prefix string) bool {
	if lookup(rules, prefix) {
		return true
	}
	for _, r := range rules {
		if r.allow && strings.HasPrefix(r.prefix, prefix) {
			return true
		}
	}
	return false
}

// For returns the policy for a container that owns the namespaces ns: keys
// of a namespace it shares with the host are denied too.
func (p *Policy) For(ns Namespaces) *Policy {
	b := &Policy{narrow: p.narrow, ns: &ns}
	b.table = b.compute()
	return b
}

// Bound reports whether For has fixed the container's namespaces.
func (p *Policy) Bound() bool { return p != nil && p.ns != nil }

// namespaces returns the bound namespaces, or all of them for an unbound policy.
func (p *Policy) namespaces() Namespaces {
	if p.ns == nil {
		return Namespaces{IPC: true, UTS: true, Net: true}
	}
	return *p.ns
}

// Allows reports whether the guard lets a process of the container write key.
// An unbound policy answers as if the container owned all its namespaces.
func (p *Policy) Allows(key string) bool {
	return lookup(p.rules(), KeyToName(key)+"\x00")
}

// Validate is the package's Validate followed by the operator's narrowing: a
// --sysctl the guard would then refuse inside the container is refused here.
func (p *Policy) Validate(key, value string, ns Namespaces) error {
	if err := Validate(key, value, ns); err != nil {
		return err
	}
	if !p.For(ns).Allows(key) {
		return fmt.Errorf("sysctl %q: not on the operator's sysctl allowlist: %w", key, ErrInvalid)
	}
	return nil
}

// String lists the policy's rules in key form, for logs.
func (p *Policy) String() string {
	rs := p.rules()
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return "[" + strings.Join(s, ", ") + "]"
}

func baseRulesFor(ns Namespaces) []rule {
	var rs []rule
	for _, r := range baseRules() {
		if r.needs == nil || r.needs(ns) {
			rs = append(rs, r.rule)
		}
	}
	return rs
}

// rules returns the trie's entries.
func (p *Policy) rules() []rule { return p.table }

// compute returns the trie's entries: the intersection of the base allowlist
// (for the bound namespaces) and the narrowing, as a minimal set of
// longest-prefix rules with deny as the default. Every prefix of either side
// becomes a candidate; its verdict is the conjunction of both sides' longest
// matches there, which is exact because no rule of either side is longer than
// the candidate that matches a name longest. Candidates whose verdict equals
// that of the next shorter candidate are dropped.
func (p *Policy) compute() []rule {
	base := baseRulesFor(p.namespaces())
	cands := map[string]bool{}
	for _, r := range base {
		cands[r.prefix] = true
	}
	for _, r := range p.narrow {
		cands[r.prefix] = true
	}
	keys := make([]string, 0, len(cands))
	for k := range cands {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if len(keys[i]) != len(keys[j]) {
			return len(keys[i]) < len(keys[j])
		}
		return keys[i] < keys[j]
	})
	verdict := func(name string) bool {
		return lookup(base, name) && (p.narrow == nil || lookup(p.narrow, name))
	}
	full := make([]rule, 0, len(keys))
	for _, k := range keys {
		full = append(full, rule{k, verdict(k)})
	}
	var out []rule
	for _, r := range full {
		if r.allow != lookup(shorterThan(full, len(r.prefix)), r.prefix) {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].prefix < out[j].prefix })
	return out
}

func shorterThan(rs []rule, n int) []rule {
	var out []rule
	for _, r := range rs {
		if len(r.prefix) < n {
			out = append(out, r)
		}
	}
	return out
}

// lookup is the trie's semantics: the longest rule whose prefix starts name
// decides; no rule means deny.
func lookup(rules []rule, name string) bool {
	best, allow := -1, false
	for _, r := range rules {
		if len(r.prefix) > best && strings.HasPrefix(name, r.prefix) {
			best, allow = len(r.prefix), r.allow
		}
	}
	return allow
}
