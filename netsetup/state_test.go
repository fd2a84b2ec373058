package netsetup

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func testIPAM(t *testing.T, subnet, rng string) (*Config, *store) {
	t.Helper()
	cfg := baseConfig()
	cfg.Subnet = netip.MustParsePrefix(subnet)
	if rng != "" {
		cfg.IPRange = netip.MustParsePrefix(rng)
	}
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	return &cfg, &store{dir: t.TempDir()}
}

func reserve(t *testing.T, cfg *Config, st *store, id, pin string) (netip.Addr, error) {
	t.Helper()
	rec := &record{ID: id, HostVeth: VethName(id)}
	var p netip.Addr
	if pin != "" {
		p = netip.MustParseAddr(pin)
	}
	err := st.reserve(cfg, rec, p)
	return rec.IP, err
}

func mustReserve(t *testing.T, cfg *Config, st *store, id, pin string) netip.Addr {
	t.Helper()
	a, err := reserve(t, cfg, st, id, pin)
	if err != nil {
		t.Fatalf("reserve %q pin %q: %v", id, pin, err)
	}
	return a
}

func TestIPAMAllocatesRangeWithoutSpecialAddresses(t *testing.T) {
	// Subnet /29: .0 network, .7 broadcast, .1 gateway: 5 addresses to hand out.
	cfg, st := testIPAM(t, "10.9.0.0/29", "")
	var got []string
	for i := 0; i < 5; i++ {
		got = append(got, mustReserve(t, cfg, st, fmt.Sprintf("c%d", i), "").String())
	}
	if want := "[10.9.0.2 10.9.0.3 10.9.0.4 10.9.0.5 10.9.0.6]"; fmt.Sprint(got) != want {
		t.Fatalf("allocated %v, want %s", got, want)
	}
	if _, err := reserve(t, cfg, st, "c5", ""); !errors.Is(err, ErrExhausted) {
		t.Fatalf("6th allocation: %v, want ErrExhausted", err)
	}
	// Freed addresses come back once the next-fit search wraps around.
	for _, id := range []string{"c3", "c1"} {
		if err := st.release(cfg, id, false, ""); err != nil {
			t.Fatal(err)
		}
	}
	if a := mustReserve(t, cfg, st, "d1", ""); a.String() != "10.9.0.3" {
		t.Fatalf("after freeing .5 and .3: got %s, want 10.9.0.3 (next-fit wraps from .7)", a)
	}
	if a := mustReserve(t, cfg, st, "d2", ""); a.String() != "10.9.0.5" {
		t.Fatalf("got %s, want 10.9.0.5", a)
	}
}

func TestIPAMRangeSlice(t *testing.T) {
	// Node B's slice starts mid-subnet: its gateway is .64, its first
	// container address .65; the last address of the slice is no broadcast.
	cfg, st := testIPAM(t, "10.9.0.0/24", "10.9.0.64/30")
	var got []string
	for i := 0; i < 3; i++ {
		got = append(got, mustReserve(t, cfg, st, fmt.Sprintf("c%d", i), "").String())
	}
	if want := "[10.9.0.65 10.9.0.66 10.9.0.67]"; fmt.Sprint(got) != want {
		t.Fatalf("allocated %v, want %s", got, want)
	}
	if _, err := reserve(t, cfg, st, "c3", ""); !errors.Is(err, ErrExhausted) {
		t.Fatalf("4th: %v, want ErrExhausted", err)
	}
}

func TestIPAMPin(t *testing.T) {
	cfg, st := testIPAM(t, "10.9.0.0/24", "10.9.0.0/26")
	mustReserve(t, cfg, st, "a", "10.9.0.10")
	// Outside this node's range but inside the subnet: a migrated container.
	if a := mustReserve(t, cfg, st, "m", "10.9.0.100"); a.String() != "10.9.0.100" {
		t.Fatalf("pin: got %s", a)
	}
	for pin, want := range map[string]error{
		"10.9.0.10":         ErrInUse, // taken by a
		"10.9.0.100":        ErrInUse, // taken by m
		"10.9.0.1":          ErrInUse, // the gateway
		"10.9.0.0":          ErrInvalid,
		"10.9.0.255":        ErrInvalid,
		"10.10.0.5":         ErrInvalid,
		"fd00::5":           ErrInvalid,
		"::ffff:10.9.0.100": ErrInUse, // mapped form of a taken address
	} {
		if _, err := reserve(t, cfg, st, "x", pin); !errors.Is(err, want) {
			t.Errorf("pin %s: %v, want %v", pin, err, want)
		}
	}
	// The same id twice.
	if _, err := reserve(t, cfg, st, "a", ""); !errors.Is(err, ErrInUse) {
		t.Errorf("second endpoint for a: %v, want ErrInUse", err)
	}
	// Allocation skips pinned addresses.
	for i := 0; i < 8; i++ {
		if a := mustReserve(t, cfg, st, fmt.Sprintf("n%d", i), ""); a.String() == "10.9.0.10" {
			t.Fatalf("allocated the pinned address")
		}
	}
	s, err := st.read()
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Endpoints) != 10 {
		t.Fatalf("%d endpoints recorded, want 10 (failed pins must record nothing)", len(s.Endpoints))
	}
}

func TestIPAMMovedAddressStaysReserved(t *testing.T) {
	cfg, st := testIPAM(t, "10.9.0.0/29", "")
	a := mustReserve(t, cfg, st, "web", "")
	foreign := mustReserve(t, cfg, st, "guest", "10.9.0.6") // in range too here; see below
	_ = foreign
	// web migrates away: its address stays reserved for it.
	if err := st.release(cfg, "web", true, "node-b"); err != nil {
		t.Fatal(err)
	}
	if _, err := reserve(t, cfg, st, "other", a.String()); !errors.Is(err, ErrInUse) {
		t.Fatalf("pin of a moved address by another id: %v, want ErrInUse", err)
	}
	for i := 0; i < 3; i++ { // .3 .4 .5: everything but the moved .2 and .6
		if b := mustReserve(t, cfg, st, fmt.Sprintf("n%d", i), ""); b == a {
			t.Fatalf("moved address %s handed out again", a)
		}
	}
	if _, err := reserve(t, cfg, st, "n3", ""); !errors.Is(err, ErrExhausted) {
		t.Fatalf("want ErrExhausted while %s is reserved: %v", a, err)
	}
	// web comes back and pins its address: the reservation turns into its endpoint.
	if b := mustReserve(t, cfg, st, "web", a.String()); b != a {
		t.Fatalf("moved back: got %s, want %s", b, a)
	}
	if s, _ := st.read(); len(s.Moved) != 0 {
		t.Fatalf("reservation left after moving back: %v", s.Moved)
	}
	// Away again, then released for good.
	if err := st.release(cfg, "web", true, "node-b"); err != nil {
		t.Fatal(err)
	}
	m := &Manager{closing: make(chan struct{}), cfg: *cfg, st: st, log: discardLog()}
	if err := m.ReleaseMoved(t.Context(), "web"); err != nil {
		t.Fatal(err)
	}
	if b := mustReserve(t, cfg, st, "n3", ""); b != a {
		t.Fatalf("after ReleaseMoved: got %s, want %s", b, a)
	}
}

func TestIPAMMovedForeignAddressNotReserved(t *testing.T) {
	// On the destination, a pinned address from the source's range is not
	// this node's to reserve when it moves on.
	cfg, st := testIPAM(t, "10.9.0.0/24", "10.9.0.64/26")
	mustReserve(t, cfg, st, "web", "10.9.0.5")
	if err := st.release(cfg, "web", true, "node-c"); err != nil {
		t.Fatal(err)
	}
	if s, _ := st.read(); len(s.Moved) != 0 || len(s.Endpoints) != 0 {
		t.Fatalf("state after moving a foreign address on: %+v", s)
	}
}

func TestIPAMPersistsAcrossReload(t *testing.T) {
	cfg, st := testIPAM(t, "10.9.0.0/24", "")
	a := mustReserve(t, cfg, st, "a", "")
	b := mustReserve(t, cfg, st, "b", "10.9.0.77")
	// A new store on the same directory: a restarted ferryd.
	st2 := &store{dir: st.dir}
	s, err := st2.read()
	if err != nil {
		t.Fatal(err)
	}
	if s.Endpoints["a"].IP != a || s.Endpoints["b"].IP != b || !s.Endpoints["b"].Pinned {
		t.Fatalf("reloaded %+v", s.Endpoints)
	}
	if _, err := reserve(t, cfg, st2, "c", a.String()); !errors.Is(err, ErrInUse) {
		t.Fatalf("after reload, pin of a's address: %v", err)
	}
	if c := mustReserve(t, cfg, st2, "c", ""); c == a || c == b {
		t.Fatalf("after reload, handed out %s again", c)
	}
	// No temp file is left next to the state.
	ents, _ := os.ReadDir(st.dir)
	for _, e := range ents {
		if e.Name() != stateFile && e.Name() != lockFile {
			t.Errorf("left in state dir: %s", e.Name())
		}
	}
}

func TestIPAMRefusesCorruptState(t *testing.T) {
	for name, body := range map[string]string{
		"duplicate": `{"version":1,"endpoints":{"a":{"id":"a","ip":"10.9.0.2"},"b":{"id":"b","ip":"10.9.0.2"}}}`,
		"wrong id":  `{"version":1,"endpoints":{"a":{"id":"b","ip":"10.9.0.2"}}}`,
		"version":   `{"version":7,"endpoints":{}}`,
		"moved dup": `{"version":1,"endpoints":{"a":{"id":"a","ip":"10.9.0.2"}},"moved":{"10.9.0.2":{"id":"x"}}}`,
		"garbage":   `{"version":1,`,
	} {
		cfg, st := testIPAM(t, "10.9.0.0/24", "")
		if err := os.WriteFile(filepath.Join(st.dir, stateFile), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := reserve(t, cfg, st, "c", ""); err == nil {
			t.Errorf("%s: reserve on corrupt state succeeded", name)
		}
	}
}

func TestIPAMNoDoubleAllocationUnderConcurrency(t *testing.T) {
	cfg, st := testIPAM(t, "10.9.0.0/25", "")
	// Two stores on one directory (two managers, or a restart racing the old
	// process) and many goroutines: the flock and the re-read keep every
	// address unique; exactly the range's 125 addresses are handed out.
	stores := []*store{st, {dir: st.dir}}
	const workers, each = 10, 15
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[netip.Addr]string{}
	exhausted := 0
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				id := fmt.Sprintf("w%d-%d", w, i)
				rec := &record{ID: id}
				err := stores[w%2].reserve(cfg, rec, netip.Addr{})
				mu.Lock()
				switch {
				case errors.Is(err, ErrExhausted):
					exhausted++
				case err != nil:
					t.Error(err)
				default:
					if other, dup := got[rec.IP]; dup {
						t.Errorf("%s handed to %s and %s", rec.IP, other, id)
					}
					got[rec.IP] = id
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(got) != 125 || exhausted != workers*each-125 {
		t.Fatalf("%d allocated, %d exhausted; want 125 and %d", len(got), exhausted, workers*each-125)
	}
	s, err := st.read()
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Endpoints) != 125 {
		t.Fatalf("state holds %d endpoints, want 125", len(s.Endpoints))
	}
}
