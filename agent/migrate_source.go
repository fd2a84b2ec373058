package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/agent/client"
	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/internal/atomicfile"
	"github.com/ferry-agent/ferry/internal/failpoint"
	"github.com/ferry-agent/ferry/migrate"
)

// Migration states and phases.
const (
	MigrationRunning    = "running"
	MigrationSucceeded  = "succeeded"
	MigrationRolledBack = "rolled_back"
	MigrationFailed     = "failed"

	EventContainerMigrated   = "container.migrated"
	EventContainerMigratedIn = "container.migrated_in"
)

// migrationsDir holds one JSON file per migration this agent ran as the source.
func (a *Agent) migrationsDir() string { return filepath.Join(a.cfg.Root, "migrations") }

func (a *Agent) saveMigration(m *api.Migration) {
	a.mu.Lock()
	a.migrations[m.Id] = proto.Clone(m).(*api.Migration)
	a.mu.Unlock()
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err == nil {
		err = atomicfile.Write(filepath.Join(a.migrationsDir(), m.Id+".json"), b, 0o600)
	}
	if err != nil {
		a.log.Warn("record migration", "migration", m.Id, "err", err)
	}
}

func (a *Agent) loadMigrations() {
	ents, _ := os.ReadDir(a.migrationsDir())
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(a.migrationsDir(), e.Name()))
		if err != nil {
			continue
		}
		m := &api.Migration{}
		if protojson.Unmarshal(b, m) == nil && m.Id != "" {
			if m.State == MigrationRunning {
				a.interrupted = append(a.interrupted, proto.Clone(m).(*api.Migration))
				m.State, m.Error = MigrationFailed, "interrupted: ferryd restarted during the migration"
			}
			a.migrations[m.Id] = m
		}
	}
}

// GetMigration returns one migration.
func (a *Agent) GetMigration(id string) (*api.Migration, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, ok := a.migrations[id]
	if !ok {
		return nil, fmt.Errorf("migration %q: %w", id, ErrNotFound)
	}
	return proto.Clone(m).(*api.Migration), nil
}

// ListMigrations returns every migration, oldest first.
func (a *Agent) ListMigrations() []*api.Migration {
	a.mu.Lock()
	out := make([]*api.Migration, 0, len(a.migrations))
	for _, m := range a.migrations {
		out = append(out, proto.Clone(m).(*api.Migration))
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].StartedAt < out[j].StartedAt })
	return out
}

var migrationIDRE = nameRE

func newMigrationID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "m-" + hex.EncodeToString(b)
}

// validateMigrate checks a request before anything is touched.
func (a *Agent) validateMigrate(req *api.MigrateRequest) (mode, reason string, err error) {
	if err := ValidateName(req.GetName()); err != nil {
		return "", "", err
	}
	host, port, err := net.SplitHostPort(req.GetPeer())
	if err != nil || host == "" || port == "" {
		return "", "", fmt.Errorf("peer %q: want HOST:PORT of the peer's --listen address: %w", req.GetPeer(), ErrInvalidArgument)
	}
	if req.GetMaxDowntimeMs() < 0 {
		return "", "", fmt.Errorf("max_downtime %dms: negative: %w", req.GetMaxDowntimeMs(), ErrInvalidArgument)
	}
	if req.GetMaxRounds() < 0 {
		return "", "", fmt.Errorf("max_rounds %d: negative: %w", req.GetMaxRounds(), ErrInvalidArgument)
	}
	if req.GetBandwidthBytesPerSecond() < 0 {
		return "", "", fmt.Errorf("bandwidth %d: negative: %w", req.GetBandwidthBytesPerSecond(), ErrInvalidArgument)
	}
	if id := req.GetMigrationId(); id != "" && !migrationIDRE.MatchString(id) {
		return "", "", fmt.Errorf("migration_id %q: must match %s: %w", id, nameRE, ErrInvalidArgument)
	}
	switch req.GetMode() {
	case "", "auto":
		return "stopcopy", "no soft-dirty memory tracking on this kernel for pre-copy, and post-copy is not built yet: stop-and-copy", nil
	case "stopcopy":
		return "stopcopy", "requested", nil
	case "precopy":
		return "", "", fmt.Errorf("mode precopy: this kernel has no soft-dirty memory tracking (criu check --feature mem_dirty_track): %w", ErrFailedPrecondition)
	case "postcopy":
		return "", "", fmt.Errorf("mode postcopy: not built yet on this agent: %w", ErrFailedPrecondition)
	}
	return "", "", fmt.Errorf("mode %q: want auto, precopy, postcopy or stopcopy: %w", req.GetMode(), ErrInvalidArgument)
}

// Migrate moves the running container req.Name to the peer agent: handshake
// and preparation on the peer, freeze, final dump (the tasks stay frozen
// here), transfer of the images, the upper layer and the log inside the
// mutual-TLS channel, restore on the peer. Only the peer's confirmation
// lets this agent delete its copy; any failure before it thaws the
// container here, where it was, and has the peer remove what it made.
func (a *Agent) Migrate(ctx context.Context, req *api.MigrateRequest, progress func(*api.Migration)) (_ *api.Migration, retErr error) {
	mode, reason, err := a.validateMigrate(req)
	if err != nil {
		return nil, err
	}
	id := req.GetMigrationId()
	if id == "" {
		id = newMigrationID()
	}
	if m, err := a.GetMigration(id); err == nil {
		return m, nil // idempotent: the migration with that id already ran
	}
	c, err := a.get(req.GetName())
	if err != nil {
		return nil, err
	}
	if a.cfg.TLSDir == "" {
		return nil, fmt.Errorf("migration needs this node's certificate: ferryd --tls-dir: %w", ErrFailedPrecondition)
	}
	if _, err := os.Stat(filepath.Join(a.cfg.TLSDir, "node.pem")); err != nil {
		return nil, fmt.Errorf("migration needs this node's certificate in --tls-dir %s: %w: %w", a.cfg.TLSDir, err, ErrFailedPrecondition)
	}
	c.op.Lock()
	defer c.op.Unlock()
	a.mu.Lock()
	st, rec := c.state(), c.rec
	a.mu.Unlock()
	if st != StateRunning {
		return nil, fmt.Errorf("container %q: %s, not running: %w", c.name, st, ErrFailedPrecondition)
	}
	log := a.log.With("container", c.name, "migration", id, "peer", req.GetPeer())
	start := time.Now()
	m := &api.Migration{Id: id, Container: c.name, Peer: req.GetPeer(), Mode: mode, ModeReason: reason,
		Phase: "handshake", State: MigrationRunning, StartedAt: ts(start)}
	report := func(phase string) {
		m.Phase = phase
		m.TotalMs = time.Since(start).Milliseconds()
		a.saveMigration(m)
		if progress != nil {
			progress(proto.Clone(m).(*api.Migration))
		}
		log.Info("migration", "phase", phase)
	}
	report("handshake")
	defer func() {
		m.FinishedAt, m.TotalMs = ts(time.Now()), time.Since(start).Milliseconds()
		if retErr != nil {
			m.Error = retErr.Error()
			if m.State == MigrationRunning {
				m.State = MigrationFailed
			}
		}
		a.saveMigration(m)
		if progress != nil {
			progress(proto.Clone(m).(*api.Migration))
		}
	}()

	peer, err := client.DialTLS(req.GetPeer(), a.cfg.TLSDir)
	if err != nil {
		return nil, fmt.Errorf("peer %q: %w", req.GetPeer(), err)
	}
	defer func() { _ = peer.Close() }()
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	v, err := peer.Version(hctx, &api.VersionRequest{})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("peer %q: handshake: %w", req.GetPeer(), err)
	}
	m.PeerNode = v.NodeName
	if v.NodeName == a.cfg.NodeName {
		return nil, fmt.Errorf("peer %q: is this node (%s): %w", req.GetPeer(), v.NodeName, ErrInvalidArgument)
	}
	if v.CgroupMode != cgroup.Mode() {
		log.Warn("peer runs another cgroup mode", "here", cgroup.Mode(), "peer", v.CgroupMode)
	}

	spec := rec.Spec
	spec.IP = rec.IP // the address moves with the container
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	report("prepare")
	pctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	_, err = peer.PrepareIncoming(pctx, &api.PrepareIncomingRequest{MigrationId: id, SourceNode: a.cfg.NodeName,
		AgentVersion: a.cfg.Version, CriuVersion: a.criuVersion, CgroupMode: cgroup.Mode(), SpecJson: specJSON})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("peer %s refused: %w", v.NodeName, err)
	}
	confirmed := false
	defer func() {
		if retErr != nil && !confirmed {
			actx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if _, err := peer.AbortIncoming(actx, &api.AbortIncomingRequest{MigrationId: id, Reason: retErr.Error()}); err != nil {
				log.Warn("peer abort", "err", err)
			}
			cancel()
		}
	}()

	lc, err := libcontainer.Load(a.lcRoot, c.name)
	if err != nil {
		return nil, fmt.Errorf("container %q: %w", c.name, err)
	}
	work := filepath.Join(a.cfg.RunDir, "migrations", id)
	images := filepath.Join(work, "images")
	defer func() { _ = os.RemoveAll(work) }()
	if err := os.MkdirAll(work, 0o700); err != nil {
		return nil, err
	}

	report("freeze")
	frozeAt := time.Now()
	if err := lc.Pause(); err != nil {
		return nil, fmt.Errorf("freeze: %w", err)
	}
	deactivated := false
	defer func() {
		if retErr != nil && !confirmed {
			m.Phase, m.State = "rollback", MigrationRolledBack
			defer func() { m.FrozenMs = time.Since(frozeAt).Milliseconds() }() // frozen until the thaw
			if deactivated {
				if err := a.net.Activate(context.Background(), c.name); err != nil {
					log.Error("rollback: network", "err", err)
				}
			}
			if err := lc.Resume(); err != nil {
				log.Error("rollback: thaw", "err", err)
				m.State = MigrationFailed
			}
			log.Warn("migration rolled back; the container runs here again", "err", retErr)
		}
	}()
	report("dump")
	dumpStart := time.Now()
	err = lc.Checkpoint(&libcontainer.CriuOpts{ImagesDirectory: images, WorkDirectory: filepath.Join(work, "criu"),
		LeaveRunning: true, TcpEstablished: true, FileLocks: true})
	m.DumpMs = time.Since(dumpStart).Milliseconds()
	if err != nil {
		return nil, fmt.Errorf("dump: %w", err)
	}
	// CRIU writes its stats into the work directory when one is given.
	if ds, err := migrate.ReadDumpStats(filepath.Join(work, "criu")); err == nil {
		m.CriuFrozenMs = ds.FrozenTime.Milliseconds()
		m.PagesWritten = int64(ds.PagesWritten)
	}
	if a.net != nil {
		// From here the address answers nowhere until the peer activates it:
		// this namespace must not reset the connections that move.
		if err := a.net.Deactivate(ctx, c.name); err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
		deactivated = true
	}

	report("transfer")
	xferStart := time.Now()
	lastReport := time.Now()
	sent, err := a.sendImages(ctx, peer, id, images, c, func(n int64) {
		if time.Since(lastReport) < 200*time.Millisecond || progress == nil {
			return
		}
		lastReport = time.Now()
		m.BytesSent, m.TotalMs = n, time.Since(start).Milliseconds()
		progress(proto.Clone(m).(*api.Migration))
	})
	m.BytesSent, m.TransferMs = sent, time.Since(xferStart).Milliseconds()
	if err != nil {
		return nil, fmt.Errorf("transfer: %w", err)
	}

	report("restore")
	rctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	rr, err := peer.RestoreIncoming(rctx, &api.RestoreIncomingRequest{MigrationId: id})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("restore on %s: %w", v.NodeName, err)
	}
	confirmed = true
	m.RestoreMs = rr.RestoreMs
	if err := failpoint.Check("source-after-confirm"); err != nil {
		log.Warn("failpoint", "err", err)
	}
	m.FrozenMs = time.Since(frozeAt).Milliseconds()

	report("cleanup")
	if err := a.finishMigratedAway(c, v.NodeName); err != nil {
		// Never undone: the container runs on the peer. ferryd's start retries.
		log.Error("cleanup after migration", "err", err)
	}
	m.State = MigrationSucceeded
	m.Phase = "done"
	a.events.Publish(Event{Type: EventContainerMigrated, Container: c.name, Message: "migrated to " + v.NodeName,
		Attrs: map[string]string{"peer": req.GetPeer(), "peer_node": v.NodeName, "migration": id,
			"frozen_ms": fmt.Sprint(m.FrozenMs)}})
	log.Info("migration done", "frozen_ms", m.FrozenMs, "total_ms", time.Since(start).Milliseconds(), "bytes", m.BytesSent)
	return m, nil
}

// finishMigratedAway deletes the local copy of a container that now runs on
// peer: it is killed (still frozen), and everything it had here goes, its
// address staying reserved as moved.
func (a *Agent) finishMigratedAway(c *container, peerNode string) error {
	a.mu.Lock()
	c.rec.MigratedTo = peerNode
	rec, ii, exited := c.rec, c.init, c.exited
	a.mu.Unlock()
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, specFile), rec, 0o600); err != nil {
		return err
	}
	if err := a.kill(c.name, ii); err != nil {
		return err
	}
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		return fmt.Errorf("container %q: init did not exit after SIGKILL", c.name)
	}
	if err := a.teardown(c.name, c.dir); err != nil {
		return err
	}
	a.mu.Lock()
	delete(a.ctrs, c.name)
	a.mu.Unlock()
	return nil
}

// sendImages streams the images, the upper layer and the log to the peer.
func (a *Agent) sendImages(ctx context.Context, peer *client.Client, id, images string, c *container, sentSoFar func(int64)) (int64, error) {
	stream, err := peer.SendImages(ctx)
	if err != nil {
		return 0, err
	}
	w := &chunkWriter{id: id}
	w.send = func(ch *api.ImageChunk) error {
		err := stream.Send(ch)
		sentSoFar(w.n)
		return err
	}
	parts := []struct {
		name, dir string
		opts      migrate.WriteOptions
	}{
		{"images", images, migrate.WriteOptions{}},
		// Sockets and FIFOs left in the upper layer are re-made by CRIU
		// or by the restored program; they cannot be carried as files.
		{"upper", filepath.Join(c.dir, "upper"), migrate.WriteOptions{SkipUnsupported: true}},
	}
	for _, p := range parts {
		w.part = p.name
		if _, err := migrate.WriteTree(w, p.dir, p.opts); err != nil {
			return w.n, fmt.Errorf("%s: %w", p.name, err)
		}
		if err := w.flush(); err != nil {
			return w.n, err
		}
	}
	w.part = "log"
	if f, err := os.Open(filepath.Join(c.dir, logFile)); err == nil {
		_, err = io.Copy(w, f)
		_ = f.Close()
		if err != nil {
			return w.n, fmt.Errorf("log: %w", err)
		}
	}
	if err := w.flush(); err != nil {
		return w.n, err
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		return w.n, err
	}
	return w.n, nil
}

// chunkWriter cuts a stream of bytes into ImageChunk messages of one part.
// It fills one fixed buffer and sends it as it is: gRPC encodes a message
// before Send returns, so the buffer can be reused at once.
type chunkWriter struct {
	send func(*api.ImageChunk) error
	id   string
	part string
	buf  []byte
	n    int64
	sent bool
}

const chunkSize = 1 << 20

func (w *chunkWriter) Write(p []byte) (int, error) {
	if w.buf == nil {
		w.buf = make([]byte, 0, chunkSize)
	}
	written := 0
	for len(p) > 0 {
		k := copy(w.buf[len(w.buf):cap(w.buf)], p)
		w.buf = w.buf[:len(w.buf)+k]
		p, written = p[k:], written+k
		if len(w.buf) == cap(w.buf) {
			if err := w.emit(w.buf); err != nil {
				return written, err
			}
			w.buf = w.buf[:0]
		}
	}
	return written, nil
}

// flush sends what is buffered; every part gets at least one chunk, so an
// empty part still reaches the peer.
func (w *chunkWriter) flush() error {
	err := w.emit(w.buf)
	w.buf = w.buf[:0]
	return err
}

func (w *chunkWriter) emit(b []byte) error {
	ch := &api.ImageChunk{Part: w.part, Data: b}
	if !w.sent {
		ch.MigrationId = w.id
		w.sent = true
	}
	w.n += int64(len(b))
	return w.send(ch)
}

// recoverMigrations settles migrations ferryd was running when it died, so
// that exactly one copy of each container runs: a container left frozen
// here is finished off if the peer runs it, and thawed if the peer does not
// (the peer's half-made copy is aborted). With the peer unreachable it stays
// frozen and ferryd retries.
func (a *Agent) recoverMigrations() {
	for _, m := range a.interrupted {
		c, err := a.get(m.Container)
		if err != nil {
			continue // gone here: removed after the peer's confirmation
		}
		lc, err := libcontainer.Load(a.lcRoot, c.name)
		if err != nil {
			continue
		}
		if st, err := lc.Status(); err != nil || st != libcontainer.Paused {
			continue // never frozen, or already thawed: it runs here
		}
		a.mu.Lock()
		c.reason = fmt.Sprintf("frozen by migration %s to %s, interrupted by a ferryd restart; settling with the peer", m.Id, m.Peer)
		a.mu.Unlock()
		m := m
		a.watchers.Add(1)
		go func() {
			defer a.watchers.Done()
			for try := 0; ; try++ {
				done, err := a.settleInterrupted(m, c, lc)
				if done {
					return
				}
				a.log.Warn("interrupted migration not settled yet", "migration", m.Id, "container", c.name, "err", err)
				select {
				case <-a.done:
					return
				case <-time.After(10 * time.Second):
				}
			}
		}()
	}
	a.interrupted = nil
}

func (a *Agent) settleInterrupted(m *api.Migration, c *container, lc *libcontainer.Container) (bool, error) {
	log := a.log.With("migration", m.Id, "container", c.name, "peer", m.Peer)
	peer, err := client.DialTLS(m.Peer, a.cfg.TLSDir)
	if err != nil {
		return false, err
	}
	defer func() { _ = peer.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pc, err := peer.GetContainer(ctx, &api.GetContainerRequest{Name: c.name})
	switch {
	case err == nil && pc.State == StateRunning:
		log.Warn("the peer runs the container: removing the frozen copy here")
		if err := a.finishMigratedAway(c, m.PeerNode); err != nil {
			return false, err
		}
		m.State, m.Phase, m.Error = MigrationSucceeded, "done", "completed after a ferryd restart"
	case err == nil || status.Code(err) == codes.NotFound:
		if err == nil {
			if _, aerr := peer.AbortIncoming(ctx, &api.AbortIncomingRequest{MigrationId: m.Id, Reason: "source restarted before the confirmation"}); aerr != nil && status.Code(aerr) != codes.NotFound {
				return false, aerr
			}
		}
		log.Warn("the peer does not run the container: thawing it here")
		if a.net != nil {
			if err := a.net.Activate(ctx, c.name); err != nil {
				return false, err
			}
		}
		if err := lc.Resume(); err != nil {
			return false, err
		}
		a.mu.Lock()
		c.reason = ""
		a.mu.Unlock()
		m.State, m.Phase, m.Error = MigrationRolledBack, "rollback", "rolled back after a ferryd restart"
	default:
		return false, err
	}
	m.FinishedAt = ts(time.Now())
	a.saveMigration(m)
	return true, nil
}
