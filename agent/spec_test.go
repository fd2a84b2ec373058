package agent

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-agent/ferry/cgroup"
)

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "web-1", "db.main", "x_y", strings.Repeat("a", 63), "0"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "A", "-a", ".a", "_a", "a/b", "a b", strings.Repeat("a", 64), "..", "a\x00"} {
		if err := ValidateName(bad); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%q accepted or wrong class: %v", bad, err)
		}
	}
}

func TestNormalizeSpec(t *testing.T) {
	rootfs := t.TempDir()
	s := Spec{Name: "web", Rootfs: rootfs, Resources: cgroup.Spec{Guarantee: cgroup.Amount{Memory: 64 << 20}}}
	if err := NormalizeSpec(&s, "/nonexistent", nil); err != nil {
		t.Fatal(err)
	}
	if s.Hostname != "web" || s.Cwd != "/" || len(s.Args) != 1 || s.Args[0] != "sh" {
		t.Errorf("defaults not filled: %+v", s)
	}
	if s.Resources.Ceiling.Memory != 64<<20 {
		t.Errorf("ceiling did not default to the guarantee: %+v", s.Resources)
	}

	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		s    Spec
		want string
	}{
		{Spec{Name: "x", Rootfs: "rel/path"}, "not an absolute path"},
		{Spec{Name: "x", Rootfs: rootfs + "/../x"}, `".."`},
		{Spec{Name: "x", Rootfs: rootfs + "/"}, "not a clean path"},
		{Spec{Name: "x", Rootfs: file}, "not a directory"},
		{Spec{Name: "x", Rootfs: "/a,b"}, "overlay mount cannot take"},
		{Spec{Name: "x", Rootfs: rootfs, Bundle: rootfs}, "give one, not both"},
		{Spec{Name: "x", Rootfs: rootfs, Env: []string{"1X=2"}}, "env"},
		{Spec{Name: "x", Rootfs: rootfs, Cwd: "tmp"}, "cwd"},
		{Spec{Name: "x", Rootfs: rootfs, Sysctls: map[string]string{"vm.swappiness": "1"}}, "vm.swappiness"},
		{Spec{Name: "x", Rootfs: rootfs, IP: "10.0.0.300"}, "not an IPv4 address"},
		{Spec{Name: "x", Rootfs: rootfs, IP: "fe80::1"}, "not an IPv4 address"},
		{Spec{Name: "x"}, "default rootfs"},
	}
	for _, b := range bad {
		err := NormalizeSpec(&b.s, "/nonexistent/default", nil)
		if err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("NormalizeSpec(%+v) = %v, want %q", b.s, err, b.want)
		}
	}
}

func TestNormalizeSpecBundle(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := map[string]any{
		"root":     map[string]any{"path": "rootfs"},
		"process":  map[string]any{"args": []string{"/bin/app", "-v"}, "env": []string{"A=1"}, "cwd": "/srv"},
		"hostname": "bundled",
	}
	b, _ := json.Marshal(cfg)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	s := Spec{Name: "b", Bundle: dir, Env: []string{"B=2"}}
	if err := NormalizeSpec(&s, "", nil); err != nil {
		t.Fatal(err)
	}
	if s.Rootfs != filepath.Join(dir, "rootfs") || s.Args[0] != "/bin/app" || s.Cwd != "/srv" || s.Hostname != "bundled" {
		t.Errorf("bundle not applied: %+v", s)
	}
	if strings.Join(s.Env, ",") != "A=1,B=2" {
		t.Errorf("env %v, want the bundle's then the request's", s.Env)
	}
}

func TestOCISpecDefaults(t *testing.T) {
	s := Spec{Name: "x", Hostname: "x", Args: []string{"sh"}, Cwd: "/"}
	o := OCISpec(&s, "/merged", "/ferry/x", "/run/ferry/netns/x")
	for _, c := range o.Process.Capabilities.Bounding {
		if c == "CAP_SYS_ADMIN" || c == "CAP_BPF" || c == "CAP_SYS_MODULE" {
			t.Errorf("default capabilities include %s", c)
		}
	}
	ro := strings.Join(o.Linux.ReadonlyPaths, " ")
	if !strings.Contains(ro, "/proc/sys") {
		t.Errorf("/proc/sys not read-only: %v", o.Linux.ReadonlyPaths)
	}
	if len(o.Linux.MaskedPaths) == 0 || !o.Process.NoNewPrivileges {
		t.Error("masked paths or no_new_privileges missing")
	}
	kinds := map[string]bool{}
	for _, n := range o.Linux.Namespaces {
		kinds[string(n.Type)] = true
	}
	for _, n := range o.Linux.Namespaces {
		if n.Type == "network" && n.Path != "/run/ferry/netns/x" {
			t.Errorf("network namespace path %q, want the prepared one", n.Path)
		}
	}
	for _, k := range []string{"pid", "network", "ipc", "uts", "mount"} {
		if !kinds[k] {
			t.Errorf("namespace %s missing", k)
		}
	}
	cfg, err := LibcontainerConfig(o, cgroup.Spec{Ceiling: cgroup.Amount{CPU: 1, Memory: 64 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Cgroups.Path != "/ferry/x" || cfg.Cgroups.Memory != 64<<20 || cfg.Cgroups.CpuQuota != 100000 {
		t.Errorf("cgroup config: path %q memory %d quota %d", cfg.Cgroups.Path, cfg.Cgroups.Memory, cfg.Cgroups.CpuQuota)
	}
}

func TestToStatus(t *testing.T) {
	cases := map[error]codes.Code{
		errInvalidf("x"):      codes.InvalidArgument,
		cgroup.ErrInvalid:     codes.InvalidArgument,
		ErrNotFound:           codes.NotFound,
		ErrAlreadyExists:      codes.AlreadyExists,
		ErrFailedPrecondition: codes.FailedPrecondition,
		ErrResourceExhausted:  codes.ResourceExhausted,
		errors.New("boom"):    codes.Internal,
	}
	for err, want := range cases {
		if got := status.Code(toStatus(err)); got != want {
			t.Errorf("toStatus(%v) = %v, want %v", err, got, want)
		}
	}
}

func TestParsePublish(t *testing.T) {
	good := map[string]string{"8080:80": "tcp 0:8080->80", "127.0.0.1:53:5353/udp": "udp 127.0.0.1:53->5353", "1:65535/tcp": "tcp 0:1->65535"}
	for in, want := range good {
		p, err := ParsePublish(in)
		if err != nil {
			t.Errorf("ParsePublish(%q): %v", in, err)
			continue
		}
		host := "0"
		if p.HostIP.IsValid() {
			host = p.HostIP.String()
		}
		if got := p.Proto + " " + host + ":" + strconv.Itoa(int(p.HostPort)) + "->" + strconv.Itoa(int(p.ContainerPort)); got != want {
			t.Errorf("ParsePublish(%q) = %s, want %s", in, got, want)
		}
	}
	for _, in := range []string{"", "80", "0:80", "80:0", "70000:80", "a:b", "80:80/sctp", "::1:80:80", "1.2.3:80:80", "1:2:3:4"} {
		if _, err := ParsePublish(in); !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), strconv.Quote(in)) {
			t.Errorf("ParsePublish(%q) = %v, want InvalidArgument naming it", in, err)
		}
	}
}
