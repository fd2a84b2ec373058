package sysctlguard

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// The BPF side of the guard. Each container gets its own instance of the
// program and of its three maps:
//
//	policy  LPM trie: key {prefixlen u32, name [maxName]byte} -> u32 verdict
//	        (1 allow, 0 deny), filled from Policy.rules().
//	stats   array of two u64: [statDenied] writes refused, [statLost] events
//	        that did not fit in the ring.
//	events  ring buffer of denied writes: {ktime u64, prefixlen u32, name}.
//
// The program lets every read through; for a write it reads the full name
// ("net/ipv4/ip_local_port_range") into a zeroed stack buffer that is laid
// out so that it is at once the trie key and the event record, looks it up,
// and on deny counts, emits the event and returns 0 (the kernel turns that
// into EPERM).
const (
	progName   = "ferry_sysctl"
	policyName = "ferry_sg_policy"
	statsName  = "ferry_sg_stats"
	eventsName = "ferry_sg_events"

	statDenied = 0
	statLost   = 1

	// ringSize holds about 100 events (152 bytes each with the header):
	// enough for bursts while ferryd reads; the denied counter stays exact
	// beyond that, and statLost counts what the ring dropped.
	ringSize = 16 << 10

	// Stack layout, as offsets from the frame pointer. The record (time,
	// key, name) spans offTime..-5 and is followed by 4 bytes of padding.
	offTime    = -144        // u64 ktime: the event record starts here
	offKey     = offTime + 8 // u32 prefixlen: the trie key starts here
	offName    = offKey + 4  // name, maxName bytes
	offStatKey = offTime - 8 // u32 index into stats
	eventSize  = 8 + 4 + maxName
	keySize    = 4 + maxName
	keyBits    = 8 * maxName // prefixlen of a lookup key: all of it
	trieFlags  = 1           // BPF_F_NO_PREALLOC, which LPM tries require
	verdictLen = 4           // u32 verdict
)

func policySpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{
		Name: policyName, Type: ebpf.LPMTrie, Flags: trieFlags,
		KeySize: keySize, ValueSize: verdictLen, MaxEntries: maxRules,
	}
}

func statsSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: statsName, Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 2}
}

func eventsSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: eventsName, Type: ebpf.RingBuf, MaxEntries: ringSize}
}

// programSpec builds the program around the given maps' descriptors.
func programSpec(policy, stats, events *ebpf.Map) *ebpf.ProgramSpec {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		// struct bpf_sysctl { __u32 write; __u32 file_pos; }: reads pass.
		asm.LoadMem(asm.R7, asm.R6, 0, asm.Word),
		asm.JNE.Imm(asm.R7, 0, "write"),
		asm.Mov.Imm(asm.R0, 1),
		asm.Return(),
	}
	// Zero the record: the lookup key and the event must not carry stack garbage.
	insns = append(insns, asm.Mov.Imm(asm.R1, 0).WithSymbol("write"))
	for off := int16(offTime); off < 0; off += 8 {
		insns = append(insns, asm.StoreMem(asm.RFP, off, asm.R1, asm.DWord))
	}
	insns = append(insns,
		asm.StoreImm(asm.RFP, offKey, keyBits, asm.Word),
		// bpf_sysctl_get_name(ctx, name, maxName, 0): the full name, NUL
		// terminated; truncated (-E2BIG) names still end in NUL, and every
		// rule is shorter than maxName, so the lookup below stays exact.
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, offName),
		asm.Mov.Imm(asm.R3, maxName),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnSysctlGetName.Call(),
		// verdict = bpf_map_lookup_elem(&policy, key)
		asm.LoadMapPtr(asm.R1, policy.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, offKey),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "deny"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.JEq.Imm(asm.R1, 0, "deny"),
		asm.Mov.Imm(asm.R0, 1),
		asm.Return(),

		// stats[statDenied]++
		asm.StoreImm(asm.RFP, offStatKey, statDenied, asm.Word).WithSymbol("deny"),
		asm.LoadMapPtr(asm.R1, stats.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, offStatKey),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "emit"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),

		// event.time = bpf_ktime_get_ns(); bpf_ringbuf_output(&events, &event, eventSize, 0)
		asm.FnKtimeGetNs.Call().WithSymbol("emit"),
		asm.StoreMem(asm.RFP, offTime, asm.R0, asm.DWord),
		asm.LoadMapPtr(asm.R1, events.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, offTime),
		asm.Mov.Imm(asm.R3, eventSize),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.JEq.Imm(asm.R0, 0, "reject"),

		// The ring was full: stats[statLost]++
		asm.StoreImm(asm.RFP, offStatKey, statLost, asm.Word),
		asm.LoadMapPtr(asm.R1, stats.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, offStatKey),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "reject"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),

		asm.Mov.Imm(asm.R0, 0).WithSymbol("reject"),
		asm.Return(),
	)
	return &ebpf.ProgramSpec{
		Name:         progName,
		Type:         ebpf.CGroupSysctl,
		AttachType:   ebpf.AttachCGroupSysctl,
		Instructions: insns,
		// No GPL-only helper is called; the string only labels the program.
		License: "ferry",
	}
}

// trieKey is the policy map's key for a rule's prefix.
func trieKey(prefix string) ([]byte, error) {
	if len(prefix) > maxName-1 {
		return nil, fmt.Errorf("sysctl rule %q: longer than %d bytes: %w", prefixToPattern(prefix), maxName-1, ErrInvalid)
	}
	k := make([]byte, keySize)
	binary.NativeEndian.PutUint32(k, uint32(8*len(prefix)))
	copy(k[4:], prefix)
	return k, nil
}

// trieEntries decodes a policy map's contents.
func trieEntries(m *ebpf.Map) (map[string]bool, error) {
	out := map[string]bool{}
	var k []byte
	var v uint32
	it := m.Iterate()
	for it.Next(&k, &v) {
		if len(k) != keySize {
			return nil, fmt.Errorf("policy map: key of %d bytes, want %d", len(k), keySize)
		}
		n := binary.NativeEndian.Uint32(k) / 8
		if n > maxName {
			return nil, fmt.Errorf("policy map: prefix length %d bits", n*8)
		}
		out[string(k[4:4+n])] = v != 0
	}
	return out, it.Err()
}

// event is a denied write as the program records it.
type rawEvent struct {
	ktime uint64
	name  string
}

func decodeEvent(b []byte) (rawEvent, error) {
	if len(b) < eventSize {
		return rawEvent{}, fmt.Errorf("event of %d bytes, want %d", len(b), eventSize)
	}
	name := b[12 : 12+maxName]
	for i, c := range name {
		if c == 0 {
			name = name[:i]
			break
		}
	}
	return rawEvent{ktime: binary.NativeEndian.Uint64(b), name: string(name)}, nil
}
