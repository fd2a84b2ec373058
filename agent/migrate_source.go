package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
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
	MigrationCanceled   = "canceled"

	EventContainerMigrated   = "container.migrated"
	EventContainerMigratedIn = "container.migrated_in"
)

// migrationsDir holds one JSON file per migration this agent ran as the source.
func (a *Agent) migrationsDir() string { return filepath.Join(a.cfg.Root, "migrations") }

// workDir is where migration id keeps its CRIU images and work files, on
// either side. It lies under the state root, not the run directory: a
// stop-and-copy's images are as large as the container's memory, and /run
// is a tmpfs on most hosts, memory that cannot be reclaimed the way the
// page cache of a file on disk can, on a node that may be short of memory
// (why it migrates). Nothing in it outlives a ferryd restart (Load).
func (a *Agent) workDir(id string) string { return filepath.Join(a.workRoot(), id) }

func (a *Agent) workRoot() string { return filepath.Join(a.cfg.Root, "work") }

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

// validateMigrate checks a request before anything is touched and returns
// the requested mode.
func (a *Agent) validateMigrate(req *api.MigrateRequest) (string, error) {
	if err := ValidateName(req.GetName()); err != nil {
		return "", err
	}
	host, port, err := net.SplitHostPort(req.GetPeer())
	if err != nil || host == "" || port == "" {
		return "", fmt.Errorf("peer %q: want HOST:PORT of the peer's --listen address: %w", req.GetPeer(), ErrInvalidArgument)
	}
	if req.GetMaxDowntimeMs() < 0 {
		return "", fmt.Errorf("max_downtime %dms: negative: %w", req.GetMaxDowntimeMs(), ErrInvalidArgument)
	}
	if req.GetMaxRounds() < 0 {
		return "", fmt.Errorf("max_rounds %d: negative: %w", req.GetMaxRounds(), ErrInvalidArgument)
	}
	if req.GetBandwidthBytesPerSecond() < 0 {
		return "", fmt.Errorf("bandwidth %d: negative: %w", req.GetBandwidthBytesPerSecond(), ErrInvalidArgument)
	}
	if id := req.GetMigrationId(); id != "" && !migrationIDRE.MatchString(id) {
		return "", fmt.Errorf("migration_id %q: must match %s: %w", id, nameRE, ErrInvalidArgument)
	}
	switch m := req.GetMode(); m {
	case "", "auto":
		return "auto", nil
	case migrate.ModeStopCopy, migrate.ModePostCopy, migrate.ModePreCopy:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: want auto, precopy, postcopy or stopcopy: %w", req.GetMode(), ErrInvalidArgument)
}

// chooseMode settles the mode from the request and both ends' features.
func (a *Agent) chooseMode(requested string, here, peer *api.MigrationFeatures, peerNode string, p migrate.Prediction, unfit string) (string, string, error) {
	switch requested {
	case migrate.ModeStopCopy:
		return requested, "requested", nil
	case migrate.ModePreCopy:
		if !here.GetMemDirtyTrack() {
			return "", "", fmt.Errorf("mode precopy: this kernel has no soft-dirty memory tracking (criu check --feature mem_dirty_track): %w", ErrFailedPrecondition)
		}
		return requested, "requested", nil
	case migrate.ModePostCopy:
		if !here.GetLazyPages() {
			return "", "", fmt.Errorf("mode postcopy: this node cannot serve lazy pages: %s: %w", here.GetLazyPagesReason(), ErrFailedPrecondition)
		}
		if !peer.GetLazyPages() {
			return "", "", fmt.Errorf("mode postcopy: peer %s cannot take lazy pages: %s: %w", peerNode, peer.GetLazyPagesReason(), ErrFailedPrecondition)
		}
		if unfit != "" {
			return "", "", fmt.Errorf("mode postcopy: %s (stopcopy keeps the sharing): %w", unfit, ErrFailedPrecondition)
		}
		return requested, "requested", nil
	}
	f := autoFeatures(here, peer)
	if unfit != "" {
		// Not an option for this container: as if an end lacked it.
		f.Source.LazyPages = false
	}
	mode, why := migrate.AutoMode(f, p)
	return mode, why, nil
}

// ProbeMax is the most a bandwidth probe may send.
const ProbeMax = 64 << 20

// probeBandwidth measures the channel to the peer by streaming size bytes
// of filler through it (ProbeBandwidth). A short probe on a fresh stream
// reads low rather than high (flow control still opening up), which errs
// toward post-copy.
func probeBandwidth(ctx context.Context, peer api.FerryClient, size int64) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	start := time.Now()
	stream, err := peer.ProbeBandwidth(ctx)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	for sent := int64(0); sent < size; sent += int64(len(buf)) {
		if err := stream.Send(&api.ProbeChunk{Data: buf[:min(int64(len(buf)), size-sent)]}); err != nil {
			_, rerr := stream.CloseAndRecv()
			return 0, errors.Join(err, rerr)
		}
	}
	r, err := stream.CloseAndRecv()
	if err != nil {
		return 0, err
	}
	if r.GetBytes() != size {
		return 0, fmt.Errorf("the peer counted %d bytes of %d", r.GetBytes(), size)
	}
	return float64(size) / time.Since(start).Seconds(), nil
}

// probeSize is how much a probe sends for a container of memory bytes: a
// quarter of it, between 1 and 16 MiB.
func probeSize(memory int64) int64 { return min(max(memory/4, 1<<20), 16<<20) }

// peerBandwidth is the bandwidth auto mode predicts with: the cap, or what
// the last stop-and-copy to that node measured end to end (its pages move
// during its dump, the other images after it: all it sent over the two).
func (a *Agent) peerBandwidth(peerNode string, limit int64) float64 {
	var bw float64
	a.mu.Lock()
	var last *api.Migration
	for _, m := range a.migrations {
		if m.PeerNode == peerNode && m.State == MigrationSucceeded && m.Mode == migrate.ModeStopCopy &&
			m.DumpMs+m.TransferMs >= 50 && m.BytesSent >= 4<<20 && (last == nil || m.StartedAt > last.StartedAt) {
			last = m
		}
	}
	if last != nil {
		bw = float64(last.BytesSent) / (float64(last.DumpMs+last.TransferMs) / 1000)
	}
	a.mu.Unlock()
	if limit > 0 && (bw == 0 || float64(limit) < bw) {
		bw = float64(limit)
	}
	return bw
}

// memoryOf is the container's memory working set, what a dump writes.
func (a *Agent) memoryOf(name string) int64 {
	for _, c := range a.NodeReport().Containers {
		if c.ID == name && c.Usage != nil {
			return c.Usage.MemoryWorkingSet
		}
	}
	return 0
}

// runningMigration lets CancelMigration reach a migration before its freeze.
type runningMigration struct {
	cancel context.CancelCauseFunc
	frozen bool
}

// CancelMigration stops a migration that has not frozen the container yet.
func (a *Agent) CancelMigration(ctx context.Context, id string) (*api.Migration, error) {
	a.mu.Lock()
	r, ok := a.running[id]
	if ok && !r.frozen {
		r.cancel(fmt.Errorf("migration %s: %w", id, ErrCanceled))
	}
	a.mu.Unlock()
	if !ok {
		if m, err := a.GetMigration(id); err == nil {
			return nil, fmt.Errorf("migration %q: already %s: %w", id, m.State, ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("migration %q: %w", id, ErrNotFound)
	}
	if r.frozen {
		return nil, fmt.Errorf("migration %q: the container is frozen already; the migration ends by itself, moved or rolled back: %w", id, ErrFailedPrecondition)
	}
	// Wait for it to wind down (it saves its record as it ends).
	for {
		m, err := a.GetMigration(id)
		if err == nil && m.State != MigrationRunning {
			return m, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Migrate moves the running container req.Name to the peer agent: handshake
// and preparation on the peer, freeze, final dump (the tasks stay frozen
// here), transfer of the images, the upper layer and the log inside the
// mutual-TLS channel, restore on the peer. In post-copy the dump leaves the
// memory in CRIU's page server, the peer restores without it and fetches
// pages on fault through a tunnel in the same channel. Only the peer's
// confirmation (post-copy: its last page in) lets this agent delete its
// copy; any failure before it thaws the container here, where it was, and
// has the peer remove what it made.
func (a *Agent) Migrate(ctx context.Context, req *api.MigrateRequest, progress func(*api.Migration)) (_ *api.Migration, retErr error) {
	requested, err := a.validateMigrate(req)
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
	if _, dup := a.running[id]; dup {
		a.mu.Unlock()
		return nil, fmt.Errorf("migration %q: already running: %w", id, ErrAlreadyExists)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	run := &runningMigration{cancel: cancel}
	a.running[id] = run
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.running, id)
		a.mu.Unlock()
	}()
	if st != StateRunning {
		return nil, fmt.Errorf("container %q: %s, not running: %w", c.name, st, ErrFailedPrecondition)
	}
	log := a.log.With("container", c.name, "migration", id, "peer", req.GetPeer())
	start := time.Now()
	m := &api.Migration{Id: id, Container: c.name, Peer: req.GetPeer(), Phase: "handshake", State: MigrationRunning, StartedAt: ts(start)}
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
	var settleAfter func() // set when the outcome is left to settle with the peer
	defer func() {
		m.FinishedAt, m.TotalMs = ts(time.Now()), time.Since(start).Milliseconds()
		if retErr != nil {
			// A cancel (only honoured before the freeze) is what ended it,
			// whatever call it interrupted.
			if cause := context.Cause(ctx); errors.Is(cause, ErrCanceled) {
				retErr = cause
				m.State = MigrationCanceled
			}
			m.Error = retErr.Error()
			if m.State == MigrationRunning {
				m.State = MigrationFailed
			}
		}
		a.saveMigration(m)
		if progress != nil {
			progress(proto.Clone(m).(*api.Migration))
		}
		if settleAfter != nil {
			settleAfter()
		}
	}()

	peer, err := client.DialTLS(req.GetPeer(), a.cfg.TLSDir)
	if err != nil {
		return nil, fmt.Errorf("peer %q: %w", req.GetPeer(), err)
	}
	defer func() { _ = peer.Close() }()
	hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
	v, err := peer.Version(hctx, &api.VersionRequest{})
	hcancel()
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
	pred := migrate.Prediction{MemoryBytes: a.memoryOf(c.name), Bandwidth: a.peerBandwidth(v.NodeName, req.GetBandwidthBytesPerSecond()),
		DowntimeTarget: time.Duration(req.GetMaxDowntimeMs()) * time.Millisecond}
	lc, err := libcontainer.Load(a.lcRoot, c.name)
	if err != nil {
		return nil, fmt.Errorf("container %q: %w", c.name, err)
	}
	warmCriuVersion(lc)
	here := a.MigrationFeatures()
	probed := ""
	if requested == "auto" && pred.Bandwidth == 0 && !here.GetMemDirtyTrack() {
		// Auto mode predicts from the bandwidth: measure it now, as
		// neither a cap nor an earlier migration to that node gives it.
		bw, err := probeBandwidth(ctx, peer.FerryClient, probeSize(pred.MemoryBytes))
		if err != nil {
			log.Warn("bandwidth probe", "err", err)
		} else {
			pred.Bandwidth = bw
			probed = fmt.Sprintf("; bandwidth probed: %s/s", humanSize(int64(bw)))
		}
	}
	unfit := postcopyFits(lc, pred.MemoryBytes, rec.Spec.Resources.Ceiling.Memory)
	mode, reason, err := a.chooseMode(requested, here, v.GetFeatures(), v.NodeName, pred, unfit)
	if err != nil {
		return nil, err
	}
	reason += probed
	if unfit != "" && mode != migrate.ModePostCopy && requested == "auto" {
		reason += "; post-copy ruled out: " + unfit
	}
	m.Mode, m.ModeReason = mode, reason
	if d := pred.StopCopyDowntime(); mode == migrate.ModeStopCopy && d != migrate.UnknownDowntime {
		m.PredictedDowntimeMs = d.Milliseconds()
	}
	postcopy, precopy := mode == migrate.ModePostCopy, mode == migrate.ModePreCopy
	streamPages := mode == migrate.ModeStopCopy && pred.MemoryBytes >= a.cfg.StopCopyStreamMin
	if streamPages {
		m.ModeReason += fmt.Sprintf("; pages stream to the peer during the dump (%s in use, at least --stopcopy-stream-min %s)",
			humanSize(pred.MemoryBytes), humanSize(a.cfg.StopCopyStreamMin))
	}
	pace := newPacer(req.GetBandwidthBytesPerSecond())

	spec := rec.Spec
	spec.IP = rec.IP // the address moves with the container
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	digest, err := a.rootfs.digest(spec.Rootfs)
	if err != nil {
		return nil, fmt.Errorf("container %q: %w", c.name, err)
	}
	cpuinfo, err := a.cpuinfoDump()
	if err != nil {
		return nil, fmt.Errorf("describe this CPU for the peer: %w", err)
	}
	report("prepare")
	pctx, pcancel := context.WithTimeout(ctx, 60*time.Second)
	_, err = peer.PrepareIncoming(pctx, &api.PrepareIncomingRequest{MigrationId: id, SourceNode: a.cfg.NodeName,
		AgentVersion: a.cfg.Version, CriuVersion: a.criuVersion, CgroupMode: cgroup.Mode(), SpecJson: specJSON, Mode: mode,
		RootfsDigest: digest, Cpuinfo: cpuinfo, MemoryInUse: pred.MemoryBytes})
	pcancel()
	if err != nil {
		if lostCall(err) {
			// Its outcome is unknown (the peer died, the wire was cut,
			// time ran out): the peer may hold a full preparation and
			// the guarantee's reservation. It is told to drop them once
			// it can be reached.
			a.abortAtPeerInBackground(m, "the source lost its preparation call: "+err.Error())
			return nil, fmt.Errorf("peer %s: preparation: %w", v.NodeName, err)
		}
		return nil, fmt.Errorf("peer %s refused: %w", v.NodeName, err)
	}
	confirmed, frozen, peerMayRun := false, false, false
	aborted := false
	var abortErr error
	abortPeer := func(reason string) error {
		if !aborted {
			aborted = true
			actx, acancel := context.WithTimeout(context.Background(), 60*time.Second)
			_, abortErr = peer.AbortIncoming(actx, &api.AbortIncomingRequest{MigrationId: id, Reason: reason})
			acancel()
			if abortErr != nil {
				log.Warn("peer abort", "err", abortErr)
			}
		}
		return abortErr
	}
	defer func() {
		if retErr != nil && !confirmed && !frozen {
			_ = abortPeer(retErr.Error())
		}
	}()
	if err := failpoint.Check("source-prepared"); err != nil {
		return nil, err
	}

	work := a.workDir(id)
	images := filepath.Join(work, "images")
	defer func() { _ = os.RemoveAll(work) }()
	if err := os.MkdirAll(work, 0o700); err != nil {
		return nil, err
	}

	// What libcontainer's options cannot say to CRIU, its configuration
	// file for this container does (criuconf.go); written now, before the
	// freeze, and put back to the default if the container stays here.
	viaConf := usesCriuConf(lc, c.dir)
	if viaConf {
		if err := writeCriuConf(c.dir, criuCall{lazyPages: postcopy}); err != nil {
			return nil, err
		}
		if postcopy {
			defer func() {
				if !confirmed {
					if err := writeCriuConf(c.dir, criuCall{}); err != nil {
						log.Warn("restore the CRIU configuration", "err", err)
					}
				}
			}()
		}
	}

	// Pre-copy rounds run while the container does (a cancel still stops
	// them), each sending its pages through CRIU's page server as CRIU
	// dumps them.
	var pageSend *pageSender
	parentDir := ""
	if precopy || streamPages {
		pageSend = newPageSender(a.criuView, peer, id, pace)
		defer pageSend.close()
	}
	if precopy {
		report("precopy")
		if parentDir, err = a.preCopy(ctx, pageSend, lc, work, req, m, report); err != nil {
			return nil, fmt.Errorf("pre-copy: %w", err)
		}
	}

	// The last moment a cancel is honoured.
	a.mu.Lock()
	if err := context.Cause(ctx); err != nil {
		a.mu.Unlock()
		return nil, err
	}
	run.frozen = true
	a.mu.Unlock()
	// From here the migration ends by itself; the caller going away
	// (ferryctl interrupted) must not cut it short.
	ctx = context.WithoutCancel(ctx)
	if pageSend != nil {
		// The peer's page server for the final dump starts now, not in
		// the freeze.
		if err := pageSend.prepare(ctx, filepath.Base(images), parentDir); err != nil {
			return nil, fmt.Errorf("page tunnel: %w", err)
		}
	}

	report("freeze")
	frozeAt := time.Now()
	if err := lc.Pause(); err != nil {
		return nil, fmt.Errorf("freeze: %w", err)
	}
	frozen = true
	deactivated := false
	var lazy *lazyDump
	defer func() {
		if retErr == nil || confirmed {
			return
		}
		// The peer's copy goes first, so that the container never runs
		// on both nodes at once.
		aerr := abortPeer(retErr.Error())
		if lazy != nil {
			// CRIU resumes the tasks as it found them: frozen. Without
			// their page source a copy on the peer cannot go on.
			if err := lazy.abort(); err != nil {
				log.Warn("rollback: lazy dump", "err", err)
			}
		}
		if peerMayRun && aerr != nil {
			// The peer may run the container and did not say it removed
			// it: this copy stays frozen until the peer answers.
			m.Phase, m.State = "settle", MigrationFailed
			retErr = fmt.Errorf("%w; the peer did not confirm it removed its copy (%w): the container stays frozen here until the peer answers", retErr, aerr)
			a.mu.Lock()
			c.reason = fmt.Sprintf("frozen by migration %s to %s: the peer did not confirm it removed its copy; settling with the peer", m.Id, m.PeerNode)
			a.mu.Unlock()
			settleAfter = func() { a.settleInBackground(proto.Clone(m).(*api.Migration), c, lc) }
			return
		}
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
	}()
	if a.net != nil {
		// From here the address answers nowhere until the peer activates it
		// (or the rollback here does): no segment reaches the sockets while
		// CRIU dumps them, and none after, when this namespace could only
		// reset the connections that move. This is the network lock CRIU's
		// dump would otherwise take with iptables (criuconf.go).
		deactivated = true // the rollback's Activate also mends a half-done Deactivate
		if err := a.net.Deactivate(ctx, c.name); err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
	}
	if err := failpoint.Check("source-frozen"); err != nil {
		return nil, fmt.Errorf("dump: %w", err)
	}
	report("dump")
	dumpStart := time.Now()
	criuWork := filepath.Join(work, "criu")
	switch {
	case postcopy:
		lazy, err = a.startLazyDump(ctx, lc, images, criuWork, !viaConf)
	case precopy:
		var n int64
		n, _, err = pageSend.dump(ctx, lc, images, criuWork, parentDir, finalDumpOpts())
		m.BytesSent += n
		if err != nil {
			err = fmt.Errorf("dump: %w", err)
		}
	case streamPages:
		// A large stop-and-copy: the pages go to the peer's page server
		// as CRIU dumps them, as pre-copy's final dump does; they are
		// never written here, and dumping and sending overlap. The
		// other images follow with the upper layer.
		sentBefore := m.BytesSent
		stopTicker := pageSend.reportWhileDumping(func(n int64) {
			m.BytesSent, m.TotalMs = sentBefore+n, time.Since(start).Milliseconds()
			if progress != nil {
				progress(proto.Clone(m).(*api.Migration))
			}
		})
		var n int64
		n, _, err = pageSend.dump(ctx, lc, images, criuWork, "", finalDumpOpts())
		stopTicker()
		m.BytesSent = sentBefore + n
		if err != nil {
			err = fmt.Errorf("dump: %w", err)
		}
	default:
		// A small stop-and-copy dumps to this node and streams the
		// images after (see StopCopyStreamMin).
		opts := finalDumpOpts()
		opts.ImagesDirectory, opts.WorkDirectory = images, criuWork
		err = a.criuView.Do(func() error { return criuDump(lc, &opts, nil) })
		if err != nil {
			err = fmt.Errorf("dump: %w%s", err, criuLogTail(filepath.Join(criuWork, "dump.log")))
		}
	}
	m.DumpMs = time.Since(dumpStart).Milliseconds()
	if err != nil {
		return nil, err
	}
	// CRIU writes its stats into the work directory when one is given.
	if ds, err := migrate.ReadDumpStats(criuWork); err == nil {
		m.CriuFrozenMs = ds.FrozenTime.Milliseconds()
		m.PagesWritten = int64(ds.PagesWritten)
		if precopy {
			m.FinalPagesWritten, m.FinalPagesSkippedParent = int64(ds.PagesWritten), int64(ds.PagesSkippedParent)
			if err := ds.CheckParentUsed(); err != nil {
				log.Warn("the final dump did not use the pre-copy rounds", "err", err)
			}
		}
	}

	report("transfer")
	xferStart := time.Now()
	lastReport := time.Now()
	sentBefore := m.BytesSent
	sent, err := a.sendImages(ctx, peer, id, images, c, pace, func(n int64) {
		if time.Since(lastReport) < 200*time.Millisecond || progress == nil {
			return
		}
		lastReport = time.Now()
		m.BytesSent, m.TotalMs = sentBefore+n, time.Since(start).Milliseconds()
		progress(proto.Clone(m).(*api.Migration))
	})
	m.BytesSent, m.TransferMs = sentBefore+sent, time.Since(xferStart).Milliseconds()
	if err != nil {
		return nil, fmt.Errorf("transfer: %w", err)
	}

	var pages atomic.Int64
	var tunnel <-chan error
	tctx, tcancel := context.WithCancel(ctx)
	defer tcancel()
	if postcopy {
		// The tunnel is up before the restore: the peer's lazy-pages
		// daemon connects while the restore runs.
		if tunnel, err = openTunnelStream(tctx, peer.FerryClient, id, lazy.conn, pace, &pages); err != nil {
			return nil, fmt.Errorf("page tunnel: %w", err)
		}
	}

	report("restore")
	peerMayRun = true
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Minute)
	rr, err := peer.RestoreIncoming(rctx, &api.RestoreIncomingRequest{MigrationId: id})
	rcancel()
	if err != nil {
		// An answer from the peer means it removed its copy; a lost
		// call leaves open whether it runs one.
		peerMayRun = lostCall(err)
		return nil, fmt.Errorf("restore on %s: %w", v.NodeName, err)
	}
	m.RestoreMs = rr.RestoreMs
	m.FrozenMs = time.Since(frozeAt).Milliseconds()
	if postcopy {
		// The container runs on the peer; this copy stays frozen and
		// serves its pages until the peer has them all.
		report("postcopy")
		if err := a.awaitPostcopy(ctx, peer, id, lazy, tunnel, &pages, m, progress, start); err != nil {
			return nil, fmt.Errorf("post-copy: %w", err)
		}
	}
	confirmed = true
	if err := failpoint.Check("source-after-confirm"); err != nil {
		log.Warn("failpoint", "err", err)
	}

	report("cleanup")
	if err := a.finishMigratedAway(c, v.NodeName); err != nil {
		// Never undone: the container runs on the peer. ferryd's start retries.
		log.Error("cleanup after migration", "err", err)
	}
	m.State = MigrationSucceeded
	m.Phase = "done"
	a.events.Publish(Event{Type: EventContainerMigrated, Container: c.name, Message: "migrated to " + v.NodeName,
		Attrs: map[string]string{"peer": req.GetPeer(), "peer_node": v.NodeName, "migration": id, "mode": mode,
			"frozen_ms": fmt.Sprint(m.FrozenMs)}})
	log.Info("migration done", "mode", mode, "frozen_ms", m.FrozenMs, "total_ms", time.Since(start).Milliseconds(), "bytes", m.BytesSent)
	return m, nil
}

// lostCall tells a call whose outcome on the peer is unknown (the channel
// broke or timed out) from one the peer answered.
func lostCall(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.Unknown:
		return true
	}
	return false
}

// awaitPostcopy follows the page traffic after the peer's restore: the
// dump here ends once every page is served, and the peer confirms that it
// has them all.
func (a *Agent) awaitPostcopy(ctx context.Context, peer *client.Client, id string, lazy *lazyDump, tunnel <-chan error,
	pages *atomic.Int64, m *api.Migration, progress func(*api.Migration), start time.Time) error {
	base := m.BytesSent
	pcStart := time.Now()
	complete := make(chan error, 1)
	var pcMs int64
	go func() {
		r, err := peer.CompleteIncoming(ctx, &api.CompleteIncomingRequest{MigrationId: id})
		if err == nil {
			pcMs = r.PostcopyMs
		}
		complete <- err
	}()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var dumpErr, tunnelErr, completeErr error
	dumpDone, tunnelDone, completeDone := false, false, false
	for !(dumpDone && tunnelDone && completeDone) {
		select {
		case dumpErr = <-lazy.done:
			lazy.done <- dumpErr
			dumpDone = true
		case tunnelErr = <-tunnel:
			tunnelDone = true
		case completeErr = <-complete:
			completeDone = true
		case <-tick.C:
			if progress != nil {
				m.BytesSent, m.PostcopyBytes = base+pages.Load(), pages.Load()
				m.TotalMs = time.Since(start).Milliseconds()
				progress(proto.Clone(m).(*api.Migration))
			}
			continue
		}
		if err := errors.Join(dumpErr, tunnelErr, completeErr); err != nil {
			return err
		}
	}
	_ = lazy.ns.Close()
	m.BytesSent, m.PostcopyBytes = base+pages.Load(), pages.Load()
	m.PostcopyMs = pcMs
	if m.PostcopyMs == 0 {
		m.PostcopyMs = time.Since(pcStart).Milliseconds()
	}
	return nil
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
	if err := failpoint.Check("source-cleanup"); err != nil {
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
func (a *Agent) sendImages(ctx context.Context, peer *client.Client, id, images string, c *container, pace *pacer, sentSoFar func(int64)) (int64, error) {
	stream, err := peer.SendImages(metadata.AppendToOutgoingContext(ctx, MigrationIDKey, id))
	if err != nil {
		return 0, err
	}
	w := &chunkWriter{id: id}
	w.send = func(ch *api.ImageChunk) error {
		err := stream.Send(ch)
		sentSoFar(w.n)
		pace.wait(len(ch.Data))
		if errors.Is(err, io.EOF) {
			// The peer ended the stream; its status says why. (An io.EOF
			// passed on would read as a file that shrank.)
			if _, err = stream.CloseAndRecv(); err == nil {
				err = errors.New("the peer ended the image stream early")
			}
		}
		if err != nil {
			return fmt.Errorf("send to the peer: %w", err)
		}
		return nil
	}
	parts := []struct {
		name, dir string
		opts      migrate.WriteOptions
	}{
		// A pre-copy's final dump links its parent round; the peer's page
		// server made that link on its side.
		{"images", images, migrate.WriteOptions{Skip: []string{"parent"}}},
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
			// Never frozen, or already thawed: it runs here. Before
			// the restore was asked for, the peer cannot run it; what
			// it prepared is dropped now rather than held (with its
			// reservation) until its idle timeout.
			a.endUnfrozen(m)
			continue
		}
		a.mu.Lock()
		c.reason = fmt.Sprintf("frozen by migration %s to %s, interrupted by a ferryd restart; settling with the peer", m.Id, m.Peer)
		a.mu.Unlock()
		a.settleInBackground(m, c, lc)
	}
	a.interrupted = nil
}

// endUnfrozen ends a migration ferryd died in before it asked the peer to
// restore, its container still running here: it records it as failed and
// tells the peer to drop what it prepared.
func (a *Agent) endUnfrozen(m *api.Migration) {
	switch m.Phase {
	case "restore", "postcopy", "cleanup", "done":
		// The peer may run it (a container here that is not frozen then
		// is one being removed after the confirmation): nothing to undo.
		return
	}
	m = proto.Clone(m).(*api.Migration)
	m.State, m.Error, m.FinishedAt = MigrationFailed, "interrupted by a ferryd restart before the freeze; the container ran on here", ts(time.Now())
	a.saveMigration(m)
	a.abortAtPeerInBackground(m, "source restarted before the freeze")
}

// abortAtPeerInBackground tells m's peer to drop what it holds of m,
// retrying every 5 s until the peer answers or its own idle timeout would
// have dropped it anyway.
func (a *Agent) abortAtPeerInBackground(m *api.Migration, reason string) {
	m = proto.Clone(m).(*api.Migration)
	a.watchers.Add(1)
	go func() {
		defer a.watchers.Done()
		deadline := time.Now().Add(incomingTimeout)
		for {
			err := a.abortAtPeer(m, reason)
			if err == nil || time.Now().After(deadline) {
				if err != nil {
					a.log.Warn("migration: the peer was not told to drop it", "migration", m.Id, "err", err)
				}
				return
			}
			select {
			case <-a.done:
				return
			case <-time.After(5 * time.Second):
			}
		}
	}()
}

// abortAtPeer tells m's peer to drop what it holds of m.
func (a *Agent) abortAtPeer(m *api.Migration, reason string) error {
	peer, err := client.DialTLS(m.Peer, a.cfg.TLSDir)
	if err != nil {
		return err
	}
	defer func() { _ = peer.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return abortIncomingAt(ctx, peer.FerryClient, m.Id, reason)
}

// abortIncomingAt tells peer to drop incoming migration id; a peer that
// holds nothing of it is as good.
func abortIncomingAt(ctx context.Context, peer api.FerryClient, id, reason string) error {
	if _, err := peer.AbortIncoming(ctx, &api.AbortIncomingRequest{MigrationId: id, Reason: reason}); err != nil && status.Code(err) != codes.NotFound {
		return err
	}
	return nil
}

// settleInBackground settles with the peer, until it answers, a migration
// whose container is frozen here and may run there.
func (a *Agent) settleInBackground(m *api.Migration, c *container, lc *libcontainer.Container) {
	a.watchers.Add(1)
	go func() {
		defer a.watchers.Done()
		for {
			done, err := a.settleInterrupted(m, c, lc)
			if done {
				return
			}
			a.log.Warn("interrupted migration not settled yet", "migration", m.Id, "container", c.name, "err", err)
			select {
			case <-a.done:
				return
			case <-time.After(5 * time.Second):
			}
		}
	}()
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
			if aerr := abortIncomingAt(ctx, peer.FerryClient, m.Id, "source restarted before the confirmation"); aerr != nil {
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
