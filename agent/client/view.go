package client

import "github.com/ferry-agent/ferry/agent/api"

// ResourcesView is a guarantee or ceiling as ferryctl prints it.
type ResourcesView struct {
	CPUCores    float64 `json:"cpu_cores"`
	MemoryBytes int64   `json:"memory_bytes"`
}

// ContainerView is the stable JSON form of a container (ferryctl inspect and
// ps -o json): plain numbers, snake_case keys, every key always present.
type ContainerView struct {
	Name         string            `json:"name"`
	State        string            `json:"state"`
	Pid          int64             `json:"pid"`
	ExitCode     int32             `json:"exit_code"`
	IP           string            `json:"ip"`
	MAC          string            `json:"mac"`
	Cgroup       string            `json:"cgroup"`
	Guarantee    ResourcesView     `json:"guarantee"`
	Ceiling      ResourcesView     `json:"ceiling"`
	PidsMax      int64             `json:"pids_max"`
	CreatedAt    string            `json:"created_at"`
	StartedAt    string            `json:"started_at"`
	FinishedAt   string            `json:"finished_at"`
	Rootfs       string            `json:"rootfs"`
	Args         []string          `json:"args"`
	Hostname     string            `json:"hostname"`
	Sysctls      map[string]string `json:"sysctls"`
	StatusReason string            `json:"status_reason"`
	SysctlDenied uint64            `json:"sysctl_denied"`
	// EffectiveCeiling is the ceiling in force now (the guarantee of a
	// resource the node has hardened).
	EffectiveCeiling ResourcesView `json:"effective_ceiling"`
	CapAdd           []string      `json:"cap_add"`
	Publish          []string      `json:"publish"`
}

func resView(r *api.Resources) ResourcesView {
	return ResourcesView{CPUCores: r.GetCpuCores(), MemoryBytes: r.GetMemoryBytes()}
}

// View converts an API container to its JSON form.
func View(c *api.Container) ContainerView {
	v := ContainerView{
		Name: c.GetName(), State: c.GetState(), Pid: c.GetPid(), ExitCode: c.GetExitCode(),
		IP: c.GetIp(), MAC: c.GetMac(), Cgroup: c.GetCgroup(),
		Guarantee: resView(c.GetGuarantee()), Ceiling: resView(c.GetCeiling()), PidsMax: c.GetPidsMax(),
		CreatedAt: c.GetCreatedAt(), StartedAt: c.GetStartedAt(), FinishedAt: c.GetFinishedAt(),
		Rootfs: c.GetRootfs(), Args: c.GetArgs(), Hostname: c.GetHostname(), Sysctls: c.GetSysctls(),
		StatusReason: c.GetStatusReason(), SysctlDenied: c.GetSysctlDenied(), CapAdd: c.GetCapAdd(),
		EffectiveCeiling: resView(c.GetEffectiveCeiling()),
	}
	if v.CapAdd == nil {
		v.CapAdd = []string{}
	}
	v.Publish = c.GetPublish()
	if v.Publish == nil {
		v.Publish = []string{}
	}
	if v.Args == nil {
		v.Args = []string{}
	}
	if v.Sysctls == nil {
		v.Sysctls = map[string]string{}
	}
	return v
}

// EventJSON is the stable JSON form of an event (ferryctl events -o json).
type EventJSON struct {
	Seq        uint64            `json:"seq"`
	Time       string            `json:"time"`
	Type       string            `json:"type"`
	Container  string            `json:"container"`
	Message    string            `json:"message"`
	Attributes map[string]string `json:"attributes"`
}

// EventView converts an API event to its JSON form.
func EventView(e *api.Event) EventJSON {
	v := EventJSON{Seq: e.GetSeq(), Time: e.GetTime(), Type: e.GetType(), Container: e.GetContainer(),
		Message: e.GetMessage(), Attributes: e.GetAttributes()}
	if v.Attributes == nil {
		v.Attributes = map[string]string{}
	}
	return v
}

// ResourceReportView is one resource of the node report.
type ResourceReportView struct {
	Resource          string  `json:"resource"`
	Unit              string  `json:"unit"`
	Capacity          float64 `json:"capacity"`
	Reserved          float64 `json:"reserved"`
	Allocatable       float64 `json:"allocatable"`
	Guaranteed        float64 `json:"guaranteed"`
	Incoming          float64 `json:"incoming"`
	Unguaranteed      float64 `json:"unguaranteed"`
	UnguaranteedShare float64 `json:"unguaranteed_share"`
	Used              float64 `json:"used"`
	PressureAvg10     float64 `json:"pressure_avg10"`
	State             string  `json:"state"`
	Since             string  `json:"since"`
}

// ContainerResourcesView is one container of the node report.
type ContainerResourcesView struct {
	Name             string        `json:"name"`
	Guarantee        ResourcesView `json:"guarantee"`
	Ceiling          ResourcesView `json:"ceiling"`
	EffectiveCeiling ResourcesView `json:"effective_ceiling"`
	Used             ResourcesView `json:"used"`
}

// NodeReportView is the stable JSON form of the node report (ferryctl node -o json).
type NodeReportView struct {
	NodeName     string                   `json:"node_name"`
	Time         string                   `json:"time"`
	CgroupDriver string                   `json:"cgroup_driver"`
	CPU          ResourceReportView       `json:"cpu"`
	Memory       ResourceReportView       `json:"memory"`
	Scarcest     string                   `json:"scarcest"`
	Containers   []ContainerResourcesView `json:"containers"`
}

func resReportView(r *api.ResourceReport) ResourceReportView {
	return ResourceReportView{Resource: r.GetResource(), Unit: r.GetUnit(), Capacity: r.GetCapacity(), Reserved: r.GetReserved(),
		Allocatable: r.GetAllocatable(), Guaranteed: r.GetGuaranteed(), Incoming: r.GetIncoming(),
		Unguaranteed: r.GetUnguaranteed(), UnguaranteedShare: r.GetUnguaranteedShare(), Used: r.GetUsed(),
		PressureAvg10: r.GetPressureAvg10(), State: r.GetState(), Since: r.GetSince()}
}

// NodeView converts an API node report to its JSON form.
func NodeView(r *api.NodeReport) NodeReportView {
	v := NodeReportView{NodeName: r.GetNodeName(), Time: r.GetTime(), CgroupDriver: r.GetCgroupDriver(),
		CPU: resReportView(r.GetCpu()), Memory: resReportView(r.GetMemory()), Scarcest: r.GetScarcest(),
		Containers: []ContainerResourcesView{}}
	for _, c := range r.GetContainers() {
		v.Containers = append(v.Containers, ContainerResourcesView{Name: c.GetName(), Guarantee: resView(c.GetGuarantee()),
			Ceiling: resView(c.GetCeiling()), EffectiveCeiling: resView(c.GetEffectiveCeiling()), Used: resView(c.GetUsed())})
	}
	return v
}

// MigrationJSON is the stable JSON form of a migration (ferryctl migrations -o json).
type MigrationJSON struct {
	ID                      string             `json:"id"`
	Container               string             `json:"container"`
	Peer                    string             `json:"peer"`
	PeerNode                string             `json:"peer_node"`
	Mode                    string             `json:"mode"`
	ModeReason              string             `json:"mode_reason"`
	Phase                   string             `json:"phase"`
	State                   string             `json:"state"`
	Error                   string             `json:"error"`
	Rounds                  int32              `json:"rounds"`
	BytesSent               int64              `json:"bytes_sent"`
	TotalMs                 int64              `json:"total_ms"`
	FrozenMs                int64              `json:"frozen_ms"`
	DumpMs                  int64              `json:"dump_ms"`
	TransferMs              int64              `json:"transfer_ms"`
	RestoreMs               int64              `json:"restore_ms"`
	CriuFrozenMs            int64              `json:"criu_frozen_ms"`
	PagesWritten            int64              `json:"pages_written"`
	PredictedDowntimeMs     int64              `json:"predicted_downtime_ms"`
	PostcopyMs              int64              `json:"postcopy_ms"`
	PostcopyBytes           int64              `json:"postcopy_bytes"`
	PrecopyRounds           []PrecopyRoundJSON `json:"precopy_rounds"`
	FinalPagesWritten       int64              `json:"final_pages_written"`
	FinalPagesSkippedParent int64              `json:"final_pages_skipped_parent"`
	StartedAt               string             `json:"started_at"`
	FinishedAt              string             `json:"finished_at"`
}

// MigrationView converts an API migration to its JSON form.
func MigrationView(m *api.Migration) MigrationJSON {
	return MigrationJSON{ID: m.GetId(), Container: m.GetContainer(), Peer: m.GetPeer(), PeerNode: m.GetPeerNode(),
		Mode: m.GetMode(), ModeReason: m.GetModeReason(), Phase: m.GetPhase(), State: m.GetState(), Error: m.GetError(),
		Rounds: m.GetRounds(), BytesSent: m.GetBytesSent(), TotalMs: m.GetTotalMs(), FrozenMs: m.GetFrozenMs(),
		DumpMs: m.GetDumpMs(), TransferMs: m.GetTransferMs(), RestoreMs: m.GetRestoreMs(), CriuFrozenMs: m.GetCriuFrozenMs(),
		PagesWritten: m.GetPagesWritten(), PredictedDowntimeMs: m.GetPredictedDowntimeMs(),
		PostcopyMs: m.GetPostcopyMs(), PostcopyBytes: m.GetPostcopyBytes(), PrecopyRounds: precopyRounds(m.GetPrecopyRounds()),
		FinalPagesWritten: m.GetFinalPagesWritten(), FinalPagesSkippedParent: m.GetFinalPagesSkippedParent(),
		StartedAt: m.GetStartedAt(), FinishedAt: m.GetFinishedAt()}
}

// PrecopyRoundJSON is one pre-copy round in a migration's JSON form.
type PrecopyRoundJSON struct {
	Round               int32   `json:"round"`
	PagesWritten        int64   `json:"pages_written"`
	PagesSkippedParent  int64   `json:"pages_skipped_parent"`
	FrozenMs            int64   `json:"frozen_ms"`
	Bytes               int64   `json:"bytes"`
	Ms                  int64   `json:"ms"`
	Decision            string  `json:"decision"`
	PredictedDowntimeMs int64   `json:"predicted_downtime_ms"`
	DirtyPagesPerSecond float64 `json:"dirty_pages_per_second"`
}

func precopyRounds(rs []*api.PrecopyRound) []PrecopyRoundJSON {
	out := make([]PrecopyRoundJSON, 0, len(rs))
	for _, r := range rs {
		out = append(out, PrecopyRoundJSON{Round: r.GetRound(), PagesWritten: r.GetPagesWritten(), PagesSkippedParent: r.GetPagesSkippedParent(),
			FrozenMs: r.GetFrozenMs(), Bytes: r.GetBytes(), Ms: r.GetMs(), Decision: r.GetDecision(), PredictedDowntimeMs: r.GetPredictedDowntimeMs(),
			DirtyPagesPerSecond: r.GetDirtyPagesPerSecond()})
	}
	return out
}
