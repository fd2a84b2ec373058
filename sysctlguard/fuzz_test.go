package sysctlguard

import (
	"strings"
	"testing"
)

// FuzzValidate: an accepted key is never one of the global keys, and the
// policy's trie agrees with Validate about it.
func FuzzValidate(f *testing.F) {
	for _, kv := range [][2]string{{"kernel.shmmax", "1"}, {"net.ipv4.ip_forward", "1"}, {"kernel.panic", "1"},
		{"net.bridge.x", "1"}, {"../etc", "1"}, {"net.core.rmem_max", "4096"}, {"fs.mqueue.msg_max", "10 20"}} {
		f.Add(kv[0], kv[1])
	}
	p, err := NewPolicy(nil)
	if err != nil {
		f.Fatal(err)
	}
	all := p.For(Namespaces{IPC: true, UTS: true, Net: true})
	f.Fuzz(func(t *testing.T, key, value string) {
		err := Validate(key, value, Namespaces{IPC: true, UTS: true, Net: true})
		if err != nil {
			return
		}
		if strings.HasPrefix(key, "vm.") || strings.HasPrefix(key, "net.bridge.") || key == "kernel.panic" {
			t.Fatalf("global key %q accepted", key)
		}
		if !all.Allows(key) {
			t.Fatalf("Validate accepts %q but the BPF policy would deny it", key)
		}
	})
}
