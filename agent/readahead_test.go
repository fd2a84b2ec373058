package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/ferry-agent/ferry/agent/api"
)

const (
	testPage = 4096
	pmParent = 1 << 0 // PE_PARENT
)

// pageContent is what the fake memory holds at a page: its process and
// address, then a filler.
func pageContent(id, addr uint64) []byte {
	b := bytes.Repeat([]byte{byte(addr>>12) | 1}, testPage)
	binary.LittleEndian.PutUint64(b, id)
	binary.LittleEndian.PutUint64(b[8:], addr)
	return b
}

// fakePageServer serves GETs as CRIU's lazy dump does: pages from the
// page pipe's iovs, an answer clamped at the end of the iov it starts in,
// and a request outside every iov a fatal error (the connection closes).
type fakePageServer struct {
	iovs    map[uint64][]span
	breakAt int // after this many GETs the server dies (0: never)

	mu   sync.Mutex
	gets []psi
	bad  []psi
}

// serve reports whether the session ended with the client's CLOSE.
func (s *fakePageServer) serve(c net.Conn) bool {
	defer func() { _ = c.Close() }()
	b := make([]byte, psiSize)
	for {
		if _, err := io.ReadFull(c, b); err != nil {
			return false
		}
		p := getPSI(b)
		switch p.cmd & psCmdMask {
		case psIOVGet:
		case psIOVClose:
			_, _ = c.Write([]byte{0, 0, 0, 0})
			_, _ = io.Copy(io.Discard, c) // until the other side closes
			return true
		default:
			return false
		}
		s.mu.Lock()
		s.gets = append(s.gets, p)
		n := len(s.gets)
		var iov *span
		for i, v := range s.iovs[p.dstID] {
			if v.start <= p.vaddr && p.vaddr < v.end {
				iov = &s.iovs[p.dstID][i]
			}
		}
		if iov == nil {
			s.bad = append(s.bad, p)
		}
		s.mu.Unlock()
		if iov == nil || (s.breakAt > 0 && n >= s.breakAt) {
			return false
		}
		nr := min(p.nr, (iov.end-p.vaddr)/testPage)
		out := make([]byte, psiSize, psiSize+nr*testPage)
		psi{cmd: pmPresent<<16 | psIOVAddF, nr: nr, vaddr: p.vaddr, dstID: p.dstID}.put(out)
		for i := uint64(0); i < nr; i++ {
			out = append(out, pageContent(p.dstID, p.vaddr+i*testPage)...)
		}
		if _, err := c.Write(out); err != nil {
			return false
		}
	}
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	return c, s
}

// chanTunnel is one direction of a page tunnel in memory: what one end
// sends the other receives (copied, as gRPC's marshalling does); end is
// the sender's end of the stream (its handler returned, or CloseSend).
type chanTunnel struct {
	ch    chan *api.TunnelChunk
	ended chan struct{}
	once  sync.Once
}

func newChanTunnel() *chanTunnel {
	return &chanTunnel{ch: make(chan *api.TunnelChunk, 64), ended: make(chan struct{})}
}

func (c *chanTunnel) send(ch *api.TunnelChunk) error {
	cp := &api.TunnelChunk{Data: bytes.Clone(ch.Data), Eof: ch.Eof}
	select {
	case c.ch <- cp:
		return nil
	case <-c.ended:
		return errors.New("tunnel closed")
	}
}

func (c *chanTunnel) recv() (*api.TunnelChunk, error) {
	select {
	case ch := <-c.ch:
		return ch, nil
	case <-c.ended:
		select {
		case ch := <-c.ch:
			return ch, nil
		default:
			return nil, io.EOF
		}
	}
}

func (c *chanTunnel) end() { c.once.Do(func() { close(c.ended) }) }

// fakeDaemon requests pages as criu lazy-pages does: per process one
// background request at a time from its first missing range, 64 KiB
// growing by 64 KiB to 4 MiB, reset by a fault; faults (one page
// elsewhere) now and then. It checks every answer and returns the pages
// it got.
func fakeDaemon(t *testing.T, c net.Conn, ranges lazyRanges, faults bool) (got map[pageKey]int, asked int, err error) {
	type proc struct {
		missing spanSet
		xfer    uint64
		busy    bool
	}
	procs := map[uint64]*proc{}
	var ids []uint64
	for id, ss := range ranges {
		p := &proc{xfer: 64 << 10}
		for _, s := range ss {
			p.missing.add(s)
		}
		procs[id] = p
		ids = append(ids, id)
	}
	got = map[pageKey]int{}
	type req struct {
		psi
		bg bool
	}
	var queue []req
	rng := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, psiSize)
	ask := func(p psi, bg bool) error {
		p.cmd = psIOVGet
		p.put(b)
		queue = append(queue, req{p, bg})
		asked++
		_, err := c.Write(b)
		return err
	}
	remaining := func() bool {
		for _, p := range procs {
			if len(p.missing) > 0 {
				return true
			}
		}
		return false
	}
	for n := 0; remaining() || len(queue) > 0; n++ {
		for _, id := range ids {
			p := procs[id]
			if p.busy || len(p.missing) == 0 {
				continue
			}
			s := p.missing[0]
			end := min(s.end, s.start+p.xfer)
			p.xfer = min(p.xfer+64<<10, 4<<20)
			p.busy = true
			if err := ask(psi{nr: (end - s.start) / testPage, vaddr: s.start, dstID: id}, true); err != nil {
				return got, asked, err
			}
		}
		if faults && n%7 == 3 {
			id := ids[rng.IntN(len(ids))]
			p := procs[id]
			if len(p.missing) > 1 { // a page in the last missing range
				s := p.missing[len(p.missing)-1]
				addr := s.start + uint64(rng.IntN(int((s.end-s.start)/testPage)))*testPage
				queued := false
				for _, q := range queue {
					queued = queued || (q.dstID == id && q.vaddr <= addr && addr < q.vaddr+q.nr*testPage)
				}
				if !queued {
					p.xfer = 64 << 10
					if err := ask(psi{nr: 1, vaddr: addr, dstID: id}, false); err != nil {
						return got, asked, err
					}
				}
			}
		}
		if len(queue) == 0 {
			continue
		}
		q := queue[0]
		queue = queue[1:]
		if _, err := io.ReadFull(c, b); err != nil {
			return got, asked, err
		}
		h := getPSI(b)
		if h.vaddr != q.vaddr || h.dstID != q.dstID || h.nr == 0 || h.nr > q.nr {
			t.Errorf("answer %d pages at %#x of %d to a request of %d at %#x of %d", h.nr, h.vaddr, h.dstID, q.nr, q.vaddr, q.dstID)
			return got, asked, errors.New("bad answer")
		}
		data := make([]byte, h.nr*testPage)
		if _, err := io.ReadFull(c, data); err != nil {
			return got, asked, err
		}
		for i := uint64(0); i < h.nr; i++ {
			addr := h.vaddr + i*testPage
			if !bytes.Equal(data[i*testPage:(i+1)*testPage], pageContent(h.dstID, addr)) {
				t.Errorf("page %#x of %d: wrong contents", addr, h.dstID)
			}
			got[pageKey{h.dstID, addr}]++
		}
		p := procs[h.dstID]
		if q.bg {
			p.busy = false
		}
		// What came is no longer missing (spanSet has no remove: rebuild).
		var left spanSet
		for _, s := range p.missing {
			for a := s.start; a < s.end; a += testPage {
				if got[pageKey{h.dstID, a}] == 0 {
					left.add(span{a, a + testPage})
				}
			}
		}
		p.missing = left
	}
	if faults {
		// A process forked after the restore asks for pages its parent
		// has (criu/uffd.c copies the parent's ranges to the child).
		for id, ss := range ranges {
			s := ss[0]
			if err := ask(psi{nr: 8, vaddr: s.start, dstID: id}, false); err != nil {
				return got, asked, err
			}
			if _, err := io.ReadFull(c, b); err != nil {
				return got, asked, err
			}
			h := getPSI(b)
			data := make([]byte, h.nr*testPage)
			if _, err := io.ReadFull(c, data); err != nil {
				return got, asked, err
			}
			if h.vaddr != s.start || h.nr == 0 || !bytes.Equal(data[:testPage], pageContent(id, s.start)) {
				t.Errorf("the forked child's request at %#x of %d: answered %d pages at %#x", s.start, id, h.nr, h.vaddr)
			}
			queue = queue[1:]
		}
	}
	psi{cmd: psIOVClose}.put(b)
	if _, err := c.Write(b); err != nil {
		return got, asked, err
	}
	st := make([]byte, 4)
	if _, err := io.ReadFull(c, st); err != nil {
		return got, asked, err
	}
	return got, asked, c.Close()
}

// readAheadRig joins a fake daemon, a readAhead, a page tunnel, the
// source's pump and a fake page server.
func readAheadRig(t *testing.T, srv *fakePageServer, ranges lazyRanges) (daemon net.Conn, ra *readAhead, run func() error) {
	t.Helper()
	toSrc, toDst := newChanTunnel(), newChanTunnel()
	t.Cleanup(func() { toSrc.end(); toDst.end() })
	psConn, srvEnd := tcpPair(t)
	go func() {
		if !srv.serve(srvEnd) {
			toDst.end() // the source's agent ends the tunnel when its dump fails
		}
	}()
	srcDone := make(chan error, 1)
	go func() {
		err := pump(psConn, toDst.send, toSrc.recv, nil, nil)
		toDst.end() // the source's stream ends with its pump
		srcDone <- err
	}()
	dmn, raEnd := tcpPair(t)
	ra = newReadAhead(raEnd, toSrc.send, toDst.recv, ranges)
	return dmn, ra, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := ra.run(ctx)
		toSrc.end() // and the destination's with its handler
		t.Log(ra.logAttrs()...)
		select {
		case serr := <-srcDone:
			return errors.Join(err, serr)
		case <-time.After(10 * time.Second):
			return errors.Join(err, errors.New("the source's pump did not end"))
		}
	}
}

func testRanges() (lazyRanges, map[uint64][]span) {
	const mi = 1 << 20
	ranges := lazyRanges{
		1: {{0x10000000, 0x10000000 + 9*mi + 3*testPage}, {0x20000000, 0x20000000 + 64*testPage}},
		7: {{0x7f0000000000, 0x7f0000000000 + 5*mi}},
	}
	// The page server's iovs split the first range: answers get clamped.
	iovs := map[uint64][]span{
		1: {{0x10000000, 0x10000000 + 2*mi + testPage}, {0x10000000 + 2*mi + testPage, 0x10000000 + 9*mi + 3*testPage},
			{0x20000000, 0x20000000 + 64*testPage}},
		7: {{0x7f0000000000, 0x7f0000000000 + 5*mi}},
	}
	return ranges, iovs
}

func TestReadAheadServesEveryPageOnce(t *testing.T) {
	for _, faults := range []bool{false, true} {
		t.Run(map[bool]string{false: "background", true: "with faults"}[faults], func(t *testing.T) {
			ranges, iovs := testRanges()
			srv := &fakePageServer{iovs: iovs}
			dmn, ra, run := readAheadRig(t, srv, ranges)
			res := make(chan error, 1)
			go func() { res <- run() }()
			got, asked, derr := fakeDaemon(t, dmn, ranges, faults)
			if derr != nil {
				t.Fatalf("daemon: %v", derr)
			}
			if err := <-res; err != nil {
				t.Fatalf("read-ahead: %v", err)
			}
			want := 0
			for id, ss := range ranges {
				for _, s := range ss {
					for a := s.start; a < s.end; a += testPage {
						want++
						if n := got[pageKey{id, a}]; n != 1 {
							t.Errorf("page %#x of %d came %d times", a, id, n)
						}
					}
				}
			}
			if len(got) != want {
				t.Errorf("the daemon got %d pages, want %d", len(got), want)
			}
			srv.mu.Lock()
			defer srv.mu.Unlock()
			if len(srv.bad) > 0 {
				t.Errorf("requests outside every range reached the page server: %+v", srv.bad)
			}
			// Most of the daemon's requests found their pages here.
			ra.mu.Lock()
			ready, gets := ra.ready, ra.gets
			ra.mu.Unlock()
			if gets != int64(asked) || ready < gets/2 {
				t.Errorf("of the daemon's %d requests (%d seen) %d found their first page here: no read-ahead", asked, gets, ready)
			}
		})
	}
}

func TestReadAheadSourceDies(t *testing.T) {
	ranges, iovs := testRanges()
	srv := &fakePageServer{iovs: iovs, breakAt: 3}
	dmn, _, run := readAheadRig(t, srv, ranges)
	res := make(chan error, 1)
	go func() { res <- run() }()
	_, _, derr := fakeDaemon(t, dmn, ranges, false)
	err := <-res
	if err == nil {
		t.Fatal("read-ahead ended well after its source died")
	}
	if derr == nil {
		t.Fatal("the daemon finished although the source died")
	}
	t.Logf("read-ahead: %v; daemon: %v", err, derr)
}

func TestReadAheadRefusesWhatCRIUNeverSends(t *testing.T) {
	for _, c := range []struct {
		name string
		p    psi
		want string
	}{
		{"a dump's command", psi{cmd: 1 /* PS_IOV_ADD */}, "unexpected page server command"},
		{"no pages", psi{cmd: psIOVGet, vaddr: 0x10000000, dstID: 1}, "a request for no pages"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ranges, iovs := testRanges()
			dmn, _, run := readAheadRig(t, &fakePageServer{iovs: iovs}, ranges)
			res := make(chan error, 1)
			go func() { res <- run() }()
			b := make([]byte, psiSize)
			c.p.put(b)
			if _, err := dmn.Write(b); err != nil {
				t.Fatal(err)
			}
			err := <-res
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
			// The daemon's connection is closed (nothing was asked, so
			// nothing is answered first).
			_ = dmn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, rerr := dmn.Read(b); rerr == nil || os.IsTimeout(rerr) {
				t.Fatalf("the daemon's connection is still open: read %d bytes, %v", n, rerr)
			}
		})
	}
}

func TestSpanSet(t *testing.T) {
	var s spanSet
	for _, x := range []span{{10, 20}, {30, 40}, {20, 25}, {50, 60}, {24, 31}, {0, 5}} {
		s.add(x)
	}
	want := spanSet{{0, 5}, {10, 40}, {50, 60}}
	if len(s) != len(want) {
		t.Fatalf("got %v, want %v", s, want)
	}
	for i := range want {
		if s[i] != want[i] {
			t.Fatalf("got %v, want %v", s, want)
		}
	}
	for a, in := range map[uint64]bool{0: true, 4: true, 5: false, 9: false, 10: true, 39: true, 40: false, 59: true, 60: false} {
		if s.contains(a) != in {
			t.Errorf("contains(%d) = %v", a, !in)
		}
	}
}

// writePagemap writes a pagemap image as CRIU 4 does: nr_pages in field 5,
// compat_nr_pages (field 2) zero.
func writePagemap(t *testing.T, path string, entries []struct{ vaddr, nr, flags uint64 }, compat bool) {
	t.Helper()
	mm := magic.LoadMagic()
	b := binary.LittleEndian.AppendUint32(nil, uint32(mm.ByName["IMG_COMMON"]))
	b = binary.LittleEndian.AppendUint32(b, uint32(mm.ByName["PAGEMAP"]))
	head := protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 1)
	b = append(binary.LittleEndian.AppendUint32(b, uint32(len(head))), head...)
	for _, e := range entries {
		var m []byte
		m = protowire.AppendVarint(protowire.AppendTag(m, 1, protowire.VarintType), e.vaddr)
		if compat {
			m = protowire.AppendVarint(protowire.AppendTag(m, 2, protowire.VarintType), e.nr)
		} else {
			m = protowire.AppendVarint(protowire.AppendTag(m, 2, protowire.VarintType), 0)
		}
		m = protowire.AppendVarint(protowire.AppendTag(m, 4, protowire.VarintType), e.flags)
		if !compat {
			m = protowire.AppendVarint(protowire.AppendTag(m, 5, protowire.VarintType), e.nr)
		}
		b = append(binary.LittleEndian.AppendUint32(b, uint32(len(m))), m...)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestReadLazyRanges(t *testing.T) {
	dir := t.TempDir()
	type e = struct{ vaddr, nr, flags uint64 }
	writePagemap(t, filepath.Join(dir, "pagemap-1.img"), []e{
		{0x400000, 3, pmPresent},           // in the images: not lazy
		{0x7f0000, 2, pmLazy},              // lazy
		{0x600000, 256, pmLazy | pmParent}, // lazy, from a parent
	}, false)
	writePagemap(t, filepath.Join(dir, "pagemap-42.img"), []e{{0x1000, 1, pmLazy}}, true) // an older CRIU
	writePagemap(t, filepath.Join(dir, "pagemap-shmem-9.img"), []e{{0x1000, 1, pmLazy}}, false)
	r, err := readLazyRanges(dir, testPage)
	if err != nil {
		t.Fatal(err)
	}
	if len(r) != 2 || len(r[1]) != 2 || r[1][0] != (span{0x600000, 0x600000 + 256*testPage}) ||
		r[1][1] != (span{0x7f0000, 0x7f0000 + 2*testPage}) || len(r[42]) != 1 || r[42][0] != (span{0x1000, 0x2000}) {
		t.Fatalf("got %v", r)
	}
	if err := os.WriteFile(filepath.Join(dir, "pagemap-5.img"), []byte("garbage!"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readLazyRanges(dir, testPage); err == nil {
		t.Fatal("a broken pagemap read without error")
	}
}

func TestTunnelReaderPages(t *testing.T) {
	// Pages 0..5 in chunks cut anywhere: whole pages alias their chunk,
	// split ones are joined; the EOF mark ends the stream.
	var all []byte
	for i := uint64(0); i < 6; i++ {
		all = append(all, pageContent(3, i*testPage)...)
	}
	cuts := []int{testPage + 100, 10, 3*testPage - 50, len(all) - (4*testPage + 60)}
	var chunks []*api.TunnelChunk
	at := 0
	for _, c := range cuts {
		chunks = append(chunks, &api.TunnelChunk{Data: all[at : at+c]})
		at += c
	}
	chunks = append(chunks, &api.TunnelChunk{Eof: true})
	r := &tunnelReader{recv: func() (*api.TunnelChunk, error) {
		c := chunks[0]
		chunks = chunks[1:]
		return c, nil
	}}
	pages, err := r.readPages(6, testPage)
	if err != nil {
		t.Fatal(err)
	}
	for i, pg := range pages {
		if !bytes.Equal(pg, pageContent(3, uint64(i)*testPage)) {
			t.Errorf("page %d: wrong contents", i)
		}
	}
	if &pages[0][0] != &all[0] {
		t.Error("page 0, whole in its chunk, was copied")
	}
	if _, err := r.readPages(1, testPage); !errors.Is(err, io.EOF) {
		t.Errorf("after the EOF mark: %v", err)
	}
}
