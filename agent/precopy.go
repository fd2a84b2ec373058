package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/agent/client"
	"github.com/ferry-agent/ferry/internal/criuview"
	"github.com/ferry-agent/ferry/migrate"
)

// Pre-copy runs rounds of CRIU pre-dump while the container runs; each
// sends the pages dirtied since the round before (soft-dirty tracking) to
// a `criu page-server` on the peer, which keeps each round in a directory
// whose parent is the round before. The final dump, frozen, sends what is
// left, with the last round as its parent; the restore on the peer reads
// through the chain. The page traffic takes the same path as post-copy's,
// the other way round:
//
//	source: CRIU pre-dump/dump with a page server socket of ferryd's
//	        (one end of a Unix socket pair, see criuDump)
//	   ===== PageTunnel (metadata: the image directory and its parent) =====
//	dest:   criu page-server --images-dir DIR --prev-images-dir ../PARENT
//	        on 127.0.0.1:lazyPort of its private namespace <- ferryd dials
//
// The directories mirror each other under the migration's directory on
// both nodes (pre-1, pre-2, ..., images), so CRIU's relative parent links
// hold on both.

// gRPC metadata of a pre-copy page tunnel.
const (
	PageDirKey    = "ferry-page-dir"
	PageParentKey = "ferry-page-parent"
)

// pageDirRE is what a source may name as a page directory: nothing that
// could leave the migration's directory.
var pageDirRE = regexp.MustCompile(`^(images|pre-[0-9]{1,3})$`)

// validatePageDirs checks the page directory and parent a source names:
// "images" or pre-N, a parent pre-N other than the directory.
func validatePageDirs(dir, parent string) error {
	if !pageDirRE.MatchString(dir) {
		return fmt.Errorf("page directory %q: want images or pre-N: %w", dir, ErrInvalidArgument)
	}
	if parent != "" && (!pageDirRE.MatchString(parent) || parent == "images" || parent == dir) {
		return fmt.Errorf("page parent %q: want pre-N other than %q: %w", parent, dir, ErrInvalidArgument)
	}
	return nil
}

// pageSender is the source's end of the page traffic of a pre-copy or a
// stop-and-copy.
type pageSender struct {
	view *criuview.View // CRIU's /run
	peer *client.Client
	id   string
	pace *pacer
	sent atomic.Int64
	pre  *preparedTunnel // opened ahead of the next dump
}

// preparedTunnel is a page tunnel opened before its dump, the peer's page
// server already listening at its end.
type preparedTunnel struct {
	dir, parent string
	stream      api.Ferry_PageTunnelClient
	cancel      context.CancelFunc
}

func newPageSender(view *criuview.View, peer *client.Client, id string, pace *pacer) *pageSender {
	return &pageSender{view: view, peer: peer, id: id, pace: pace}
}

func (s *pageSender) close() {
	s.dropPrepared()
}

// prepare opens the page tunnel of the next dump, into the peer's
// directory dir with parent, ahead of it: the peer starts its page server
// now (~35 ms here), not when the dump (of a frozen container) starts.
func (s *pageSender) prepare(ctx context.Context, dir, parent string) error {
	s.dropPrepared()
	tctx, cancel := context.WithCancel(ctx)
	stream, err := openTunnel(metadata.AppendToOutgoingContext(tctx, PageDirKey, dir, PageParentKey, parent), s.peer.FerryClient, s.id)
	if err != nil {
		cancel()
		return err
	}
	s.pre = &preparedTunnel{dir: dir, parent: parent, stream: stream, cancel: cancel}
	return nil
}

// dropPrepared ends a prepared tunnel that no dump used. The peer takes
// that for a broken page stream and drops the whole incoming migration:
// only a migration that is failing anyway does this.
func (s *pageSender) dropPrepared() {
	if s.pre != nil {
		s.pre.cancel()
		s.pre = nil
	}
}

// dump runs one CRIU dump or pre-dump (opts) into images, its pages going
// to the peer's page server for the directory of the same name, parent the
// sibling directory parent (or none). It returns the page bytes sent and
// the time the dump took.
func (s *pageSender) dump(ctx context.Context, lc *libcontainer.Container, images, work, parent string, opts libcontainer.CriuOpts) (int64, time.Duration, error) {
	opts.ImagesDirectory, opts.WorkDirectory = images, work
	opts.PageServer = libcontainer.CriuPageServerInfo{Address: lazyHost, Port: lazyPort}
	if parent != "" {
		opts.ParentImage = "../" + parent
	}
	start := time.Now()
	before := s.sent.Load()
	pre := s.pre
	s.pre = nil
	if pre != nil && (pre.dir != filepath.Base(images) || pre.parent != parent) {
		pre.cancel()
		pre = nil
	}
	// CRIU's page server connection is a Unix socket pair with ferryd
	// (see criuDump).
	conn, psSock, err := socketPair()
	if err != nil {
		if pre != nil {
			pre.cancel()
		}
		return 0, time.Since(start), fmt.Errorf("page server socket: %w", err)
	}
	done := make(chan error, 1)
	go func() {
		err := s.view.Do(func() error { return criuDump(lc, &opts, psSock) })
		_ = psSock.Close() // if CRIU never got it: ferryd's end sees the end
		done <- err
	}()
	var stream api.Ferry_PageTunnelClient
	if pre != nil {
		stream = pre.stream
		defer pre.cancel() // once the tunnel has ended
	} else {
		tctx := metadata.AppendToOutgoingContext(ctx, PageDirKey, filepath.Base(images), PageParentKey, parent)
		if stream, err = openTunnel(tctx, s.peer.FerryClient, s.id); err != nil {
			_ = conn.Close()
			cerr := <-done // CRIU fails without its page server
			return 0, time.Since(start), errors.Join(fmt.Errorf("page tunnel: %w", err), cerr)
		}
	}
	tunnel := runTunnel(stream, conn, s.pace, &s.sent)
	cerr := <-done
	var terr error
	select {
	case terr = <-tunnel:
	case <-time.After(time.Minute):
		terr = errors.New("the page tunnel did not end a minute after CRIU")
	}
	if cerr != nil {
		cerr = fmt.Errorf("%w%s", cerr, criuLogTail(filepath.Join(work, logName(opts))))
	}
	return s.sent.Load() - before, time.Since(start), errors.Join(cerr, terr)
}

// reportWhileDumping calls f with the page bytes sent so far, every 200
// ms, until the returned func is called; once that returns, f is not
// running and will not run again.
func (s *pageSender) reportWhileDumping(f func(sent int64)) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	before := s.sent.Load()
	go func() {
		defer close(done)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				f(s.sent.Load() - before)
			}
		}
	}()
	return func() {
		close(quit)
		<-done
	}
}

func logName(opts libcontainer.CriuOpts) string {
	if opts.PreDump {
		return "predump.log"
	}
	return "dump.log"
}

// preCopy runs pre-dump rounds until the convergence rule stops them and
// returns the last round's directory, the final dump's parent.
func (a *Agent) preCopy(ctx context.Context, s *pageSender, lc *libcontainer.Container, work string, req *api.MigrateRequest,
	m *api.Migration, report func(string)) (string, error) {
	opts := migrate.Options{DowntimeTarget: time.Duration(req.GetMaxDowntimeMs()) * time.Millisecond,
		MaxRounds: int(req.GetMaxRounds()), BandwidthCap: float64(req.GetBandwidthBytesPerSecond())}
	var rounds []migrate.Round
	parent := ""
	for i := 1; ; i++ {
		if err := context.Cause(ctx); err != nil {
			return "", err
		}
		dir := fmt.Sprintf("pre-%d", i)
		images := filepath.Join(work, dir)
		started := time.Now()
		bytes, took, err := s.dump(ctx, lc, images, images+"-work", parent, libcontainer.CriuOpts{PreDump: true, ManageCgroupsMode: criuCgroups})
		if err != nil {
			return "", fmt.Errorf("round %d: %w", i, err)
		}
		st, err := migrate.ReadDumpStats(images + "-work")
		if err != nil {
			return "", fmt.Errorf("round %d: %w", i, err)
		}
		rounds = append(rounds, st.Round(started, bytes, took))
		d := migrate.Decide(rounds, opts)
		pr := &api.PrecopyRound{Round: int32(i), PagesWritten: int64(st.PagesWritten), PagesSkippedParent: int64(st.PagesSkippedParent),
			FrozenMs: st.FrozenTime.Milliseconds(), Bytes: bytes, Ms: took.Milliseconds(), Decision: d.Reason, DirtyPagesPerSecond: d.DirtyRate}
		if d.PredictedDowntime != migrate.UnknownDowntime {
			pr.PredictedDowntimeMs = d.PredictedDowntime.Milliseconds()
			m.PredictedDowntimeMs = pr.PredictedDowntimeMs
		}
		m.Rounds, m.BytesSent = int32(i), m.BytesSent+bytes
		m.PrecopyRounds = append(m.PrecopyRounds, proto.Clone(pr).(*api.PrecopyRound))
		a.log.Info("pre-copy round", "migration", m.Id, "container", m.Container, "round", i, "decision", d.String(),
			"pages_written", st.PagesWritten, "pages_skipped_parent", st.PagesSkippedParent)
		report("precopy")
		parent = dir
		if d.Stop {
			return dir, nil
		}
	}
}

// The destination's half.

// servePages is the destination's end of a pre-copy page tunnel: a `criu
// page-server` for the directory the source named, fed through the stream.
func (a *Agent) servePages(ctx context.Context, in *incoming, recv func() (*api.TunnelChunk, error), send func(*api.TunnelChunk) error) error {
	md, _ := metadata.FromIncomingContext(ctx)
	get := func(k string) string {
		if v := md.Get(k); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	dir, parent := get(PageDirKey), get(PageParentKey)
	if err := validatePageDirs(dir, parent); err != nil {
		return err
	}
	base := filepath.Dir(in.images)
	images := filepath.Join(base, dir)
	work := images + "-work"
	for _, d := range []string{images, work} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	args := []string{"page-server", "--images-dir", images, "--work-dir", work, "--address", "127.0.0.1",
		"--port", strconv.Itoa(lazyPort), "--log-file", "page-server.log", "-v2"}
	if parent != "" {
		if _, err := os.Stat(filepath.Join(base, parent)); err != nil {
			return fmt.Errorf("page parent %q: %w: %w", parent, err, ErrInvalidArgument)
		}
		args = append(args, "--prev-images-dir", "../"+parent)
	}
	cmd := exec.Command(a.criuPath(), args...)
	// Should ferryd die, the page server goes with it: nothing would end
	// it otherwise, and ferryd's next start removes the migration.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := in.pageNS.Start(cmd); err != nil {
		return fmt.Errorf("start criu page-server: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	logTail := func() string { return criuLogTail(filepath.Join(work, "page-server.log")) }
	fail := func(err error) error {
		_ = a.abortIncoming(in, "page server: "+err.Error())
		return err
	}
	conn, err := dialWhenListening(ctx, in.pageNS, exited, 30*time.Second)
	var ended *endedEarly
	switch {
	case errors.As(err, &ended):
		return fail(fmt.Errorf("criu page-server ended before it listened: %w%s", ended.err, logTail()))
	case err != nil:
		_ = cmd.Process.Kill()
		return fail(fmt.Errorf("criu page-server: %w (%w)%s", err, <-exited, logTail()))
	}
	in.touch()
	perr := pump(conn, send, func() (*api.TunnelChunk, error) {
		ch, err := recv()
		if err == nil {
			in.touch()
		}
		return ch, err
	}, nil, nil)
	var werr error
	select {
	case werr = <-exited:
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		werr = fmt.Errorf("did not end a minute after its connection: %w", <-exited)
	}
	if werr != nil {
		werr = fmt.Errorf("criu page-server for %s: %w%s", dir, werr, logTail())
	}
	if err := errors.Join(perr, werr); err != nil {
		// The stream broke (source gone, wire cut) or the pages did not
		// land: nothing of this migration can be used; a source that is
		// still there learns it from the stream.
		_ = a.abortIncoming(in, "page stream: "+err.Error())
		return err
	}
	return nil
}
