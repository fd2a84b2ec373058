package netsetup

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/atomicfile"
)

// state is what StateDir/netsetup.json holds: the endpoints (each one is an
// address allocation) and the addresses of this node's range that moved to
// another node with their container and stay reserved.
type state struct {
	Version   int                         `json:"version"`
	Next      netip.Addr                  `json:"next,omitzero"` // where the next-fit search starts
	Endpoints map[string]*record          `json:"endpoints"`
	Moved     map[netip.Addr]*movedRecord `json:"moved,omitempty"`
}

const stateVersion = 1

// record is one container's endpoint.
type record struct {
	ID       string     `json:"id"`
	IP       netip.Addr `json:"ip"`
	HostVeth string     `json:"host_veth"`
	Netns    string     `json:"netns"`
	Pinned   bool       `json:"pinned,omitempty"`  // the caller chose the address
	Standby  bool       `json:"standby,omitempty"` // host end kept down until Activate
	Ports    []Port     `json:"ports,omitempty"`   // published ports
	Created  time.Time  `json:"created"`
}

// movedRecord keeps an address of this node's range reserved after its
// container moved to peer: the address still lives on the segment, so it
// must not be handed out again here until ReleaseMoved (or until the same
// container comes back and pins it).
type movedRecord struct {
	ID   string    `json:"id"`
	Peer string    `json:"peer,omitempty"`
	At   time.Time `json:"at"`
}

func newState() *state {
	return &state{Version: stateVersion, Endpoints: map[string]*record{}, Moved: map[netip.Addr]*movedRecord{}}
}

// holders maps every address this node considers taken to its container id.
func (s *state) holders() map[netip.Addr]string {
	m := make(map[netip.Addr]string, len(s.Endpoints)+len(s.Moved))
	for id, r := range s.Endpoints {
		m[r.IP] = id
	}
	for a, mv := range s.Moved {
		m[a] = mv.ID
	}
	return m
}

// check is the reload check: a state that hands one address to two
// holders, or names a record under the wrong id, is refused.
func (s *state) check() error {
	if s.Version != stateVersion {
		return fmt.Errorf("version %d, want %d", s.Version, stateVersion)
	}
	seen := map[netip.Addr]string{}
	for id, r := range s.Endpoints {
		if r == nil || r.ID != id || validID(id) != nil || !r.IP.Is4() {
			return fmt.Errorf("endpoint %q: malformed record", id)
		}
		if other, dup := seen[r.IP]; dup {
			return fmt.Errorf("address %s held by both %q and %q", r.IP, other, id)
		}
		seen[r.IP] = id
	}
	for a, mv := range s.Moved {
		if mv == nil || !a.Is4() {
			return fmt.Errorf("moved address %s: malformed record", a)
		}
		if other, dup := seen[a]; dup {
			return fmt.Errorf("address %s held by %q and reserved for moved %q", a, other, mv.ID)
		}
		seen[a] = mv.ID
	}
	return nil
}

// allocate hands out the next free address of the node's range, next-fit
// from the last one handed out, so a just-released address is reused last.
func (s *state) allocate(cfg *Config) (netip.Addr, error) {
	taken := s.holders()
	size := prefixSize(cfg.IPRange)
	a := s.Next
	if !cfg.IPRange.Contains(a) {
		a = cfg.IPRange.Addr()
	}
	for i := uint64(0); i < size; i++ {
		if _, t := taken[a]; !t && hostAddr(cfg, a) {
			s.Next = a.Next()
			return a, nil
		}
		a = a.Next()
		if !cfg.IPRange.Contains(a) {
			a = cfg.IPRange.Addr()
		}
	}
	return netip.Addr{}, fmt.Errorf("ip-range %s: all %d addresses taken: %w", cfg.IPRange, len(taken), ErrExhausted)
}

// pin checks that a may be given to id: a host address of the subnet (it
// may lie outside this node's range: a migrated container keeps the address
// its first node gave it) that nobody else holds here. An address reserved
// for id itself after it moved away is given back to it.
func (s *state) pin(cfg *Config, id string, a netip.Addr) error {
	if !a.IsValid() || !a.Unmap().Is4() {
		return fmt.Errorf("address %s for %q: only IPv4 host addresses: %w", a, id, ErrInvalid)
	}
	a = a.Unmap()
	if !cfg.Subnet.Contains(a) {
		return fmt.Errorf("address %s for %q: outside subnet %s: %w", a, id, cfg.Subnet, ErrInvalid)
	}
	switch a {
	case cfg.Subnet.Addr():
		return fmt.Errorf("address %s for %q: the network address of %s: %w", a, id, cfg.Subnet, ErrInvalid)
	case broadcast(cfg.Subnet):
		return fmt.Errorf("address %s for %q: the broadcast address of %s: %w", a, id, cfg.Subnet, ErrInvalid)
	case cfg.Gateway:
		return fmt.Errorf("address %s for %q: this node's gateway: %w", a, id, ErrInUse)
	}
	if holder, taken := s.holders()[a]; taken && !(holder == id && s.Moved[a] != nil) {
		return fmt.Errorf("address %s for %q: already held by %q: %w", a, id, holder, ErrInUse)
	}
	delete(s.Moved, a)
	return nil
}

// reserve records rec, with the pinned address pin or, if pin is zero, the
// next free address of the node's range: the IPAM step of Setup.
func (st *store) reserve(cfg *Config, rec *record, pin netip.Addr) error {
	return st.update(func(s *state) error {
		if old := s.Endpoints[rec.ID]; old != nil {
			return fmt.Errorf("endpoint %q: exists with address %s: %w", rec.ID, old.IP, ErrInUse)
		}
		for _, other := range s.Endpoints {
			for _, q := range other.Ports {
				for _, p := range rec.Ports {
					if p.clashes(q) {
						return fmt.Errorf("container %q: port %s: host port published by %q (%s): %w", rec.ID, p, other.ID, q, ErrInUse)
					}
				}
			}
		}
		if pin.IsValid() {
			if err := s.pin(cfg, rec.ID, pin); err != nil {
				return err
			}
			rec.IP, rec.Pinned = pin.Unmap(), true
		} else {
			a, err := s.allocate(cfg)
			if err != nil {
				return fmt.Errorf("endpoint %q: %w", rec.ID, err)
			}
			rec.IP = a
		}
		s.Endpoints[rec.ID] = rec
		return nil
	})
}

// release drops id's endpoint record. With moved, an address of this
// node's own range stays reserved for id (it moved to peer); an address
// from another node's range needs no reservation: this node never hands
// it out.
func (st *store) release(cfg *Config, id string, moved bool, peer string) error {
	return st.update(func(s *state) error {
		r := s.Endpoints[id]
		if r == nil {
			return nil
		}
		delete(s.Endpoints, id)
		if moved && cfg.IPRange.Contains(r.IP) {
			s.Moved[r.IP] = &movedRecord{ID: id, Peer: peer, At: time.Now().UTC()}
		}
		return nil
	})
}

// store reads and writes the state file. Every change runs under an
// in-process mutex and an flock on StateDir/netsetup.lock, re-reads the
// file and writes it back create-temp + fsync + rename, so two managers on
// one state dir (or two goroutines) never hand out the same address.
type store struct {
	dir string
	mu  sync.Mutex
}

func (st *store) path() string { return filepath.Join(st.dir, stateFile) }

// update applies fn to the current state and persists the result if fn
// succeeds.
func (st *store) update(fn func(*state) error) error {
	return st.locked(func(s *state) (bool, error) {
		if err := fn(s); err != nil {
			return false, err
		}
		return true, nil
	})
}

// read returns a snapshot of the current state.
func (st *store) read() (*state, error) {
	var out *state
	err := st.locked(func(s *state) (bool, error) { out = s; return false, nil })
	return out, err
}

func (st *store) locked(fn func(*state) (save bool, err error)) (retErr error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	lf, err := os.OpenFile(filepath.Join(st.dir, lockFile), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return &OpError{Op: "open state lock", Err: err}
	}
	defer func() { _ = lf.Close() }()
	if err := flock(lf, unix.LOCK_EX); err != nil {
		return &OpError{Op: "lock state", Err: err}
	}
	defer func() { retErr = errors.Join(retErr, flock(lf, unix.LOCK_UN)) }()

	s := newState()
	switch err := atomicfile.ReadJSON(st.path(), s); {
	case errors.Is(err, fs.ErrNotExist):
		s = newState()
	case err != nil:
		return &OpError{Op: "read state " + st.path(), Err: err}
	}
	if s.Endpoints == nil {
		s.Endpoints = map[string]*record{}
	}
	if s.Moved == nil {
		s.Moved = map[netip.Addr]*movedRecord{}
	}
	if err := s.check(); err != nil {
		return &OpError{Op: "check state " + st.path(), Err: err}
	}
	save, err := fn(s)
	if err != nil || !save {
		return err
	}
	if err := atomicfile.WriteJSON(st.path(), s, 0o600); err != nil {
		return &OpError{Op: "save state", Err: err}
	}
	return nil
}

func flock(f *os.File, how int) error {
	for i := 0; i < 100; i++ { // EINTR only; bounded all the same
		err := unix.Flock(int(f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
	return unix.EINTR
}
