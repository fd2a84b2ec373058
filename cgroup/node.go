package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// ErrExhausted classes an admission refused because the guarantees asked for
// do not fit the node's allocatable capacity. The agent maps it to gRPC
// RESOURCE_EXHAUSTED.
var ErrExhausted = errors.New("resources exhausted")

// Resource names one elastic resource.
type Resource string

// The two elastic resources.
const (
	CPU    Resource = "cpu"
	Memory Resource = "memory"
)

// AllResources lists the elastic resources in a fixed order (reports, loops).
var AllResources = []Resource{CPU, Memory}

// Shortage is one resource an admission could not get.
type Shortage struct {
	Resource    Resource
	Asked       float64 // cores or bytes
	Free        float64 // allocatable minus everything guaranteed or reserved
	Allocatable float64
}

func (s Shortage) String() string {
	return fmt.Sprintf("%s: asked %s, free %s of allocatable %s", s.Resource,
		formatQuantity(s.Resource, s.Asked, roundUp), formatQuantity(s.Resource, s.Free, roundDown),
		formatQuantity(s.Resource, s.Allocatable, roundDown))
}

// ExhaustedError is an admission or reservation refused for lack of
// allocatable capacity. It names each short resource, what was asked and
// what is free, and unwraps to ErrExhausted.
type ExhaustedError struct {
	Op        string // "admit", "reserve" or "restore"
	ID        string
	Shortages []Shortage
}

func (e *ExhaustedError) Error() string {
	parts := make([]string, len(e.Shortages))
	for i, s := range e.Shortages {
		parts[i] = s.String()
	}
	return fmt.Sprintf("%s %q: %s: %v", e.Op, e.ID, strings.Join(parts, "; "), ErrExhausted)
}

// Unwrap makes errors.Is(err, ErrExhausted) hold.
func (e *ExhaustedError) Unwrap() error { return ErrExhausted }

// milli is a CPU amount in millicores: admission adds and compares integers,
// so a thousand admits and releases of 0.1 cores never drift.
type milli int64

func toMilli(cores float64) milli { return milli(math.Ceil(cores*1000 - 1e-9)) }

func (m milli) cores() float64 { return float64(m) / 1000 }

// book is an amount in admission units.
type book struct {
	cpu milli
	mem int64
}

func toBook(a Amount) book { return book{toMilli(a.CPU), a.Memory} }

func (b book) amount() Amount { return Amount{CPU: b.cpu.cores(), Memory: b.mem} }

func (b book) add(o book) book { return book{b.cpu + o.cpu, b.mem + o.mem} }

func (b book) sub(o book) book { return book{b.cpu - o.cpu, b.mem - o.mem} }

// Node is the node's admission book: capacity, the reservation held back for
// the system and ferryd, allocatable = capacity − reservation, and the
// guarantees of admitted containers and of incoming migrations. The sum of
// guarantees and migration reservations never exceeds allocatable. It is
// safe for concurrent use.
type Node struct {
	capacity, reserved, allocatable book

	mu       sync.Mutex
	admitted map[string]book // running (or being created) containers
	incoming map[string]book // reservations held for incoming migrations
}

// NewNode makes the book for a node of the given capacity, holding reserved
// back for the system and ferryd.
func NewNode(capacity, reserved Amount) (*Node, error) {
	for _, f := range []struct {
		name string
		a    Amount
	}{{"capacity", capacity}, {"reservation", reserved}} {
		if err := validAmount(f.a); err != nil {
			return nil, fmt.Errorf("node %s: %w", f.name, err)
		}
	}
	c, r := toBook(capacity), book{cpu: milli(math.Floor(reserved.CPU*1000 + 1e-9)), mem: reserved.Memory}
	c.cpu = milli(math.Floor(capacity.CPU*1000 + 1e-9))
	if r.cpu > c.cpu {
		return nil, fmt.Errorf("node cpu reservation %v above capacity %v cores: %w", reserved.CPU, capacity.CPU, ErrInvalid)
	}
	if r.mem > c.mem {
		return nil, fmt.Errorf("node memory reservation %s above capacity %s: %w", FormatSize(reserved.Memory), FormatSize(capacity.Memory), ErrInvalid)
	}
	return &Node{capacity: c, reserved: r, allocatable: c.sub(r),
		admitted: map[string]book{}, incoming: map[string]book{}}, nil
}

func validAmount(a Amount) error {
	if a.CPU < 0 || math.IsNaN(a.CPU) || math.IsInf(a.CPU, 0) {
		return fmt.Errorf("cpu %v: must be a non-negative number of cores: %w", a.CPU, ErrInvalid)
	}
	if a.Memory < 0 {
		return fmt.Errorf("memory %d: negative: %w", a.Memory, ErrInvalid)
	}
	return nil
}

// Capacity is the node's total CPU and memory.
func (n *Node) Capacity() Amount { return n.capacity.amount() }

// Reserved is what is held back for the system and ferryd.
func (n *Node) Reserved() Amount { return n.reserved.amount() }

// Allocatable is capacity minus the reservation: the most that can be guaranteed.
func (n *Node) Allocatable() Amount { return n.allocatable.amount() }

// Guaranteed is the sum of admitted guarantees and migration reservations.
func (n *Node) Guaranteed() Amount {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.sumLocked("").amount()
}

// Incoming is the part of Guaranteed held for incoming migrations.
func (n *Node) Incoming() Amount {
	n.mu.Lock()
	defer n.mu.Unlock()
	var s book
	for _, b := range n.incoming {
		s = s.add(b)
	}
	return s.amount()
}

// Free is allocatable minus Guaranteed (negative only after a Restore that
// found the node oversold).
func (n *Node) Free() Amount {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.allocatable.sub(n.sumLocked("")).amount()
}

// sumLocked sums every admission and reservation except those of id.
func (n *Node) sumLocked(except string) book {
	var s book
	for id, b := range n.admitted {
		if id != except {
			s = s.add(b)
		}
	}
	for id, b := range n.incoming {
		if id != except {
			s = s.add(b)
		}
	}
	return s
}

// shortagesLocked lists the resources for which adding ask (in place of
// whatever id holds now) would oversell allocatable.
func (n *Node) shortagesLocked(id string, ask book) []Shortage {
	free := n.allocatable.sub(n.sumLocked(id))
	var out []Shortage
	if ask.cpu > free.cpu {
		out = append(out, Shortage{CPU, ask.cpu.cores(), math.Max(free.cpu.cores(), 0), n.allocatable.cpu.cores()})
	}
	if ask.mem > free.mem {
		out = append(out, Shortage{Memory, float64(ask.mem), math.Max(float64(free.mem), 0), float64(n.allocatable.mem)})
	}
	return out
}

// Admit books guarantee g for container id, or refuses with an
// *ExhaustedError (errors.Is ErrExhausted) naming each short resource, what
// was asked and what is free. Admitting an id again resizes it (its old
// guarantee does not count against the new one); admitting an id that holds a
// migration reservation turns the reservation into the admission.
func (n *Node) Admit(id string, g Amount) error {
	return n.book("admit", id, g, n.admitted)
}

// Reserve holds guarantee g for an incoming migration of id, with the same
// check as Admit; Admit(id) converts it once the container is restored and
// Release(id) drops it if the migration fails.
func (n *Node) Reserve(id string, g Amount) error {
	n.mu.Lock()
	_, running := n.admitted[id]
	n.mu.Unlock()
	if running {
		return fmt.Errorf("reserve %q: a container of that name is already admitted here: %w", id, ErrInvalid)
	}
	return n.book("reserve", id, g, n.incoming)
}

func (n *Node) book(op, id string, g Amount, into map[string]book) error {
	if id == "" {
		return fmt.Errorf("%s: empty container id: %w", op, ErrInvalid)
	}
	if err := validAmount(g); err != nil {
		return fmt.Errorf("%s %q: guarantee %w", op, id, err)
	}
	ask := toBook(g)
	n.mu.Lock()
	defer n.mu.Unlock()
	if s := n.shortagesLocked(id, ask); len(s) > 0 {
		return &ExhaustedError{Op: op, ID: id, Shortages: s}
	}
	delete(n.admitted, id)
	delete(n.incoming, id)
	into[id] = ask
	return nil
}

// Release drops id's admission and any migration reservation it holds. It is
// idempotent.
func (n *Node) Release(id string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.admitted, id)
	delete(n.incoming, id)
}

// Admitted returns a copy of the admitted guarantees by container id.
func (n *Node) Admitted() map[string]Amount {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]Amount, len(n.admitted))
	for id, b := range n.admitted {
		out[id] = b.amount()
	}
	return out
}

// Restore replaces the admitted set with the guarantees of the containers
// that exist at ferryd start (id → guarantee), so nothing is counted twice;
// a reservation held under one of these ids is dropped (the migration
// landed). It never refuses a container that already runs: if the restored
// guarantees exceed allocatable (the reservation was raised, say) every one
// is still booked and the returned *ExhaustedError (op "restore") says by how
// much the node is oversold, for the agent to log; Admit then refuses until
// enough is released.
func (n *Node) Restore(existing map[string]Amount) error {
	next := make(map[string]book, len(existing))
	ids := make([]string, 0, len(existing))
	for id, g := range existing {
		if err := validAmount(g); err != nil {
			return fmt.Errorf("restore %q: guarantee %w", id, err)
		}
		next[id] = toBook(g)
		ids = append(ids, id)
	}
	sort.Strings(ids)
	n.mu.Lock()
	defer n.mu.Unlock()
	n.admitted = next
	for id := range next {
		delete(n.incoming, id)
	}
	total := n.sumLocked("")
	var short []Shortage
	if total.cpu > n.allocatable.cpu {
		short = append(short, Shortage{CPU, total.cpu.cores(), 0, n.allocatable.cpu.cores()})
	}
	if total.mem > n.allocatable.mem {
		short = append(short, Shortage{Memory, float64(total.mem), 0, float64(n.allocatable.mem)})
	}
	if len(short) > 0 {
		return &ExhaustedError{Op: "restore", ID: strings.Join(ids, ","), Shortages: short}
	}
	return nil
}

// DetectCapacity reads the host's capacity: online CPUs from
// <sysRoot>/devices/system/cpu/online (falling back to runtime.NumCPU) and
// MemTotal from <procRoot>/meminfo. Empty roots mean /sys and /proc.
func DetectCapacity(procRoot, sysRoot string) (Amount, error) {
	if procRoot == "" {
		procRoot = "/proc"
	}
	if sysRoot == "" {
		sysRoot = "/sys"
	}
	var a Amount
	if b, err := os.ReadFile(filepath.Join(sysRoot, "devices/system/cpu/online")); err == nil {
		n, perr := countCPUList(strings.TrimSpace(string(b)))
		if perr != nil {
			return Amount{}, fmt.Errorf("parse %s/devices/system/cpu/online: %w", sysRoot, perr)
		}
		a.CPU = float64(n)
	} else {
		a.CPU = float64(runtime.NumCPU())
	}
	mem, err := readMeminfo(filepath.Join(procRoot, "meminfo"), "MemTotal")
	if err != nil {
		return Amount{}, err
	}
	a.Memory = mem
	return a, nil
}

// countCPUList counts the CPUs in a kernel cpu list such as "0-3,8,10-11".
func countCPUList(s string) (int, error) {
	n := 0
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("cpu list %q: %w", s, err)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return 0, fmt.Errorf("cpu list %q: bad range %q", s, part)
			}
		}
		n += b - a + 1
	}
	return n, nil
}

// readMeminfo returns one /proc/meminfo field in bytes.
func readMeminfo(path, field string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != field {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			break
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s %s %q: %w", path, field, v, err)
		}
		if len(f) > 1 && f[1] == "kB" {
			n <<= 10
		}
		return n, nil
	}
	return 0, fmt.Errorf("%s: no %s line", path, field)
}

// DefaultReservation is what ferryd holds back for the system and itself when
// the configuration names no reservation: 5% of the CPUs (at least 0.1 core)
// and 5% of memory (at least 256Mi, at most 4Gi). The kernel, sshd, journald,
// ferryd and one small monitor process per container must find room that no
// container was promised; 5% matches the order of the node reservations of
// managed Kubernetes on small and medium nodes without their tiers.
func DefaultReservation(capacity Amount) Amount {
	cpu := math.Max(0.1, capacity.CPU*0.05)
	mem := capacity.Memory / 20
	mem = max(mem, 256<<20)
	mem = min(mem, 4<<30)
	return Amount{CPU: math.Min(math.Round(cpu*1000)/1000, capacity.CPU), Memory: min(mem, capacity.Memory)}
}
