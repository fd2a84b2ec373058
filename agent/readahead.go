package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/ferry-agent/ferry/agent/api"
)

// Post-copy read-ahead on the destination.
//
// CRIU's lazy-pages daemon fetches the pages it has not got with one
// request at a time per process, each of 64 KiB growing by 64 KiB up to
// 4 MiB and back to 64 KiB after every page fault (criu/uffd.c), and waits
// for each answer before it asks again. Through the page tunnel every
// request pays the round trip through both agents, gRPC and TLS, so the
// tunnel idles most of the time. The destination's ferryd therefore speaks
// the page server's protocol (criu/page-xfer.c) on the daemon's connection
// itself: it keeps a few large requests of its own in flight to the
// source's page server, in the order the daemon's background transfer
// walks the lazy ranges (ascending by address, from the pagemap images it
// already has), holds their pages, and answers the daemon's requests from
// them. A request for a page it has neither got nor asked for (a fault
// elsewhere) goes to the source at once, as before.
//
// The protocol: the daemon sends 32-byte page_server_iov records (cmd,
// nr_pages, vaddr, dst_id); PS_IOV_GET asks for nr_pages from vaddr of
// process dst_id, and the page server answers in order with a record
// (nr_pages may be fewer: it stops at the end of a range) and the pages;
// PS_IOV_CLOSE ends the session, answered by a 4-byte status. The daemon
// checks only an answer's count, address and process, and takes fewer
// pages than it asked for (it asks again for the rest).

const (
	psiSize          = 32
	psCmdMask        = 0xffff
	psIOVAddF        = 6
	psIOVGet         = 7
	psIOVClose       = 0x1023
	psIOVForceClose  = 0x1024
	pmPresent        = 1 << 2 // PE_PRESENT
	pmLazy           = 1 << 1 // PE_LAZY
	psCloseStatusLen = 4

	// A read-ahead request asks for raChunkMin at first, twice as much as
	// the one before up to raChunk, and raChunkMin again after each request
	// on demand; raInFlight may be out at once, raHold is the most bytes
	// held or awaited ahead of the daemon. A fault's request queues at the
	// source behind the read-ahead out, so that is kept small while the
	// restored tasks fault (as the daemon itself does, criu/uffd.c), and
	// 3 MiB otherwise, enough to keep the tunnel busy (measured at
	// 1024 MiB: 4 MiB x 3 moved the pages no faster and the workload's
	// downtime was half as long again).
	raChunkMin = 64 << 10
	raChunk    = 1 << 20
	raInFlight = 3
	raHold     = 64 << 20
)

// psi is a page_server_iov record.
type psi struct {
	cmd              uint32
	nr, vaddr, dstID uint64
}

func (p psi) put(b []byte) {
	clear(b[:psiSize])
	binary.LittleEndian.PutUint32(b[0:], p.cmd)
	binary.LittleEndian.PutUint64(b[8:], p.nr)
	binary.LittleEndian.PutUint64(b[16:], p.vaddr)
	binary.LittleEndian.PutUint64(b[24:], p.dstID)
}

func getPSI(b []byte) psi {
	return psi{cmd: binary.LittleEndian.Uint32(b[0:]), nr: binary.LittleEndian.Uint64(b[8:]),
		vaddr: binary.LittleEndian.Uint64(b[16:]), dstID: binary.LittleEndian.Uint64(b[24:])}
}

// span is the byte range [start, end).
type span struct{ start, end uint64 }

// lazyRanges are the lazy pagemap entries of each process (by its id in
// the images, which is the page server's dst_id), in ascending order.
type lazyRanges map[uint64][]span

// readLazyRanges reads the lazy entries of every pagemap-PID.img in dir.
func readLazyRanges(dir string, pageSize uint64) (lazyRanges, error) {
	names, err := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	if err != nil {
		return nil, err
	}
	out := lazyRanges{}
	for _, name := range names {
		id, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(name), "pagemap-"), ".img"), 10, 64)
		if err != nil {
			continue // pagemap-shmem-ID.img: never lazy
		}
		spans, err := readPagemap(name, pageSize)
		if err != nil {
			return nil, err
		}
		if len(spans) > 0 {
			out[id] = spans
		}
	}
	return out, nil
}

// readPagemap returns the lazy entries of a pagemap image: its magic
// (IMG_COMMON, then PAGEMAP), then entries each after its 32-bit length,
// the first a pagemap_head. The entries are read by hand: go-criu's copy of
// pagemap.proto predates nr_pages (field 5), which CRIU writes instead of
// compat_nr_pages (field 2) since 3.x.
func readPagemap(name string, pageSize uint64) ([]span, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	mm := magic.LoadMagic()
	if len(b) < 8 || binary.LittleEndian.Uint32(b) != uint32(mm.ByName["IMG_COMMON"]) ||
		binary.LittleEndian.Uint32(b[4:]) != uint32(mm.ByName["PAGEMAP"]) {
		return nil, fmt.Errorf("%s: not a pagemap image", name)
	}
	b = b[8:]
	var spans []span
	for first := true; len(b) > 0; first = false {
		if len(b) < 4 || uint64(len(b)-4) < uint64(binary.LittleEndian.Uint32(b)) {
			return nil, fmt.Errorf("%s: truncated entry", name)
		}
		n := binary.LittleEndian.Uint32(b)
		e := b[4 : 4+n]
		b = b[4+n:]
		if first {
			continue // pagemap_head
		}
		var vaddr, nr, compat, flags uint64
		for len(e) > 0 {
			num, typ, l := protowire.ConsumeTag(e)
			if l < 0 {
				return nil, fmt.Errorf("%s: malformed entry: %w", name, protowire.ParseError(l))
			}
			e = e[l:]
			if typ != protowire.VarintType {
				if l = protowire.ConsumeFieldValue(num, typ, e); l < 0 {
					return nil, fmt.Errorf("%s: malformed entry: %w", name, protowire.ParseError(l))
				}
				e = e[l:]
				continue
			}
			v, l := protowire.ConsumeVarint(e)
			if l < 0 {
				return nil, fmt.Errorf("%s: malformed entry: %w", name, protowire.ParseError(l))
			}
			e = e[l:]
			switch num {
			case 1:
				vaddr = v
			case 2:
				compat = v
			case 4:
				flags = v
			case 5:
				nr = v
			}
		}
		if nr == 0 {
			nr = compat
		}
		if flags&pmLazy != 0 && nr > 0 {
			spans = append(spans, span{vaddr, vaddr + nr*pageSize})
		}
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].start < spans[j].start })
	return spans, nil
}

// spanSet is a set of byte ranges, kept sorted and merged.
type spanSet []span

func (s spanSet) find(a uint64) int { // the first span ending after a
	return sort.Search(len(s), func(i int) bool { return s[i].end > a })
}

func (s spanSet) contains(a uint64) bool {
	i := s.find(a)
	return i < len(s) && s[i].start <= a
}

func (s *spanSet) add(x span) {
	i := s.find(x.start)
	if i > 0 && (*s)[i-1].end == x.start {
		i--
	}
	j := i
	for j < len(*s) && (*s)[j].start <= x.end {
		x.start, x.end = min(x.start, (*s)[j].start), max(x.end, (*s)[j].end)
		j++
	}
	*s = slices.Replace(*s, i, j, x)
}

type pageKey struct{ dstID, addr uint64 }

// fetch is a GET sent to the source's page server.
type fetch struct {
	p     psi
	ahead bool // ferryd's own, not the daemon's
}

// readAhead answers a lazy-pages daemon's requests, fetching from the
// source's page server through the tunnel (send, recv) ahead of it.
type readAhead struct {
	conn     net.Conn // the daemon's
	send     func(*api.TunnelChunk) error
	recv     func() (*api.TunnelChunk, error)
	pageSize uint64
	ranges   lazyRanges
	wake     chan struct{}

	mu      sync.Mutex
	err     error
	chunk   uint64  // bytes of the next read-ahead request
	pending []psi   // the daemon's GETs not yet answered, in order
	sent    []fetch // GETs out at the source, answered in this order
	pages   map[pageKey][]byte
	held    int64 // bytes in pages and in read-ahead GETs out
	ahead   int   // read-ahead GETs out
	cursor  map[uint64]uint64
	given   map[uint64]*spanSet // pages the daemon has: not read ahead
	lastDst uint64
	closeAt *psi   // the daemon's CLOSE
	status  []byte // the answer to CLOSE, for the daemon
	closed  bool   // the source's answer to CLOSE came
	srcEOF  bool
	dmnEOF  bool

	// what happened, for the log
	gets, ready, pagesOut, onDemand, aheadGets, aheadBytes int64
}

func newReadAhead(conn net.Conn, send func(*api.TunnelChunk) error, recv func() (*api.TunnelChunk, error), ranges lazyRanges) *readAhead {
	return &readAhead{conn: conn, send: send, recv: recv, pageSize: uint64(os.Getpagesize()), ranges: ranges,
		chunk: raChunkMin, wake: make(chan struct{}, 1),
		pages: map[pageKey][]byte{}, cursor: map[uint64]uint64{}, given: map[uint64]*spanSet{}}
}

func (r *readAhead) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *readAhead) fail(err error) {
	r.mu.Lock()
	if r.err == nil {
		r.err = err
	}
	r.mu.Unlock()
	r.poke()
}

// run serves the daemon until the session ends (its CLOSE answered and
// both sides closed) or fails; conn is closed on return.
func (r *readAhead) run(ctx context.Context) error {
	defer func() { _ = r.conn.Close() }()
	go r.readDaemon()
	go r.readSource()
	eofSent := false
	for {
		select {
		case <-r.wake:
		case <-ctx.Done():
			return ctx.Err()
		}
		r.mu.Lock()
		if r.err != nil {
			err := r.err
			r.mu.Unlock()
			return err
		}
		answers, gets := r.plan()
		status := r.status
		r.status = nil
		done := r.srcEOF && r.dmnEOF && eofSent
		sendEOF := r.dmnEOF && !eofSent
		r.mu.Unlock()

		if len(gets) > 0 {
			if err := r.send(&api.TunnelChunk{Data: gets}); err != nil {
				return fmt.Errorf("tunnel send: %w", err)
			}
		}
		for _, a := range answers {
			if _, err := a.WriteTo(r.conn); err != nil {
				return fmt.Errorf("answer the lazy-pages daemon: %w", err)
			}
		}
		if status != nil {
			if _, err := r.conn.Write(status); err != nil {
				return fmt.Errorf("answer the lazy-pages daemon: %w", err)
			}
		}
		if sendEOF {
			if err := r.send(&api.TunnelChunk{Eof: true}); err != nil {
				return fmt.Errorf("tunnel send: %w", err)
			}
			eofSent = true
			r.poke()
		}
		if done {
			if tc, ok := r.conn.(interface{ CloseWrite() error }); ok {
				_ = tc.CloseWrite()
			}
			return nil
		}
	}
}

// plan, with r.mu held, takes the answers it can give now and the GETs to
// send (encoded, in order).
func (r *readAhead) plan() (answers []net.Buffers, gets []byte) {
	ps := r.pageSize
	// Answers, in the daemon's order: as many pages from the first as are
	// here in a row.
	for len(r.pending) > 0 {
		p := r.pending[0]
		var bufs net.Buffers
		n := uint64(0)
		for ; n < p.nr; n++ {
			k := pageKey{p.dstID, p.vaddr + n*ps}
			pg, ok := r.pages[k]
			if !ok {
				break
			}
			if n == 0 {
				bufs = append(bufs, make([]byte, psiSize))
			}
			bufs = append(bufs, pg)
			delete(r.pages, k)
			r.held -= int64(ps)
		}
		if n == 0 {
			break
		}
		psi{cmd: pmPresent<<16 | psIOVAddF, nr: n, vaddr: p.vaddr, dstID: p.dstID}.put(bufs[0])
		r.givenTo(p.dstID).add(span{p.vaddr, p.vaddr + n*ps})
		r.pending = r.pending[1:]
		r.pagesOut += int64(n)
		answers = append(answers, bufs)
	}
	get := func(f fetch) {
		r.sent = append(r.sent, f)
		b := make([]byte, psiSize)
		f.p.put(b)
		gets = append(gets, b...)
	}
	// Whatever the daemon waits for that is neither here nor asked for
	// goes to the source as the daemon asked.
	for _, p := range r.pending {
		if _, ok := r.pages[pageKey{p.dstID, p.vaddr}]; ok || r.asked(p.dstID, p.vaddr) {
			continue
		}
		get(fetch{p: p})
		r.onDemand++
		r.chunk = raChunkMin
	}
	// Read ahead: the process the daemon asked for last first, then the
	// others in order.
	for r.ahead < raInFlight && r.held+raChunk <= raHold {
		p, ok := r.next(r.lastDst)
		if !ok {
			ids := make([]uint64, 0, len(r.ranges))
			for id := range r.ranges {
				ids = append(ids, id)
			}
			slices.Sort(ids)
			for _, id := range ids {
				if p, ok = r.next(id); ok {
					break
				}
			}
		}
		if !ok {
			break
		}
		get(fetch{p: p, ahead: true})
		r.chunk = min(2*r.chunk, raChunk)
		r.ahead++
		r.held += int64(p.nr * ps)
		r.aheadGets++
	}
	if r.closeAt != nil && len(r.pending) == 0 {
		// The daemon has every page it wants. The page server's answer
		// to CLOSE is always 0, and CRIU corks its socket, so the answer
		// would wait out the cork's 200 ms: the daemon gets it from here
		// at once, and the source's is checked when it comes.
		b := make([]byte, psiSize)
		r.closeAt.put(b)
		gets = append(gets, b...)
		r.closeAt = nil
		r.sent = append(r.sent, fetch{p: psi{cmd: psIOVClose}})
		r.status = make([]byte, psCloseStatusLen)
	}
	return answers, gets
}

func (r *readAhead) givenTo(id uint64) *spanSet {
	s := r.given[id]
	if s == nil {
		s = &spanSet{}
		r.given[id] = s
	}
	return s
}

// asked says whether a GET out at the source covers the page.
func (r *readAhead) asked(id, addr uint64) bool {
	for _, f := range r.sent {
		if f.p.cmd == psIOVGet && f.p.dstID == id && f.p.vaddr <= addr && addr < f.p.vaddr+f.p.nr*r.pageSize {
			return true
		}
	}
	return false
}

// next is the next read-ahead GET for process id: up to one chunk from
// its cursor within one lazy range, past what the daemon already has.
func (r *readAhead) next(id uint64) (psi, bool) {
	given := r.givenTo(id)
	at := r.cursor[id]
	for _, s := range r.ranges[id] {
		if s.end <= at {
			continue
		}
		a := max(at, s.start)
		for a < s.end && given.contains(a) {
			a = (*given)[given.find(a)].end
		}
		if a >= s.end {
			at = s.end
			continue
		}
		end := min(s.end, a+r.chunk)
		if i := given.find(a); i < len(*given) && (*given)[i].start < end {
			end = (*given)[i].start
		}
		r.cursor[id] = end
		return psi{cmd: psIOVGet, nr: (end - a) / r.pageSize, vaddr: a, dstID: id}, true
	}
	r.cursor[id] = at
	return psi{}, false
}

// readDaemon takes the daemon's requests.
func (r *readAhead) readDaemon() {
	b := make([]byte, psiSize)
	for {
		if _, err := io.ReadFull(r.conn, b); err != nil {
			if errors.Is(err, io.EOF) {
				r.mu.Lock()
				r.dmnEOF = true
				r.mu.Unlock()
				r.poke()
				return
			}
			r.fail(fmt.Errorf("read the lazy-pages daemon's request: %w", err))
			return
		}
		p := getPSI(b)
		r.mu.Lock()
		switch p.cmd & psCmdMask {
		case psIOVGet:
			if p.nr == 0 {
				r.mu.Unlock()
				r.fail(fmt.Errorf("lazy-pages daemon: a request for no pages at %#x of %d", p.vaddr, p.dstID))
				return
			}
			if _, ok := r.pages[pageKey{p.dstID, p.vaddr}]; ok {
				r.ready++
			}
			r.pending = append(r.pending, p)
			r.lastDst = p.dstID
			r.gets++
		case psIOVClose & psCmdMask, psIOVForceClose & psCmdMask:
			r.closeAt = &p
		default:
			r.mu.Unlock()
			r.fail(fmt.Errorf("lazy-pages daemon: unexpected page server command %#x", p.cmd))
			return
		}
		r.mu.Unlock()
		r.poke()
	}
}

// readSource takes the page server's answers, in the order of r.sent.
func (r *readAhead) readSource() {
	src := &tunnelReader{recv: r.recv}
	hdr := make([]byte, psiSize)
	for {
		if err := src.wait(); err != nil {
			if errors.Is(err, io.EOF) {
				r.mu.Lock()
				ok := r.closed
				r.srcEOF = true
				r.mu.Unlock()
				if !ok {
					r.fail(errors.New("the source's page server ended with requests open"))
					return
				}
				r.poke()
				return
			}
			r.fail(err)
			return
		}
		r.mu.Lock()
		if len(r.sent) == 0 {
			r.mu.Unlock()
			r.fail(errors.New("the source's page server sent what nobody asked for"))
			return
		}
		f := r.sent[0]
		r.mu.Unlock()
		if f.p.cmd == psIOVClose {
			st := make([]byte, psCloseStatusLen)
			if _, err := io.ReadFull(src, st); err != nil {
				r.fail(fmt.Errorf("the source's page server's last answer: %w", err))
				return
			}
			if v := int32(binary.LittleEndian.Uint32(st)); v != 0 {
				r.fail(fmt.Errorf("the source's page server ended its session with status %d", v))
				return
			}
			r.mu.Lock()
			r.sent, r.closed = r.sent[1:], true
			r.mu.Unlock()
			r.poke()
			continue
		}
		if _, err := io.ReadFull(src, hdr); err != nil {
			r.fail(fmt.Errorf("the source's page server's answer: %w", err))
			return
		}
		h := getPSI(hdr)
		if h.vaddr != f.p.vaddr || h.dstID != f.p.dstID || h.nr == 0 || h.nr > f.p.nr {
			r.fail(fmt.Errorf("the source's page server answered %d pages at %#x of %d for a request of %d at %#x of %d",
				h.nr, h.vaddr, h.dstID, f.p.nr, f.p.vaddr, f.p.dstID))
			return
		}
		data, err := src.readPages(h.nr, r.pageSize)
		if err != nil {
			r.fail(fmt.Errorf("the source's page server's pages: %w", err))
			return
		}
		r.mu.Lock()
		r.sent = r.sent[1:]
		if f.ahead {
			r.ahead--
			r.held -= int64(f.p.nr * r.pageSize)
			r.aheadBytes += int64(h.nr * r.pageSize)
		}
		given := r.givenTo(h.dstID)
		for i := uint64(0); i < h.nr; i++ {
			k := pageKey{h.dstID, h.vaddr + i*r.pageSize}
			// A page read ahead that the daemon got meanwhile is not
			// kept; one it asked for again (a process forked after the
			// restore asks for its parent's pages) is.
			if _, ok := r.pages[k]; ok || (f.ahead && given.contains(k.addr)) {
				continue
			}
			r.pages[k] = data[i]
			r.held += int64(r.pageSize)
		}
		r.mu.Unlock()
		r.poke()
	}
}

// logAttrs say how the daemon's requests were answered, for the log.
func (r *readAhead) logAttrs() []any {
	r.mu.Lock()
	defer r.mu.Unlock()
	return []any{"daemon_requests", r.gets, "daemon_pages", r.pagesOut, "found_here", r.ready,
		"ahead_requests", r.aheadGets, "ahead_mib", r.aheadBytes >> 20, "on_demand", r.onDemand}
}

// tunnelReader reads the data of a tunnel's chunks as one stream; the
// sender's EOF mark is its io.EOF.
type tunnelReader struct {
	recv func() (*api.TunnelChunk, error)
	buf  []byte
	eof  bool
}

// wait blocks until there is data to read, or the stream ended.
func (t *tunnelReader) wait() error {
	for len(t.buf) == 0 {
		if t.eof {
			return io.EOF
		}
		ch, err := t.recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF // the peer ended without its EOF mark
			}
			return fmt.Errorf("tunnel receive: %w", err)
		}
		t.buf, t.eof = ch.Data, ch.Eof
	}
	return nil
}

// readPages reads n pages of size bytes. A page that lies within one
// chunk is that chunk's bytes, not a copy (a received chunk's data is its
// own: protobuf copies it out of gRPC's buffers); a page split between
// chunks is copied together.
func (t *tunnelReader) readPages(n, size uint64) ([][]byte, error) {
	out := make([][]byte, 0, n)
	for uint64(len(out)) < n {
		if err := t.wait(); err != nil {
			return nil, err
		}
		if uint64(len(t.buf)) >= size {
			out = append(out, t.buf[:size:size])
			t.buf = t.buf[size:]
			continue
		}
		pg := make([]byte, size)
		if _, err := io.ReadFull(t, pg); err != nil {
			return nil, err
		}
		out = append(out, pg)
	}
	return out, nil
}

func (t *tunnelReader) Read(p []byte) (int, error) {
	if err := t.wait(); err != nil {
		return 0, err
	}
	n := copy(p, t.buf)
	t.buf = t.buf[n:]
	return n, nil
}
