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
	CapAdd       []string          `json:"cap_add"`
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
	}
	if v.CapAdd == nil {
		v.CapAdd = []string{}
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
