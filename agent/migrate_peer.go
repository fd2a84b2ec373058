package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/internal/atomicfile"
	"github.com/ferry-agent/ferry/internal/failpoint"
	"github.com/ferry-agent/ferry/internal/privnet"
	"github.com/ferry-agent/ferry/migrate"
	"github.com/ferry-agent/ferry/netsetup"
)

// incoming is a container this agent is receiving from a source agent.
type incoming struct {
	id       string
	c        *container
	images   string
	received bool
	timer    *time.Timer
	mode     string // stopcopy, precopy or postcopy
	// memoryInUse is what the container used on the source when the
	// migration began (0: not said).
	memoryInUse int64
	source      string       // the source's node name
	mon         *monitorProc // staged at the preparation; guarded by Agent.mu (takeMonitor)

	// Post-copy only.
	pageNS   *privnet.NS   // the migration's private loopback (post-copy: the lazy-pages daemon runs in it)
	lazyConn net.Conn      // ferryd's end of the lazy-pages daemon's page server socket
	lazyPeer *os.File      // the daemon's end, until the monitor has it
	tunnel   atomic.Bool   // a PageTunnel is open
	outcome  chan struct{} // closed when the restored copy has every page, or was removed
	outErr   error
	outOnce  sync.Once
	postcopy time.Duration // from the restore's end to the last page in
}

// Limits on what a source may send.
const (
	incomingMaxBytes = 64 << 30
	incomingMaxFiles = 1 << 20
	// An incoming migration nobody works on for this long is removed:
	// its source is gone or cut off. Every call and chunk for it resets it.
	incomingTimeout = 2 * time.Minute
)

func (a *Agent) getIncoming(id string) (*incoming, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	in, ok := a.incoming[id]
	if !ok {
		return nil, fmt.Errorf("incoming migration %q: %w", id, ErrNotFound)
	}
	return in, nil
}

// PrepareIncoming admits a container a source agent wants to hand over and
// prepares everything before the source freezes it. It changes nothing when
// it refuses.
func (a *Agent) PrepareIncoming(ctx context.Context, req *api.PrepareIncomingRequest) (_ *api.PrepareIncomingResponse, retErr error) {
	id := req.GetMigrationId()
	if !migrationIDRE.MatchString(id) {
		return nil, fmt.Errorf("migration_id %q: must match %s: %w", id, nameRE, ErrInvalidArgument)
	}
	if req.GetSourceNode() == a.cfg.NodeName {
		return nil, fmt.Errorf("source node %q: is this node: %w", req.GetSourceNode(), ErrInvalidArgument)
	}
	if err := failpoint.Check("peer-prepare"); err != nil {
		return nil, err
	}
	mode := req.GetMode()
	switch mode {
	case "", migrate.ModeStopCopy:
		mode = migrate.ModeStopCopy
	case migrate.ModePostCopy:
		if f := a.MigrationFeatures(); !f.LazyPages {
			return nil, fmt.Errorf("mode postcopy: this node (%s) cannot take lazy pages: %s: %w", a.cfg.NodeName, f.LazyPagesReason, ErrFailedPrecondition)
		}
	case migrate.ModePreCopy:
	default:
		return nil, fmt.Errorf("mode %q: this agent takes stopcopy, precopy or postcopy: %w", mode, ErrInvalidArgument)
	}
	var spec Spec
	if err := json.Unmarshal(req.GetSpecJson(), &spec); err != nil {
		return nil, fmt.Errorf("spec: %w: %w", err, ErrInvalidArgument)
	}
	// The source resolved the bundle already; only its rootfs is used here,
	// and it must lie where remote callers may point.
	spec.Bundle = ""
	if err := a.checkRemoteRootfs("rootfs", spec.Rootfs); err != nil {
		return nil, err
	}
	if err := NormalizeSpec(&spec, a.cfg.DefaultRootfs, a.policy); err != nil {
		return nil, err
	}
	if d := req.GetRootfsDigest(); d != "" {
		local, err := a.rootfs.digest(spec.Rootfs)
		if err != nil {
			return nil, fmt.Errorf("rootfs %s: not usable here: %w: %w", spec.Rootfs, err, ErrFailedPrecondition)
		}
		if local != d {
			return nil, fmt.Errorf("rootfs %s: differs from the source's (%s here, %s there): %w", spec.Rootfs, local, d, ErrFailedPrecondition)
		}
	}
	if img := req.GetCpuinfo(); len(img) > 0 {
		if err := a.cpuinfoCheck(img); err != nil {
			return nil, fmt.Errorf("CPU: CRIU cannot restore here what the source's CPU ran: %w: %w", err, ErrFailedPrecondition)
		}
	}
	if spec.IP != "" && a.net == nil {
		return nil, fmt.Errorf("container %q: keeps address %s, but networking is off on this node: %w", spec.Name, spec.IP, ErrFailedPrecondition)
	}
	log := a.log.With("container", spec.Name, "migration", id, "source", req.GetSourceNode())
	c := &container{name: spec.Name, dir: filepath.Join(a.crDir, spec.Name), creating: true}
	a.mu.Lock()
	if _, ok := a.incoming[id]; ok {
		a.mu.Unlock()
		return nil, fmt.Errorf("incoming migration %q: %w", id, ErrAlreadyExists)
	}
	if _, ok := a.ctrs[spec.Name]; ok {
		a.mu.Unlock()
		return nil, fmt.Errorf("container %q: %w", spec.Name, ErrAlreadyExists)
	}
	a.ctrs[spec.Name] = c
	a.mu.Unlock()
	defer func() {
		if retErr != nil {
			a.mu.Lock()
			delete(a.ctrs, spec.Name)
			a.mu.Unlock()
		}
	}()
	if err := a.node.Admit(spec.Name, spec.Resources.Guarantee); err != nil {
		log.Warn("incoming refused", "err", err)
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	if err := a.fitsWhileScarce(spec.Name, spec.Resources, req.GetMemoryInUse()); err != nil {
		a.node.Release(spec.Name)
		log.Warn("incoming refused", "err", err)
		return nil, err
	}
	defer func() {
		if retErr != nil {
			a.node.Release(spec.Name)
		}
	}()
	if err := os.Mkdir(c.dir, 0o700); err != nil {
		return nil, fmt.Errorf("container %q: state dir: %w", spec.Name, err)
	}
	defer func() {
		if retErr != nil {
			if err := a.teardown(spec.Name, c.dir); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("undo: %w", err))
			}
		}
	}()
	c.rec = record{Spec: spec, Cgroup: filepath.Join(a.cfg.CgroupParent, spec.Name), CreatedAt: time.Now().UTC(), Incoming: id}
	if a.net != nil {
		var pin netip.Addr
		if spec.IP != "" {
			pin = netip.MustParseAddr(spec.IP)
		}
		// On standby: the source still owns the address on the segment.
		ep, err := a.net.Setup(ctx, spec.Name, netsetup.SetupOptions{IP: pin, Standby: true, Ports: spec.Ports})
		if err != nil {
			return nil, fmt.Errorf("container %q: network: %w", spec.Name, err)
		}
		c.rec.IP, c.rec.MAC, c.rec.Netns = ep.IP.Addr().String(), ep.MAC.String(), ep.NetnsPath
		// Until the restore is done this namespace sends no TCP resets: a
		// peer's segment that arrives before its socket is restored is
		// dropped and retransmitted, never answered with a reset that would
		// end the connection. Set now, off the downtime's path; it goes
		// with the namespace if the migration is aborted.
		if err := holdTCP(ep.NetnsPath, true); err != nil {
			return nil, fmt.Errorf("container %q: network: %w", spec.Name, err)
		}
	}
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, specFile), c.rec, 0o600); err != nil {
		return nil, err
	}
	for _, d := range []string{"upper", "work", "rootfs"} {
		if err := os.MkdirAll(filepath.Join(c.dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	if err := writeCriuConf(c.dir, criuCall{}); err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	if err := a.guardContainer(ctx, c); err != nil {
		return nil, fmt.Errorf("container %q: %w", spec.Name, err)
	}
	in := &incoming{id: id, c: c, mode: mode, source: req.GetSourceNode(), images: filepath.Join(a.workDir(id), "images"),
		memoryInUse: req.GetMemoryInUse()}
	if err := os.MkdirAll(in.images, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			_ = os.RemoveAll(filepath.Dir(in.images))
		}
	}()
	// Every mode moves pages through a private namespace of this
	// migration: a page server's (stop-and-copy, pre-copy) or the
	// lazy-pages daemon's (post-copy).
	if err := in.preparePages(); err != nil {
		return nil, fmt.Errorf("container %q: %s: %w", spec.Name, mode, err)
	}
	defer func() {
		if retErr != nil {
			in.closePages()
		}
	}()
	// Everything of the restore that needs no image happens now, before
	// the source freezes the container: the configuration, and a monitor
	// that creates the container and waits (stageRestore).
	if err := a.stageRestore(in); err != nil {
		return nil, fmt.Errorf("container %q: restore: %w", spec.Name, err)
	}
	defer func() {
		if retErr != nil {
			in.mon.kill()
		}
	}()
	in.timer = time.AfterFunc(incomingTimeout, func() {
		if in.outcome != nil {
			select {
			case <-in.outcome:
				// Restored with every page; the source never asked.
				a.forgetIncoming(in)
				return
			default:
			}
		}
		log.Warn("incoming migration timed out; removing what was prepared")
		_ = a.AbortIncoming(context.Background(), id, "timed out")
	})
	if err := failpoint.Check("peer-prepared"); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		// The source gave up (cancelled, or cut off) while this was being
		// prepared: its abort may have come before there was anything.
		return nil, fmt.Errorf("incoming migration %q: the source went away during the preparation: %w", id, err)
	}
	a.mu.Lock()
	a.incoming[id] = in
	a.mu.Unlock()
	log.Info("incoming migration prepared", "ip", c.rec.IP)
	return &api.PrepareIncomingResponse{NodeName: a.cfg.NodeName, CriuVersion: a.criuVersion}, nil
}

// fitsWhileScarce refuses a container that would be held below the memory
// it uses on arrival: while memory is scarce here (hardened), every
// container's memory ceiling is its guarantee (a small floor without
// one), and a restored container using more would be killed by the
// kernel right after its source let it go.
func (a *Agent) fitsWhileScarce(name string, res cgroup.Spec, inUse int64) error {
	if inUse <= 0 || a.elastic.State(cgroup.Memory) != cgroup.Hardened {
		return nil
	}
	if held := cgroup.EffectiveLimits(res, cgroup.Relaxed, cgroup.Hardened).Ceiling.Memory; held > 0 && inUse > held {
		return fmt.Errorf("container %q: memory is scarce on this node (hardened): it would be held to %s, below the %s it uses: %w",
			name, humanSize(held), humanSize(inUse), ErrResourceExhausted)
	}
	return nil
}

// stageRestore writes the restore's configuration and starts its monitor,
// staged: it creates the container and gets ready, then waits for the
// images (post-copy: to start criu lazy-pages) and for RestoreIncoming.
func (a *Agent) stageRestore(in *incoming) error {
	c := in.c
	spec := c.rec.Spec
	oci := OCISpec(&spec, overlayMerged(c.dir), c.rec.Cgroup, c.rec.Netns)
	withCriuConf(oci, c.dir)
	cfg, err := LibcontainerConfig(oci, a.elastic.EffectiveSpec(spec.Resources))
	if err != nil {
		return err
	}
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, "config.json"), oci, 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, lcConfigFile), cfg, 0o600); err != nil {
		return err
	}
	rs := restoreSource{images: in.images, view: a.criuView}
	if in.mode == migrate.ModePostCopy {
		nsf, err := in.pageNS.File()
		if err != nil {
			return fmt.Errorf("post-copy: %w", err)
		}
		defer func() { _ = nsf.Close() }()
		rs.lazy, rs.criu, rs.netns, rs.pages = true, a.criuPath(), nsf, in.lazyPeer
	}
	in.mon, err = a.spawnMonitor(c.dir, rs, true)
	if in.lazyPeer != nil {
		// The monitor has its own copy (or failed): with this one closed,
		// the daemon's end closes when the daemon is done.
		_ = in.lazyPeer.Close()
		in.lazyPeer = nil
	}
	return err
}

// partStream reads one part of an ImageChunk stream at a time.
type partStream struct {
	recv    func() (*api.ImageChunk, error)
	pending *api.ImageChunk
	part    string
	buf     []byte
	n       int64
	done    bool
}

// next advances to the next part; "" at the end of the stream.
func (p *partStream) next() (string, error) {
	for p.pending == nil && !p.done {
		ch, err := p.recv()
		if errors.Is(err, io.EOF) {
			p.done = true
			break
		}
		if err != nil {
			return "", err
		}
		if ch.Part != p.part {
			p.pending = ch
		}
		// Chunks of a part already read past are dropped.
	}
	if p.pending == nil {
		return "", nil
	}
	p.part, p.buf = p.pending.Part, p.pending.Data
	p.n += int64(len(p.pending.Data))
	p.pending = nil
	return p.part, nil
}

func (p *partStream) Read(b []byte) (int, error) {
	for len(p.buf) == 0 {
		if p.pending != nil || p.done {
			return 0, io.EOF
		}
		ch, err := p.recv()
		if errors.Is(err, io.EOF) {
			p.done = true
			return 0, io.EOF
		}
		if err != nil {
			return 0, err
		}
		if ch.Part != p.part {
			p.pending = ch
			return 0, io.EOF
		}
		p.buf = ch.Data
		p.n += int64(len(ch.Data))
	}
	n := copy(b, p.buf)
	p.buf = p.buf[n:]
	return n, nil
}

// MigrationIDKey is the gRPC metadata key naming the migration a stream
// belongs to, so that a stream broken before its first message still
// reaches (and removes) its incoming migration.
const MigrationIDKey = "ferry-migration-id"

// ReceiveImages stores the parts of an image stream: CRIU images, the upper
// layer (never outside the container's own directories) and the log. id is
// the stream's migration from its metadata ("" to take it from the first
// message). Any failure removes the incoming migration.
func (a *Agent) ReceiveImages(id string, recv func() (*api.ImageChunk, error)) (int64, error) {
	var in *incoming
	var first *api.ImageChunk
	if id != "" {
		var err error
		if in, err = a.getIncoming(id); err != nil {
			return 0, err
		}
	}
	first, err := recv()
	if err != nil {
		if in != nil {
			_ = a.abortIncoming(in, "image stream broken: "+err.Error())
		}
		return 0, err
	}
	if in == nil {
		if in, err = a.getIncoming(first.GetMigrationId()); err != nil {
			return 0, err
		}
	} else if fid := first.GetMigrationId(); fid != "" && fid != id {
		err := fmt.Errorf("image stream: first chunk names migration %q, the stream %q: %w", fid, id, ErrInvalidArgument)
		_ = a.abortIncoming(in, err.Error())
		return 0, err
	}
	if err := failpoint.Check("peer-receive"); err != nil {
		return 0, err
	}
	in.touch()
	ps := &partStream{recv: func() (*api.ImageChunk, error) {
		ch, err := recv()
		if err == nil {
			in.touch()
		}
		return ch, err
	}, pending: first}
	limits := migrate.Limits{MaxBytes: incomingMaxBytes, MaxFiles: incomingMaxFiles}
	for {
		part, err := ps.next()
		if err != nil {
			_ = a.abortIncoming(in, err.Error())
			return ps.n, err
		}
		switch part {
		case "":
			in.received = true
			return ps.n, nil
		case "images":
			if _, err = migrate.ExtractTree(ps, in.images, limits); err == nil && in.mode == migrate.ModePostCopy {
				// criu lazy-pages needs the images only: the monitor starts
				// it while the rest comes in, the source opens the page
				// tunnel and asks for the restore.
				err = a.imagesIn(in)
			}
		case "upper":
			_, err = migrate.ExtractTree(ps, filepath.Join(in.c.dir, "upper"), limits)
		case "log":
			err = copyLog(ps, filepath.Join(in.c.dir, logFile))
		default:
			err = fmt.Errorf("part %q: unknown: %w", part, ErrInvalidArgument)
		}
		if err != nil {
			// A broken stream or a refused entry: nothing of it may stay.
			_ = a.abortIncoming(in, err.Error())
			return ps.n, fmt.Errorf("incoming %s: %s: %w", in.id, part, err)
		}
	}
}

// imagesIn tells the staged monitor that every CRIU image is in.
func (a *Agent) imagesIn(in *incoming) error {
	a.mu.Lock()
	mon := in.mon
	a.mu.Unlock()
	if mon == nil {
		return fmt.Errorf("incoming migration %q: aborted meanwhile: %w", in.id, ErrFailedPrecondition)
	}
	return mon.command(monitorImagesIn)
}

// takeMonitor hands over the staged monitor to one caller: the restore or
// the abort.
func (in *incoming) takeMonitor(a *Agent) *monitorProc {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := in.mon
	in.mon = nil
	return m
}

// touch postpones the removal of an idle incoming migration.
func (in *incoming) touch() {
	if in.timer != nil {
		in.timer.Reset(incomingTimeout)
	}
}

func copyLog(r io.Reader, path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, io.LimitReader(r, incomingMaxBytes))
	return errors.Join(err, f.Close())
}

// RestoreIncoming restores a received container into its prepared network
// namespace and cgroup, brings its address up here and confirms.
func (a *Agent) RestoreIncoming(ctx context.Context, id string) (_ *api.RestoreIncomingResponse, retErr error) {
	in, err := a.getIncoming(id)
	if err != nil {
		return nil, err
	}
	c := in.c
	if !in.received {
		return nil, fmt.Errorf("incoming migration %q: images not received: %w", id, ErrFailedPrecondition)
	}
	c.op.Lock()
	defer c.op.Unlock()
	defer func() {
		if retErr != nil {
			_ = a.abortIncoming(in, retErr.Error())
		}
	}()
	start := time.Now()
	if _, err := mountOverlay(c.rec.Spec.Rootfs, c.dir); err != nil {
		return nil, fmt.Errorf("container %q: rootfs: %w", c.name, err)
	}
	if err := failpoint.Check("peer-restore"); err != nil {
		return nil, fmt.Errorf("container %q: restore: %w", c.name, err)
	}
	// Memory may have become scarce here since the preparation.
	if err := a.fitsWhileScarce(c.name, c.rec.Spec.Resources, in.memoryInUse); err != nil {
		return nil, err
	}
	lazy := in.mode == migrate.ModePostCopy
	mon := in.takeMonitor(a) // from here on reaped by wait, or by the exit watcher below
	if mon == nil {
		return nil, fmt.Errorf("incoming migration %q: aborted meanwhile: %w", id, ErrFailedPrecondition)
	}
	if err := mon.command(monitorRestore); err != nil {
		mon.kill()
		return nil, fmt.Errorf("container %q: restore: %w", c.name, err)
	}
	// The address comes up on this node while CRIU restores, well before
	// the tasks resume (the restore takes ~100 ms, this a few), so that the
	// restored connections' first packets are not lost to a link that is
	// still down (they would wait for a retransmit, ~1 s); the hold on TCP
	// resets set at the preparation keeps early segments from ending
	// connections whose sockets are not restored yet.
	activated := make(chan error, 1)
	if a.net != nil {
		go func() { activated <- a.net.Activate(ctx, c.name) }()
	} else {
		activated <- nil
	}
	ii, cmd, lazyEnded, err := mon.wait(ctx)
	if aerr := <-activated; aerr != nil && err == nil {
		err = fmt.Errorf("network: %w", aerr)
		_ = unix.Kill(ii.Pid, unix.SIGKILL)
		_ = cmd.Wait()
	}
	if a.net != nil && err == nil {
		// Released after the reply: until then resets stay dropped, which
		// is harmless once the sockets are back.
		netns := c.rec.Netns
		go func() {
			if herr := holdTCP(netns, false); herr != nil {
				a.log.Warn("release the restore's TCP hold", "container", c.name, "err", herr)
			}
		}()
	}
	if err != nil {
		if a.net != nil {
			_ = a.net.Deactivate(context.Background(), c.name)
		}
		return nil, fmt.Errorf("container %q: restore: %w", c.name, err)
	}
	a.mu.Lock()
	c.init, c.exited = ii, make(chan struct{})
	if lazy {
		// Running, but not this node's until every page is in: hidden
		// from lists, and a ferryd restart removes it (its record keeps
		// Incoming) since the daemon feeding it dies with ferryd.
		c.reason = "post-copy: its memory is still moving from " + in.source
		in.outcome = make(chan struct{})
	} else {
		c.creating = false
		c.rec.Incoming = ""
		delete(a.incoming, id)
		if in.pageNS != nil {
			in.closePages()
		}
	}
	rec := c.rec
	a.mu.Unlock()
	// The idle timer stops either way: in post-copy the page transfer's own
	// end (or the source's abort) decides, however long the pages take.
	in.timer.Stop()
	if err := atomicfile.WriteJSON(filepath.Join(c.dir, specFile), rec, 0o600); err != nil {
		a.log.Warn("record container", "container", c.name, "err", err)
	}
	go func() {
		_ = cmd.Wait()
		a.finishExit(c)
	}()
	if err := a.elastic.Add(ctx, a.elasticContainer(c)); err != nil {
		a.log.Error("elastic limits", "container", c.name, "err", err)
	}
	restoreMs := time.Since(start).Milliseconds()
	if lazy {
		go a.finishLazy(in, time.Now(), lazyEnded)
	} else {
		go func() { _ = os.RemoveAll(filepath.Dir(in.images)) }() // off the confirmation's path
	}
	a.events.Publish(Event{Type: EventContainerMigratedIn, Container: c.name, Message: "restored from a migration",
		Attrs: map[string]string{"migration": id, "pid": fmt.Sprint(ii.Pid), "restore_ms": fmt.Sprint(restoreMs)}})
	a.log.Info("incoming migration restored", "container", c.name, "pid", ii.Pid, "restore_ms", restoreMs)
	if err := failpoint.Check("peer-restored"); err != nil {
		a.log.Warn("failpoint", "err", err) // the answer was held; it goes now
	}
	return &api.RestoreIncomingResponse{Pid: int64(ii.Pid), RestoreMs: restoreMs}, nil
}

// AbortIncoming removes everything an incoming migration made here.
func (a *Agent) AbortIncoming(_ context.Context, id, reason string) error {
	in, err := a.getIncoming(id)
	if err != nil {
		return err
	}
	return a.abortIncoming(in, reason)
}

func (a *Agent) abortIncoming(in *incoming, reason string) error {
	a.mu.Lock()
	if _, ok := a.incoming[in.id]; !ok {
		a.mu.Unlock()
		return nil
	}
	delete(a.incoming, in.id)
	a.mu.Unlock()
	in.timer.Stop()
	a.log.Warn("incoming migration aborted", "container", in.c.name, "migration", in.id, "reason", reason)
	if mon := in.takeMonitor(a); mon != nil {
		mon.kill()
	}
	a.mu.Lock()
	ii, exited := in.c.init, in.c.exited
	a.mu.Unlock()
	if ii != nil && exited != nil {
		// Restored (post-copy, pages still moving): it ends before its
		// state goes, so its exit is recorded before anything is released.
		if err := a.kill(in.c.name, ii); err == nil {
			select {
			case <-exited:
			case <-time.After(30 * time.Second):
			}
		}
	}
	if in.pageNS != nil {
		in.closePages()
	}
	if in.outcome != nil {
		in.setOutcome(errors.New("aborted: " + reason))
	}
	err := a.teardown(in.c.name, in.c.dir)
	_ = os.RemoveAll(filepath.Dir(in.images))
	_ = a.elastic.Remove(in.c.name)
	a.node.Release(in.c.name)
	a.mu.Lock()
	if a.ctrs[in.c.name] == in.c {
		delete(a.ctrs, in.c.name)
	}
	a.mu.Unlock()
	return err
}

// holdRule drops outgoing TCP resets in a container's namespace.
var holdRule = []string{"OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-m", "comment", "--comment", "ferry-restore-hold", "-j", "DROP"}

// holdTCP adds (on) or removes the restore hold in the namespace at netns.
func holdTCP(netns string, on bool) error {
	op := "-D"
	if on {
		op = "-I"
	}
	args := append([]string{"--net=" + netns, "iptables", "-w", op}, holdRule...)
	out, err := exec.Command("nsenter", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s restore hold in %s: %w: %s", op, netns, err, strings.TrimSpace(string(out)))
	}
	return nil
}
