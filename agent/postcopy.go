package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"google.golang.org/grpc/metadata"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/internal/atomicfile"
	"github.com/ferry-agent/ferry/internal/privnet"
	"github.com/ferry-agent/ferry/migrate"
)

// Post-copy carries CRIU's page traffic between the agents in a PageTunnel
// stream of the mutual-TLS channel; at neither end can another process
// reach it:
//
//	source: CRIU dump --lazy-pages, its page server on 127.0.0.1:lazyPort
//	        of a private network namespace (internal/privnet) <- ferryd
//	        dials it
//	   ===== PageTunnel (gRPC, mutual TLS) =====
//	dest:   `criu lazy-pages` on one end of a Unix socket pair
//	        (--ps-socket), ferryd on the other (preparePages), answering
//	        the daemon itself and reading ahead (readahead.go); `criu
//	        restore --lazy-pages` hands the restored tasks' userfaultfds to
//	        that daemon (through the monitor's relay, lazysock.go, so that
//	        the two start together)
//
// The source's namespace is the migration's own, so the one fixed port
// never collides.
const (
	lazyHost = "127.0.0.1"
	lazyPort = 2700
)

var lazyAddr = net.JoinHostPort(lazyHost, strconv.Itoa(lazyPort))

// lazyDump is the source's half: the dump serving pages until the peer
// has them all.
type lazyDump struct {
	ns   *privnet.NS
	conn net.Conn   // to CRIU's page server, once it listens
	done chan error // the dump's end: nil when every page was served
}

// startLazyDump dumps the (frozen) container with its memory left in
// CRIU's page pipes, and returns once CRIU's page server takes the
// connection ferryd will tunnel. optLazy sets libcontainer's LazyPages and
// PageServer options: false when the container's CRIU configuration file
// says lazy-pages and where to serve instead (criuconf.go).
func (a *Agent) startLazyDump(ctx context.Context, lc *libcontainer.Container, images, work string, optLazy bool) (_ *lazyDump, retErr error) {
	ns, err := privnet.New()
	if err != nil {
		return nil, err
	}
	d := &lazyDump{ns: ns, done: make(chan error, 1)}
	defer func() {
		if retErr != nil {
			_ = ns.Close()
		}
	}()
	go func() {
		// CRIU (criu swrk) is started on a thread in this namespace, so
		// its page server listens there (and, where the host's /run is no
		// tmpfs, with criuview's /run).
		opts := finalDumpOpts()
		opts.ImagesDirectory, opts.WorkDirectory, opts.StatusFd = images, work, -1
		if optLazy {
			opts.LazyPages, opts.PageServer = true, libcontainer.CriuPageServerInfo{Address: lazyHost, Port: lazyPort}
		}
		d.done <- a.criuView.Do(func() error {
			if err := ns.Join(); err != nil {
				return err
			}
			return criuDump(lc, &opts, nil)
		})
	}()
	// The page server listens once the dump is written.
	c, err := dialWhenListening(ctx, ns, d.done, 5*time.Minute)
	var ended *endedEarly
	switch {
	case errors.As(err, &ended):
		if ended.err == nil {
			ended.err = errors.New("CRIU ended without serving the pages")
		}
		return nil, fmt.Errorf("dump: %w%s", ended.err, criuLogTail(filepath.Join(work, "dump.log")))
	case err != nil:
		return nil, errors.Join(fmt.Errorf("dump: CRIU's page server: %w", err), d.abort())
	}
	d.conn = c
	return d, nil
}

// endedEarly is dialWhenListening's error when the process that was to
// listen ended first; err is how it ended.
type endedEarly struct{ err error }

func (e *endedEarly) Error() string { return fmt.Sprintf("ended before it listened: %v", e.err) }

// dialWhenListening connects to lazyAddr in ns as soon as a CRIU server
// there listens: it takes one connection, so the dial that succeeds is the
// one to use. It gives up when ended yields (that process's end, as an
// *endedEarly), when ctx ends, or after within.
func dialWhenListening(ctx context.Context, ns *privnet.NS, ended <-chan error, within time.Duration) (net.Conn, error) {
	deadline := time.Now().Add(within)
	for {
		select {
		case err := <-ended:
			return nil, &endedEarly{err: err}
		case <-ctx.Done():
			return nil, ctx.Err()
		default:
		}
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := ns.Dial(dctx, lazyAddr)
		cancel()
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("not listening within %s: %w", within, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// abort ends a dump whose pages will not be fetched: closing the page
// server's connection makes CRIU fail, resuming the tasks as it found them
// (frozen by ferryd), and waits for it.
func (d *lazyDump) abort() error {
	if d.conn == nil {
		// Not taken yet: a connection closed at once ends the page server
		// waiting for one (if it listens by now).
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		d.conn, _ = d.ns.Dial(ctx, lazyAddr)
		cancel()
	}
	if d.conn != nil {
		_ = d.conn.Close()
	}
	var err error
	select {
	case err = <-d.done:
		d.done <- err
	case <-time.After(2 * time.Minute):
		err = errors.New("CRIU's lazy dump did not end 2 minutes after its connection closed")
	}
	_ = d.ns.Close()
	return err
}

// criuLogTail returns the end of a CRIU log (its last 600 bytes), for
// error messages.
func criuLogTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 600 {
		b = b[len(b)-600:]
	}
	return " (" + filepath.Base(path) + ": ..." + string(b) + ")"
}

// openTunnelStream opens a PageTunnel (its metadata: the migration, and
// what ctx adds) and pumps conn through it; the channel yields the end.
func openTunnelStream(ctx context.Context, peer api.FerryClient, id string, conn net.Conn, pace *pacer, sent *atomic.Int64) (<-chan error, error) {
	stream, err := openTunnel(ctx, peer, id)
	if err != nil {
		return nil, err
	}
	return runTunnel(stream, conn, pace, sent), nil
}

// openTunnel opens a PageTunnel and names its migration; the peer sets up
// its end (a page server, or the lazy-pages daemon's connection) at once.
// Until runTunnel, nothing moves.
func openTunnel(ctx context.Context, peer api.FerryClient, id string) (api.Ferry_PageTunnelClient, error) {
	stream, err := peer.PageTunnel(metadata.AppendToOutgoingContext(ctx, MigrationIDKey, id))
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&api.TunnelChunk{MigrationId: id}); err != nil {
		return nil, err
	}
	return stream, nil
}

// runTunnel pumps conn through an open tunnel; the channel yields the end.
func runTunnel(stream api.Ferry_PageTunnelClient, conn net.Conn, pace *pacer, sent *atomic.Int64) <-chan error {
	done := make(chan error, 1)
	go func() {
		err := pump(conn, stream.Send, stream.Recv, pace, sent)
		if cerr := stream.CloseSend(); err == nil {
			err = cerr
		}
		done <- err
	}()
	return done
}

// pump copies between a CRIU connection and a tunnel stream until both
// directions have ended (each end sends an EOF mark when its side closes
// its writing half) or either fails; conn is closed on return.
func pump(conn net.Conn, send func(*api.TunnelChunk) error, recv func() (*api.TunnelChunk, error), pace *pacer, sent *atomic.Int64) error {
	defer func() { _ = conn.Close() }()
	errc := make(chan error, 2)
	var once sync.Once
	fail := func() { once.Do(func() { _ = conn.Close() }) } // unblocks the other direction
	go func() {                                             // CRIU -> peer
		buf := make([]byte, 1<<20)
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetReadBuffer(4 << 20)
		}
		for {
			n, err := conn.Read(buf)
			if n > 0 {
				if serr := send(&api.TunnelChunk{Data: buf[:n]}); serr != nil {
					fail()
					errc <- fmt.Errorf("tunnel send: %w", serr)
					return
				}
				if sent != nil {
					sent.Add(int64(n))
				}
				pace.wait(n)
			}
			if errors.Is(err, io.EOF) {
				errc <- send(&api.TunnelChunk{Eof: true})
				return
			}
			if err != nil {
				fail()
				errc <- fmt.Errorf("read CRIU's connection: %w", err)
				return
			}
		}
	}()
	go func() { // peer -> CRIU
		for {
			ch, err := recv()
			if err != nil {
				fail()
				if errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF // the peer ended without its EOF mark
				}
				errc <- fmt.Errorf("tunnel receive: %w", err)
				return
			}
			if len(ch.Data) > 0 {
				if _, err := conn.Write(ch.Data); err != nil {
					fail()
					errc <- fmt.Errorf("write CRIU's connection: %w", err)
					return
				}
			}
			if ch.Eof {
				if tc, ok := conn.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
				errc <- nil
				return
			}
		}
	}()
	return errors.Join(<-errc, <-errc)
}

// pacer holds a stream of writes to a rate in bytes per second (0: none).
type pacer struct {
	rate  float64
	start time.Time
	n     int64
}

func newPacer(rate int64) *pacer { return &pacer{rate: float64(rate), start: time.Now()} }

func (p *pacer) wait(n int) {
	if p == nil || p.rate <= 0 {
		return
	}
	p.n += int64(n)
	due := p.start.Add(time.Duration(float64(p.n) / p.rate * float64(time.Second)))
	if d := time.Until(due); d > 0 {
		time.Sleep(d)
	}
}

// The destination's half.

// preparePages makes the incoming migration's private namespace, and for
// post-copy the socket pair of the lazy-pages daemon's page server
// connection: the daemon takes one end (criu's --ps-socket), ferryd answers
// on the other. A Unix socket, not TCP: CRIU corks its page server
// socket and pushes only its requests, so on TCP its last message (CLOSE)
// waited out the cork's 200 ms.
func (in *incoming) preparePages() error {
	ns, err := privnet.New()
	if err != nil {
		return err
	}
	if in.mode != migrate.ModePostCopy {
		in.pageNS = ns
		return nil
	}
	conn, peer, err := socketPair()
	if err != nil {
		_ = ns.Close()
		return fmt.Errorf("the lazy-pages daemon's socket: %w", err)
	}
	in.pageNS, in.lazyConn, in.lazyPeer = ns, conn, peer
	return nil
}

// socketPair returns a connected pair of Unix stream sockets: one as a
// net.Conn, the other as a file to hand to another process.
func socketPair() (net.Conn, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	f := os.NewFile(uintptr(fds[0]), "lazy-pages socket")
	conn, err := net.FileConn(f) // a dup
	_ = f.Close()
	if err != nil {
		_ = syscall.Close(fds[1])
		return nil, nil, err
	}
	return conn, os.NewFile(uintptr(fds[1]), "lazy-pages socket"), nil
}

// closePages drops the page namespace (and post-copy's sockets).
func (in *incoming) closePages() {
	if in.lazyConn != nil {
		_ = in.lazyConn.Close()
	}
	if in.lazyPeer != nil {
		_ = in.lazyPeer.Close()
	}
	_ = in.pageNS.Close()
}

// lazyDaemon is `criu lazy-pages`, run by the monitor of a post-copy
// restore.
type lazyDaemon struct {
	cmd   *exec.Cmd
	work  string        // its working directory: its socket and log
	ready chan struct{} // closed once its socket exists
	done  chan struct{}
	err   error
}

// startLazyDaemon starts criu lazy-pages in the namespace of rs.netns,
// working in work; ready closes once its socket exists (the restore
// reaches it through a lazyRelay).
func startLazyDaemon(rs restoreSource, work string) (*lazyDaemon, error) {
	if err := os.MkdirAll(work, 0o700); err != nil {
		return nil, err
	}
	// Its page server connection is the socket on fd 3 (ferryd's socket
	// pair, preparePages); -v1: CRIU warns at every request that a Unix
	// socket takes no TCP options.
	cmd := exec.Command(rs.criu, "lazy-pages", "--page-server", "--ps-socket", "3",
		"--images-dir", rs.images, "--work-dir", work, "--log-file", "lazy-pages.log", "-v1")
	cmd.ExtraFiles = []*os.File{rs.pages}
	// Should the monitor die, the daemon goes with it (and the container
	// with both: its missing pages can no longer come).
	// In a session of its own, so that its niceness counts (below).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: true}
	ns := privnet.FromFile(rs.netns)
	err := ns.Start(cmd)
	// The daemon has its end: with the monitor's closed, ferryd sees the
	// daemon close it.
	_ = rs.pages.Close()
	if err != nil {
		return nil, fmt.Errorf("start criu lazy-pages: %w", err)
	}
	lowerPriority(cmd.Process.Pid)
	d := &lazyDaemon{cmd: cmd, work: work, ready: make(chan struct{}), done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		if err != nil {
			err = fmt.Errorf("criu lazy-pages: %w%s", err, criuLogTail(filepath.Join(work, "lazy-pages.log")))
		}
		d.err = err
		close(d.done)
	}()
	go func() {
		if !waitForSocket(filepath.Join(work, lazySockName), d.ready, d.done, 30*time.Second) {
			d.stop() // not up in time: the relay gives up on it
		}
	}()
	return d, nil
}

// lazyNice is the lazy-pages daemon's niceness. The daemon polls without
// sleeping while it waits for pages (epoll with a zero timeout, criu/uffd.c),
// so for the whole transfer it takes a core from the agents that bring the
// pages, and from everything else on the node. At nice 10 it still gets a
// tenth of a contended core for the restored container's page faults;
// measured at 1024 MiB, the pages moved in 2.8-3.8 s instead of 3.9-4.9 s.
const lazyNice = 10

// lowerPriority sets pid's niceness to lazyNice, and that of its
// autogroup: where the kernel groups tasks by session (autogroup), a
// task's niceness weighs only within its session, so the daemon runs in a
// session of its own. Best effort: a daemon at the usual priority only
// makes the transfer slower.
func lowerPriority(pid int) {
	_ = syscall.Setpriority(syscall.PRIO_PROCESS, pid, lazyNice)
	_ = os.WriteFile(fmt.Sprintf("/proc/%d/autogroup", pid), []byte(strconv.Itoa(lazyNice)), 0)
}

func (d *lazyDaemon) wait() error {
	<-d.done
	return d.err
}

func (d *lazyDaemon) stop() {
	select {
	case <-d.done:
	default:
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// PageTunnel is the destination's end of a page tunnel: for post-copy it
// answers the lazy-pages daemon, fetching through the stream ahead of it
// (readahead.go); for the other modes it feeds a page server (servePages).
func (a *Agent) PageTunnel(ctx context.Context, id string, recv func() (*api.TunnelChunk, error), send func(*api.TunnelChunk) error) error {
	first, err := recv()
	if err != nil {
		return err
	}
	if id == "" {
		id = first.GetMigrationId()
	}
	in, err := a.getIncoming(id)
	if err != nil {
		return err
	}
	if in.mode != migrate.ModePostCopy {
		return a.servePages(ctx, in, recv, send)
	}
	if in.lazyConn == nil {
		return fmt.Errorf("incoming migration %q: has no lazy-pages socket: %w", in.id, ErrFailedPrecondition)
	}
	if !in.tunnel.CompareAndSwap(false, true) {
		return fmt.Errorf("incoming migration %q: page tunnel already open: %w", in.id, ErrAlreadyExists)
	}
	conn := in.lazyConn
	// The source opens the tunnel once the images are in: the lazy ranges
	// are known.
	ranges, err := readLazyRanges(in.images, uint64(os.Getpagesize()))
	if err != nil {
		a.log.Warn("post-copy: no read-ahead, the lazy ranges are unknown", "migration", in.id, "err", err)
	}
	ra := newReadAhead(conn, send, recv, ranges)
	err = ra.run(ctx)
	a.log.Info("post-copy page tunnel ended", append([]any{"migration", in.id, "err", err}, ra.logAttrs()...)...)
	return err
}

// finishLazy follows a post-copy restore until its daemon ends: with every
// page in, the container is this node's; otherwise it is killed, because
// a task missing pages cannot go on (and the source still holds them).
func (a *Agent) finishLazy(in *incoming, restoredAt time.Time, ended <-chan error) {
	err := <-ended
	c := in.c
	if err != nil {
		a.log.Error("post-copy failed; removing the restored copy", "container", c.name, "migration", in.id, "err", err)
		in.setOutcome(err)
		_ = a.abortIncoming(in, err.Error())
		return
	}
	in.postcopy = time.Since(restoredAt)
	a.mu.Lock()
	c.creating, c.reason = false, ""
	c.rec.Incoming = ""
	rec := c.rec
	a.mu.Unlock()
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, specFile), rec, 0o600); err != nil {
		a.log.Warn("record container", "container", c.name, "err", err)
	}
	in.closePages() // the daemon's socket too, should the tunnel never have run
	_ = os.RemoveAll(filepath.Dir(in.images))
	a.log.Info("post-copy done: every page is in", "container", c.name, "migration", in.id, "postcopy_ms", in.postcopy.Milliseconds())
	in.setOutcome(nil)
	// Forgotten when the source confirms, or after a while if it never does.
	in.timer.Reset(incomingTimeout)
}

// CompleteIncoming waits for a post-copy restore to have every page.
func (a *Agent) CompleteIncoming(ctx context.Context, id string) (*api.CompleteIncomingResponse, error) {
	in, err := a.getIncoming(id)
	if err != nil {
		return nil, err
	}
	if in.outcome == nil {
		return nil, fmt.Errorf("incoming migration %q: not a restored post-copy migration: %w", id, ErrFailedPrecondition)
	}
	select {
	case <-in.outcome:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if in.outErr != nil {
		return nil, fmt.Errorf("incoming migration %q: post-copy: %w", id, in.outErr)
	}
	a.forgetIncoming(in)
	return &api.CompleteIncomingResponse{PostcopyMs: in.postcopy.Milliseconds()}, nil
}

// setOutcome records how a post-copy restore ended; the first word stands.
func (in *incoming) setOutcome(err error) {
	in.outOnce.Do(func() {
		in.outErr = err
		close(in.outcome)
	})
}

// forgetIncoming drops a finished incoming migration's entry.
func (a *Agent) forgetIncoming(in *incoming) {
	a.mu.Lock()
	if a.incoming[in.id] == in {
		delete(a.incoming, in.id)
	}
	a.mu.Unlock()
	in.timer.Stop()
}

// Features of both ends as AutoMode takes them.
func autoFeatures(here, peer *api.MigrationFeatures) migrate.Features {
	return migrate.Features{Source: nodeFeatures(here), Dest: nodeFeatures(peer)}
}

// cowGrowth predicts how much a post-copy restore adds to the memory of
// processes that share anonymous pages copy-on-write (a parent and the
// children it forked): CRIU's lazy restore gives each process its own copy
// of every page, where a plain restore keeps them shared. A page shared by
// k processes is counted k times in their Anonymous and once in their
// Pss_Anon, so the growth is the sum of Anonymous minus the sum of
// Pss_Anon (from /proc/PID/smaps_rollup).
func cowGrowth(pids []int) (int64, error) {
	var anon, pss int64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
				continue // exited meanwhile
			}
			return 0, err
		}
		a, p := parseRollup(string(b))
		anon += a
		pss += p
	}
	if anon < pss {
		return 0, nil
	}
	return anon - pss, nil
}

// parseRollup returns the Anonymous and Pss_Anon bytes of a smaps_rollup.
func parseRollup(s string) (anon, pssAnon int64) {
	for _, l := range strings.Split(s, "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "Anonymous:":
			anon = v << 10
		case "Pss_Anon:":
			pssAnon = v << 10
		}
	}
	return anon, pssAnon
}

// postcopyFits says why a post-copy of the container would not fit its
// memory ceiling once restored, or "".
func postcopyFits(lc *libcontainer.Container, used, ceiling int64) string {
	if ceiling <= 0 {
		return ""
	}
	pids, err := lc.Processes()
	if err != nil {
		return ""
	}
	growth, err := cowGrowth(pids)
	if err != nil || growth == 0 {
		return ""
	}
	if used+growth > ceiling {
		return fmt.Sprintf("its processes share %s copy-on-write, which a lazy-pages restore copies once per process: %s in use + %s would pass its %s memory ceiling",
			humanSize(growth), humanSize(used), humanSize(growth), humanSize(ceiling))
	}
	return ""
}

func humanSize(n int64) string {
	const mi = 1 << 20
	if n >= 10*mi {
		return fmt.Sprintf("%dMi", n/mi)
	}
	return fmt.Sprintf("%.1fMi", float64(n)/mi)
}
