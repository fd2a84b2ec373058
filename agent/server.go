package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/cgroup"
)

// Server is the gRPC face of an Agent.
type Server struct {
	api.UnimplementedFerryServer
	a   *Agent
	log *slog.Logger
	// peer enables the peer side of migrations; only the mutual-TLS
	// listener serves it.
	peer bool
}

var _ api.FerryServer = (*Server)(nil)

// NewServer wraps a for the local socket.
func NewServer(a *Agent, log *slog.Logger) *Server { return &Server{a: a, log: log} }

// NewPeerServer wraps a for the mutual-TLS listener: controllers and peer
// agents, including the peer side of migrations.
func NewPeerServer(a *Agent, log *slog.Logger) *Server { return &Server{a: a, log: log, peer: true} }

func (s *Server) peerOnly(method string) error {
	if !s.peer {
		return status.Errorf(codes.PermissionDenied, "%s: a peer agent's call, served only on the mutual-TLS listener", method)
	}
	return nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Version implements api.FerryServer.
func (s *Server) Version(context.Context, *api.VersionRequest) (*api.VersionResponse, error) {
	v := s.a.Version()
	r := &api.VersionResponse{AgentVersion: v.Agent, NodeName: v.Node, CriuVersion: v.Criu,
		CgroupMode: v.CgroupMode, GoVersion: runtime.Version(), Kernel: kernelRelease()}
	if s.peer {
		// For a migration's handshake: what CRIU can do here (criu check,
		// run once per agent; the pipe limit read each time).
		r.Features = s.a.MigrationFeatures()
	}
	return r, nil
}

func resources(r *api.Resources) cgroup.Amount {
	if r == nil {
		return cgroup.Amount{}
	}
	return cgroup.Amount{CPU: r.CpuCores, Memory: r.MemoryBytes}
}

// RunContainer implements api.FerryServer.
func (s *Server) RunContainer(ctx context.Context, req *api.RunContainerRequest) (*api.Container, error) {
	spec := Spec{
		Name: req.GetName(), Rootfs: req.GetRootfs(), Bundle: req.GetBundle(), Args: req.GetArgs(),
		Env: req.GetEnv(), Hostname: req.GetHostname(), Sysctls: req.GetSysctls(), IP: req.GetIp(), CapAdd: req.GetCapAdd(), Publish: req.GetPublish(),
		Resources: cgroup.Spec{Guarantee: resources(req.GetGuarantee()), Ceiling: resources(req.GetCeiling()), PidsMax: req.GetPidsMax()},
	}
	if s.peer {
		if err := errors.Join(s.a.checkRemoteRootfs("rootfs", spec.Rootfs), s.a.checkRemoteRootfs("bundle", spec.Bundle)); err != nil {
			return nil, toStatus(err)
		}
	}
	c, err := s.a.Run(ctx, spec)
	if err != nil {
		s.log.Warn("run refused or failed", "container", req.GetName(), "err", err)
		return nil, toStatus(err)
	}
	return s.a.toAPI(c), nil
}

// ListContainers implements api.FerryServer.
func (s *Server) ListContainers(context.Context, *api.ListContainersRequest) (*api.ListContainersResponse, error) {
	resp := &api.ListContainersResponse{}
	for _, c := range s.a.List() {
		resp.Containers = append(resp.Containers, s.a.toAPI(c))
	}
	return resp, nil
}

// GetContainer implements api.FerryServer.
func (s *Server) GetContainer(_ context.Context, req *api.GetContainerRequest) (*api.Container, error) {
	c, err := s.a.Get(req.GetName())
	if err != nil {
		return nil, toStatus(err)
	}
	return s.a.toAPI(c), nil
}

// StopContainer implements api.FerryServer.
func (s *Server) StopContainer(ctx context.Context, req *api.StopContainerRequest) (*api.Container, error) {
	if req.GetTimeoutMs() < 0 {
		return nil, toStatus(errInvalidf("timeout %dms: negative", req.GetTimeoutMs()))
	}
	c, err := s.a.Stop(ctx, req.GetName(), time.Duration(req.GetTimeoutMs())*time.Millisecond)
	if err != nil {
		return nil, toStatus(err)
	}
	return s.a.toAPI(c), nil
}

// RemoveContainer implements api.FerryServer.
func (s *Server) RemoveContainer(ctx context.Context, req *api.RemoveContainerRequest) (*api.RemoveContainerResponse, error) {
	if err := s.a.Remove(ctx, req.GetName(), req.GetForce()); err != nil {
		return nil, toStatus(err)
	}
	return &api.RemoveContainerResponse{}, nil
}

type streamWriter struct {
	send func([]byte) error
}

func (w streamWriter) Write(p []byte) (int, error) {
	if err := w.send(append([]byte(nil), p...)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Exec implements api.FerryServer.
func (s *Server) Exec(req *api.ExecRequest, stream api.Ferry_ExecServer) error {
	var mu chanMutex = make(chan struct{}, 1)
	send := func(o *api.ExecOutput) error {
		mu.lock()
		defer mu.unlock()
		return stream.Send(o)
	}
	out := ExecIO{
		Stdout: streamWriter{func(b []byte) error { return send(&api.ExecOutput{Kind: &api.ExecOutput_Stdout{Stdout: b}}) }},
		Stderr: streamWriter{func(b []byte) error { return send(&api.ExecOutput{Kind: &api.ExecOutput_Stderr{Stderr: b}}) }},
	}
	code, err := s.a.Exec(stream.Context(), req.GetName(), req.GetArgs(), req.GetEnv(), out)
	if err != nil {
		return toStatus(err)
	}
	return send(&api.ExecOutput{Kind: &api.ExecOutput_ExitCode{ExitCode: int32(code)}})
}

type chanMutex chan struct{}

func (m chanMutex) lock()   { m <- struct{}{} }
func (m chanMutex) unlock() { <-m }

// Logs implements api.FerryServer.
func (s *Server) Logs(req *api.LogsRequest, stream api.Ferry_LogsServer) error {
	w := streamWriter{func(b []byte) error { return stream.Send(&api.LogChunk{Data: b}) }}
	return toStatus(s.a.Logs(stream.Context(), req.GetName(), req.GetFollow(), w))
}

func ts(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func (a *Agent) toAPI(c *container) *api.Container {
	denied := a.sysctlDenied(c)
	eff := a.effectiveCeiling(c)
	a.mu.Lock()
	defer a.mu.Unlock()
	r := c.rec.Spec.Resources
	out := &api.Container{
		Name: c.name, State: c.state(), Cgroup: c.rec.Cgroup,
		Guarantee: &api.Resources{CpuCores: r.Guarantee.CPU, MemoryBytes: r.Guarantee.Memory},
		Ceiling:   &api.Resources{CpuCores: r.Ceiling.CPU, MemoryBytes: r.Ceiling.Memory},
		PidsMax:   r.PidsMax, CreatedAt: ts(c.rec.CreatedAt), Rootfs: c.rec.Spec.Rootfs,
		Args: c.rec.Spec.Args, Hostname: c.rec.Spec.Hostname, Sysctls: c.rec.Spec.Sysctls,
		Ip: c.rec.IP, Mac: c.rec.MAC, StatusReason: c.reason, SysctlDenied: denied, CapAdd: c.rec.Spec.CapAdd,
		EffectiveCeiling: &api.Resources{CpuCores: eff.CPU, MemoryBytes: eff.Memory}, Publish: c.rec.Spec.Publish,
	}
	if c.init != nil {
		out.StartedAt = ts(c.init.StartedAt)
		if c.exit == nil {
			out.Pid = int64(c.init.Pid)
		}
	}
	if c.exit != nil {
		out.ExitCode = int32(c.exit.ExitCode)
		out.FinishedAt = ts(c.exit.FinishedAt)
	}
	return out
}

// Events implements api.FerryServer.
func (s *Server) Events(req *api.EventsRequest, stream api.Ferry_EventsServer) error {
	want := map[string]bool{}
	for _, t := range req.GetTypes() {
		want[t] = true
	}
	send := func(e Event) error {
		if len(want) > 0 && !want[e.Type] {
			return nil
		}
		return stream.Send(&api.Event{Time: ts(e.Time), Type: e.Type, Container: e.Container,
			Message: e.Message, Attributes: e.Attrs, Seq: e.Seq})
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	past, ch := s.a.SubscribeEvents(ctx, req.GetReplay())
	for _, e := range past {
		if err := send(e); err != nil {
			return err
		}
	}
	if req.GetNoFollow() {
		return nil
	}
	for e := range ch {
		if err := send(e); err != nil {
			return err
		}
	}
	return nil
}

func resourceReport(r cgroup.ResourceReport) *api.ResourceReport {
	return &api.ResourceReport{Resource: string(r.Resource), Unit: r.Unit, Capacity: r.Capacity, Reserved: r.Reserved,
		Allocatable: r.Allocatable, Guaranteed: r.Guaranteed, Incoming: r.Incoming, Unguaranteed: r.Unguaranteed,
		UnguaranteedShare: r.UnguaranteedShare, Used: r.Used, PressureAvg10: r.PressureAvg10,
		State: string(r.State), Since: ts(r.Since)}
}

func amount(a cgroup.Amount) *api.Resources {
	return &api.Resources{CpuCores: a.CPU, MemoryBytes: a.Memory}
}

// Node implements api.FerryServer.
func (s *Server) Node(context.Context, *api.NodeRequest) (*api.NodeReport, error) {
	r := s.a.NodeReport()
	out := &api.NodeReport{NodeName: s.a.cfg.NodeName, Time: ts(r.Time), CgroupDriver: r.Driver,
		Cpu: resourceReport(r.CPU), Memory: resourceReport(r.Memory), Scarcest: string(r.Scarcest)}
	for _, c := range r.Containers {
		cr := &api.ContainerResources{Name: c.ID, Guarantee: amount(c.Guarantee), Ceiling: amount(c.Ceiling),
			EffectiveCeiling: amount(c.Effective), Used: &api.Resources{}}
		if c.Usage != nil {
			cr.Used.MemoryBytes = c.Usage.MemoryWorkingSet
		}
		out.Containers = append(out.Containers, cr)
	}
	return out, nil
}

// Migrate implements api.FerryServer.
func (s *Server) Migrate(req *api.MigrateRequest, stream api.Ferry_MigrateServer) error {
	var sendErr error
	m, err := s.a.Migrate(stream.Context(), req, func(m *api.Migration) {
		if sendErr == nil {
			sendErr = stream.Send(m)
		}
	})
	if err != nil {
		// The progress callback has already sent the migration's final record.
		return toStatus(err)
	}
	if sendErr != nil {
		return sendErr
	}
	return stream.Send(m)
}

// GetMigration implements api.FerryServer.
func (s *Server) GetMigration(_ context.Context, req *api.GetMigrationRequest) (*api.Migration, error) {
	m, err := s.a.GetMigration(req.GetId())
	return m, toStatus(err)
}

// ListMigrations implements api.FerryServer.
func (s *Server) ListMigrations(context.Context, *api.ListMigrationsRequest) (*api.ListMigrationsResponse, error) {
	return &api.ListMigrationsResponse{Migrations: s.a.ListMigrations()}, nil
}

// PrepareIncoming implements api.FerryServer.
func (s *Server) PrepareIncoming(ctx context.Context, req *api.PrepareIncomingRequest) (*api.PrepareIncomingResponse, error) {
	if err := s.peerOnly("PrepareIncoming"); err != nil {
		return nil, err
	}
	r, err := s.a.PrepareIncoming(ctx, req)
	return r, toStatus(err)
}

// SendImages implements api.FerryServer.
func (s *Server) SendImages(stream api.Ferry_SendImagesServer) error {
	if err := s.peerOnly("SendImages"); err != nil {
		return err
	}
	n, err := s.a.ReceiveImages(migrationID(stream.Context()), stream.Recv)
	if err != nil {
		return toStatus(err)
	}
	return stream.SendAndClose(&api.SendImagesResponse{Bytes: n})
}

// ProbeBandwidth implements api.FerryServer.
func (s *Server) ProbeBandwidth(stream api.Ferry_ProbeBandwidthServer) error {
	if err := s.peerOnly("ProbeBandwidth"); err != nil {
		return err
	}
	var n int64
	for {
		ch, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&api.ProbeResult{Bytes: n})
		}
		if err != nil {
			return err
		}
		if n += int64(len(ch.GetData())); n > ProbeMax {
			return status.Errorf(codes.InvalidArgument, "bandwidth probe: more than %d bytes", ProbeMax)
		}
	}
}

// RestoreIncoming implements api.FerryServer.
func (s *Server) RestoreIncoming(ctx context.Context, req *api.RestoreIncomingRequest) (*api.RestoreIncomingResponse, error) {
	if err := s.peerOnly("RestoreIncoming"); err != nil {
		return nil, err
	}
	r, err := s.a.RestoreIncoming(ctx, req.GetMigrationId())
	return r, toStatus(err)
}

// AbortIncoming implements api.FerryServer.
func (s *Server) AbortIncoming(ctx context.Context, req *api.AbortIncomingRequest) (*api.AbortIncomingResponse, error) {
	if err := s.peerOnly("AbortIncoming"); err != nil {
		return nil, err
	}
	if err := s.a.AbortIncoming(ctx, req.GetMigrationId(), req.GetReason()); err != nil {
		return nil, toStatus(err)
	}
	return &api.AbortIncomingResponse{}, nil
}

// PageTunnel implements api.FerryServer.
func (s *Server) PageTunnel(stream api.Ferry_PageTunnelServer) error {
	if err := s.peerOnly("PageTunnel"); err != nil {
		return err
	}
	return toStatus(s.a.PageTunnel(stream.Context(), migrationID(stream.Context()), stream.Recv, stream.Send))
}

// migrationID reads the migration a stream belongs to from its metadata.
func migrationID(ctx context.Context) string {
	if v := metadata.ValueFromIncomingContext(ctx, MigrationIDKey); len(v) > 0 {
		return v[0]
	}
	return ""
}

// CompleteIncoming implements api.FerryServer.
func (s *Server) CompleteIncoming(ctx context.Context, req *api.CompleteIncomingRequest) (*api.CompleteIncomingResponse, error) {
	if err := s.peerOnly("CompleteIncoming"); err != nil {
		return nil, err
	}
	r, err := s.a.CompleteIncoming(ctx, req.GetMigrationId())
	return r, toStatus(err)
}

// CancelMigration implements api.FerryServer.
func (s *Server) CancelMigration(ctx context.Context, req *api.CancelMigrationRequest) (*api.Migration, error) {
	m, err := s.a.CancelMigration(ctx, req.GetId())
	return m, toStatus(err)
}
