package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/netsetup"
	"github.com/ferry-agent/ferry/sysctlguard"
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

var envKeyRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

var hostnameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)

// Spec is a validated container request, as persisted in the container's
// state directory.
type Spec struct {
	Name      string            `json:"name"`
	Rootfs    string            `json:"rootfs"`
	Bundle    string            `json:"bundle,omitempty"`
	Args      []string          `json:"args"`
	Env       []string          `json:"env,omitempty"`
	Cwd       string            `json:"cwd"`
	Hostname  string            `json:"hostname"`
	Sysctls   map[string]string `json:"sysctls,omitempty"`
	IP        string            `json:"ip,omitempty"`
	CapAdd    []string          `json:"cap_add,omitempty"`
	Publish   []string          `json:"publish,omitempty"`
	Ports     []netsetup.Port   `json:"ports,omitempty"`
	Resources cgroup.Spec       `json:"resources"`
}

// ValidateName checks a container name against ^[a-z0-9][a-z0-9_.-]{0,62}$.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("name %q: must match ^[a-z0-9][a-z0-9_.-]{0,62}$: %w", name, ErrInvalidArgument)
	}
	return nil
}

// validateDir checks an operator-given directory path: absolute, clean, no
// "..", no characters overlayfs options cannot carry, an existing directory.
func validateDir(field, p string) error {
	if p == "" {
		return fmt.Errorf("%s: empty path: %w", field, ErrInvalidArgument)
	}
	if !filepath.IsAbs(p) {
		return fmt.Errorf("%s %q: not an absolute path: %w", field, p, ErrInvalidArgument)
	}
	for _, el := range strings.Split(p, "/") {
		if el == ".." {
			return fmt.Errorf("%s %q: contains \"..\": %w", field, p, ErrInvalidArgument)
		}
	}
	if filepath.Clean(p) != p {
		return fmt.Errorf("%s %q: not a clean path (use %q): %w", field, p, filepath.Clean(p), ErrInvalidArgument)
	}
	if strings.ContainsAny(p, ",:\\\n") {
		return fmt.Errorf("%s %q: contains one of , : \\ or a newline, which an overlay mount cannot take: %w", field, p, ErrInvalidArgument)
	}
	st, err := os.Stat(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s %q: does not exist: %w", field, p, ErrInvalidArgument)
		}
		return fmt.Errorf("%s %q: %w: %w", field, p, err, ErrInvalidArgument)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s %q: not a directory: %w", field, p, ErrInvalidArgument)
	}
	return nil
}

// bundleProcess is what ferry takes from an OCI bundle's config.json.
type bundleProcess struct {
	rootfs   string
	args     []string
	env      []string
	cwd      string
	hostname string
}

func readBundle(dir string) (*bundleProcess, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("bundle %q: %w: %w", dir, err, ErrInvalidArgument)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("bundle %q: config.json: %w: %w", dir, err, ErrInvalidArgument)
	}
	bp := &bundleProcess{hostname: s.Hostname}
	root := "rootfs"
	if s.Root != nil && s.Root.Path != "" {
		root = s.Root.Path
	}
	if !filepath.IsAbs(root) {
		root = filepath.Join(dir, root)
	}
	bp.rootfs = root
	if s.Process != nil {
		bp.args, bp.env, bp.cwd = s.Process.Args, s.Process.Env, s.Process.Cwd
	}
	return bp, nil
}

// NormalizeSpec validates s in place, fills defaults and reads the bundle.
// defaultRootfs is used when neither rootfs nor bundle is given; policy
// (nil: the full namespaced allowlist) decides which sysctls are accepted.
func NormalizeSpec(s *Spec, defaultRootfs string, policy *sysctlguard.Policy) error {
	if err := ValidateName(s.Name); err != nil {
		return err
	}
	if s.Rootfs != "" && s.Bundle != "" {
		return fmt.Errorf("rootfs %q and bundle %q: give one, not both: %w", s.Rootfs, s.Bundle, ErrInvalidArgument)
	}
	if s.Bundle != "" {
		if err := validateDir("bundle", s.Bundle); err != nil {
			return err
		}
		bp, err := readBundle(s.Bundle)
		if err != nil {
			return err
		}
		if err := validateDir("bundle rootfs", bp.rootfs); err != nil {
			return err
		}
		s.Rootfs = bp.rootfs
		if len(s.Args) == 0 {
			s.Args = bp.args
		}
		s.Env = append(append([]string{}, bp.env...), s.Env...)
		if s.Cwd == "" {
			s.Cwd = bp.cwd
		}
		if s.Hostname == "" {
			s.Hostname = bp.hostname
		}
	} else {
		if s.Rootfs == "" {
			s.Rootfs = defaultRootfs
			if _, err := os.Stat(defaultRootfs); err != nil {
				return fmt.Errorf("rootfs: none given and the default rootfs %q is missing (run make deps): %w", defaultRootfs, ErrFailedPrecondition)
			}
		}
		if err := validateDir("rootfs", s.Rootfs); err != nil {
			return err
		}
	}
	if len(s.Args) == 0 {
		s.Args = []string{"sh"}
	}
	for i, a := range s.Args {
		if strings.ContainsRune(a, 0) {
			return fmt.Errorf("args[%d] %q: contains a NUL byte: %w", i, a, ErrInvalidArgument)
		}
	}
	if s.Cwd == "" {
		s.Cwd = "/"
	}
	if !filepath.IsAbs(s.Cwd) {
		return fmt.Errorf("cwd %q: not absolute: %w", s.Cwd, ErrInvalidArgument)
	}
	for _, e := range s.Env {
		k, _, ok := strings.Cut(e, "=")
		if !ok || !envKeyRE.MatchString(k) || strings.ContainsRune(e, 0) {
			return fmt.Errorf("env %q: want KEY=VALUE with KEY matching %s: %w", e, envKeyRE, ErrInvalidArgument)
		}
	}
	if s.Hostname == "" {
		s.Hostname = s.Name
	}
	if len(s.Hostname) > 253 || !hostnameRE.MatchString(strings.ReplaceAll(s.Hostname, "_", "-")) {
		return fmt.Errorf("hostname %q: not a valid host name: %w", s.Hostname, ErrInvalidArgument)
	}
	s.Ports = nil
	for _, pub := range s.Publish {
		port, err := ParsePublish(pub)
		if err != nil {
			return err
		}
		s.Ports = append(s.Ports, port)
	}
	for i, c := range s.CapAdd {
		c = strings.ToUpper(c)
		if !strings.HasPrefix(c, "CAP_") {
			c = "CAP_" + c
		}
		if !knownCaps[c] {
			return fmt.Errorf("cap_add %q: not a Linux capability: %w", s.CapAdd[i], ErrInvalidArgument)
		}
		s.CapAdd[i] = c
	}
	if s.IP != "" {
		ip, err := netip.ParseAddr(s.IP)
		if err != nil || !ip.Is4() {
			return fmt.Errorf("ip %q: not an IPv4 address: %w", s.IP, ErrInvalidArgument)
		}
		s.IP = ip.String()
	}
	ns := sysctlguard.Namespaces{IPC: true, UTS: true, Net: true}
	keys := make([]string, 0, len(s.Sysctls))
	for k := range s.Sysctls {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		validate := sysctlguard.Validate
		if policy != nil {
			validate = policy.Validate
		}
		if err := validate(k, s.Sysctls[k], ns); err != nil {
			return err
		}
		if err := sysctlExists(k); err != nil {
			return err
		}
	}
	return s.Resources.Normalize()
}

// ParsePublish parses [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp].
func ParsePublish(s string) (netsetup.Port, error) {
	bad := func(why string) (netsetup.Port, error) {
		return netsetup.Port{}, fmt.Errorf("publish %q: %s (want [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]): %w", s, why, ErrInvalidArgument)
	}
	p := netsetup.Port{Proto: "tcp"}
	rest := s
	if i := strings.LastIndexByte(rest, '/'); i >= 0 {
		p.Proto, rest = rest[i+1:], rest[:i]
		if p.Proto != "tcp" && p.Proto != "udp" {
			return bad("protocol must be tcp or udp")
		}
	}
	parts := strings.Split(rest, ":")
	if len(parts) == 3 {
		ip, err := netip.ParseAddr(parts[0])
		if err != nil || !ip.Is4() {
			return bad("host IP must be an IPv4 address")
		}
		p.HostIP, parts = ip, parts[1:]
	}
	if len(parts) != 2 {
		return bad("malformed")
	}
	for i, dst := range []*uint16{&p.HostPort, &p.ContainerPort} {
		n, err := strconv.ParseUint(parts[i], 10, 16)
		if err != nil || n == 0 {
			return bad("ports must be 1..65535")
		}
		*dst = uint16(n)
	}
	return p, nil
}

// perDeviceSysctl matches net keys named after a device, which exist only
// once the container's own devices do.
var perDeviceSysctl = regexp.MustCompile(`^net\.ipv[46]\.(conf|neigh)\.`)

// sysctlExists refuses a key the kernel does not have, so the error names it
// instead of the container's init failing later.
func sysctlExists(key string) error {
	if perDeviceSysctl.MatchString(key) {
		return nil
	}
	if _, err := os.Stat("/proc/sys/" + strings.ReplaceAll(key, ".", "/")); err != nil {
		return fmt.Errorf("sysctl %q: unknown to this kernel: %w", key, ErrInvalidArgument)
	}
	return nil
}

// defaultCaps is the capability set of a ferry container: Docker's default
// set. Notably absent: CAP_SYS_ADMIN, CAP_BPF, CAP_SYS_MODULE, CAP_SYS_PTRACE,
// CAP_NET_ADMIN, CAP_SYS_RESOURCE.
var defaultCaps = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
	"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
	"CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}

var knownCaps = func() map[string]bool {
	m := map[string]bool{}
	for _, c := range []string{"CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
		"SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
		"IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN",
		"SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
		"AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND",
		"AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"} {
		m["CAP_"+c] = true
	}
	return m
}()

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// deniedSyscalls fail with EPERM in every container: they load code or
// programs into the kernel (bpf, modules, kexec), reach kernel state no
// container owns (keyrings, accounting, swap, reboot, quotas), or are the
// usual first step of kernel exploits (perf_event_open, userfaultfd,
// open_by_handle_at). The same spirit as Docker's default profile, kept to a
// denylist so that ordinary programs are never surprised.
var deniedSyscalls = []string{
	"bpf", "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
	"add_key", "keyctl", "request_key", "acct", "swapon", "swapoff", "reboot", "quotactl", "quotactl_fd",
	"lookup_dcookie", "perf_event_open", "userfaultfd", "open_by_handle_at", "nfsservctl", "vm86", "vm86old",
	"iopl", "ioperm", "syslog",
}

// defaultSeccomp is every container's seccomp profile: allow, except
// deniedSyscalls, which fail with EPERM.
func defaultSeccomp() *specs.LinuxSeccomp {
	eperm := uint(unix.EPERM)
	return &specs.LinuxSeccomp{
		DefaultAction: specs.ActAllow,
		Architectures: []specs.Arch{specs.ArchX86_64, specs.ArchX86, specs.ArchX32},
		Syscalls:      []specs.LinuxSyscall{{Names: deniedSyscalls, Action: specs.ActErrno, ErrnoRet: &eperm}},
	}
}

// processEnv is the init process's environment: PATH and HOSTNAME, then the
// request's variables (which may override them).
func (s *Spec) processEnv() []string {
	return append([]string{defaultPath, "HOSTNAME=" + s.Hostname}, s.Env...)
}

// OCISpec builds the container's OCI runtime spec: runc's defaults (masked
// paths, read-only /proc/sys, no new privileges), private mount, UTS, IPC,
// PID, network and cgroup namespaces, ferry's capability set.
//
// netnsPath, when set, is the prepared network namespace the container joins
// (netsetup's); empty gives it a new one with only lo.
func OCISpec(s *Spec, rootfs, cgroupPath, netnsPath string) *specs.Spec {
	o := specconv.Example()
	if netnsPath != "" {
		for i := range o.Linux.Namespaces {
			if o.Linux.Namespaces[i].Type == specs.NetworkNamespace {
				o.Linux.Namespaces[i].Path = netnsPath
			}
		}
	}
	o.Root = &specs.Root{Path: rootfs}
	o.Hostname = s.Hostname
	caps := append([]string(nil), defaultCaps...)
	for _, c := range s.CapAdd {
		if !slices.Contains(caps, c) {
			caps = append(caps, c)
		}
	}
	o.Process.Terminal = false
	o.Process.Args = s.Args
	o.Process.Cwd = s.Cwd
	o.Process.Env = s.processEnv()
	o.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Permitted: caps, Effective: caps}
	o.Linux.CgroupsPath = cgroupPath
	o.Linux.Sysctl = s.Sysctls
	o.Linux.Seccomp = defaultSeccomp()
	// specconv.Example already lists runc's masked paths and makes /proc/sys,
	// /proc/sysrq-trigger, /proc/irq and /proc/bus read-only.
	return o
}

// LibcontainerConfig converts the OCI spec and applies ferry's cgroup limits.
func LibcontainerConfig(o *specs.Spec, res cgroup.Spec) (*configs.Config, error) {
	cfg, err := specconv.CreateLibcontainerConfig(&specconv.CreateOpts{
		CgroupName:   filepath.Base(o.Linux.CgroupsPath),
		NoNewKeyring: true,
		Spec:         o,
	})
	if err != nil {
		return nil, fmt.Errorf("convert OCI spec: %w", err)
	}
	r := res.Resources()
	cr := cfg.Cgroups.Resources
	cr.CpuShares, cr.CpuQuota, cr.CpuPeriod = r.CpuShares, r.CpuQuota, r.CpuPeriod
	cr.Memory, cr.MemoryReservation, cr.PidsLimit = r.Memory, r.MemoryReservation, r.PidsLimit
	return cfg, nil
}
