package sysctlguard

import (
	"errors"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	all := Namespaces{IPC: true, UTS: true, Net: true}
	for _, kv := range [][2]string{
		{"kernel.shmmax", "68719476736"}, {"kernel.sem", "250 32000 32 128"}, {"fs.mqueue.msg_max", "20"},
		{"net.ipv4.ip_local_port_range", "1024 65000"}, {"net.ipv4.tcp_syncookies", "1"},
		{"kernel.domainname", "example"}, {"net.core.somaxconn", "1024"},
	} {
		if err := Validate(kv[0], kv[1], all); err != nil {
			t.Errorf("Validate(%s=%s): %v", kv[0], kv[1], err)
		}
	}
	bad := []struct {
		k, v string
		ns   Namespaces
		want string
	}{
		{"kernel.pid_max", "4194304", all, "global to the host"},
		{"vm.swappiness", "10", all, "global to the host"},
		{"kernel.panic", "1", all, "global to the host"},
		{"net.bridge.bridge-nf-call-iptables", "0", all, "not per network namespace"},
		{"net.core.rmem_max", "1000", all, "not per network namespace"},
		{"net.ipv4.ip_forward", "1", Namespaces{IPC: true}, "network namespace"},
		{"kernel.shmmax", "1", Namespaces{Net: true}, "IPC namespace"},
		{"kernel.shmmax", "1\n2", all, "malformed value"},
		{"kernel.shmmax", "", all, "malformed value"},
		{"../../etc/passwd", "1", all, "malformed key"},
		{"net..ipv4", "1", all, "malformed key"},
		{"KERNEL", "1", all, "malformed key"},
	}
	for _, b := range bad {
		err := Validate(b.k, b.v, b.ns)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), b.want) {
			t.Errorf("Validate(%q=%q) = %v, want %q", b.k, b.v, err, b.want)
		}
		if err != nil && !strings.Contains(err.Error(), b.k) {
			t.Errorf("error %q does not name the key", err)
		}
	}
}
