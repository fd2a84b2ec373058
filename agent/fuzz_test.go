package agent

import (
	"errors"
	"strings"
	"testing"

	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/sysctlguard"
)

// FuzzNormalizeSpec: whatever a client sends, validation either accepts a
// spec that is safe to hand to libcontainer or refuses it with a classed
// error; it never panics.
func FuzzNormalizeSpec(f *testing.F) {
	f.Add("web", "", "sh", "A=1", "web", "kernel.shmmax", "1", "", "8080:80")
	f.Add("Bad", "/nope", "", "=", "", "vm.swappiness", "1", "300.1.1.1", "x")
	f.Add("a", "/opt/../etc", "\x00", "A", "h h", "net.ipv4.ip_forward", "1\n", "10.0.0.1", "1:2:3:4")
	root := f.TempDir()
	f.Fuzz(func(t *testing.T, name, rootfs, arg, env, hostname, skey, sval, ip, publish string) {
		if rootfs == "" {
			rootfs = root
		}
		s := Spec{Name: name, Rootfs: rootfs, Args: []string{arg}, Env: []string{env}, Hostname: hostname,
			Sysctls: map[string]string{skey: sval}, IP: ip, Publish: []string{publish},
			Resources: cgroup.Spec{Guarantee: cgroup.Amount{CPU: 0.1}}}
		err := NormalizeSpec(&s, root, nil)
		if err != nil {
			if !errors.Is(err, ErrInvalidArgument) && !errors.Is(err, cgroup.ErrInvalid) &&
				!errors.Is(err, sysctlguard.ErrInvalid) && !errors.Is(err, ErrFailedPrecondition) {
				t.Fatalf("unclassed error %v", err)
			}
			return
		}
		if ValidateName(s.Name) != nil || strings.Contains(s.Rootfs, "..") || strings.ContainsRune(s.Args[0], 0) {
			t.Fatalf("accepted an unsafe spec %+v", s)
		}
		o := OCISpec(&s, "/merged", "/ferry/"+s.Name, "")
		if _, err := LibcontainerConfig(o, s.Resources); err != nil {
			t.Fatalf("accepted spec does not convert: %v", err)
		}
	})
}
