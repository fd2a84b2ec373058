package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/netsetup"
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

// FuzzPeerSpec: the container a source hands over arrives as JSON; the
// destination decodes it, drops the bundle and validates it with the same
// rules as a local request. Whatever a peer sends, the result is a refusal
// with a classed error or a spec safe to run; never a panic.
func FuzzPeerSpec(f *testing.F) {
	f.Add([]byte(`{"name":"web","args":["sh"],"ip":"10.0.0.2","resources":{"guarantee":{"cpu":0.5,"memory":33554432}}}`))
	f.Add([]byte(`{"name":"x","rootfs":"/etc/../../","bundle":"/","args":[]}`))
	f.Add([]byte(`{"name":"a","args":["a"],"sysctls":{"kernel.panic":"1"},"ports":[{"host":1,"container":0}]}`))
	f.Add([]byte(`null`))
	root := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		var s Spec
		if json.Unmarshal(b, &s) != nil {
			return
		}
		s.Bundle = ""
		if s.Rootfs == "" {
			s.Rootfs = root
		}
		err := NormalizeSpec(&s, root, nil)
		if err != nil {
			if !errors.Is(err, ErrInvalidArgument) && !errors.Is(err, cgroup.ErrInvalid) &&
				!errors.Is(err, sysctlguard.ErrInvalid) && !errors.Is(err, ErrFailedPrecondition) &&
				!errors.Is(err, netsetup.ErrInvalid) {
				t.Fatalf("unclassed error %v", err)
			}
			return
		}
		if ValidateName(s.Name) != nil || strings.Contains(s.Rootfs, "..") || len(s.Args) == 0 {
			t.Fatalf("accepted an unsafe spec %+v", s)
		}
		o := OCISpec(&s, "/merged", "/ferry/"+s.Name, "")
		if _, err := LibcontainerConfig(o, s.Resources); err != nil {
			t.Fatalf("accepted spec does not convert: %v", err)
		}
	})
}

// FuzzPageDirs: the page directory and parent a source names in a page
// tunnel's metadata; accepted names stay inside the migration's directory.
func FuzzPageDirs(f *testing.F) {
	for _, s := range [][2]string{{"images", "pre-3"}, {"pre-1", ""}, {"../x", ""}, {"pre-2", "images"}, {"pre-1/..", "pre-1"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, dir, parent string) {
		if err := validatePageDirs(dir, parent); err != nil {
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("unclassed error %v", err)
			}
			return
		}
		for _, n := range []string{dir, parent} {
			if strings.ContainsAny(n, "/\\\x00") || strings.Contains(n, "..") || filepath.Clean("x/"+n) != filepath.Join("x", n) {
				t.Fatalf("accepted %q", n)
			}
		}
		if parent == dir || parent == "images" {
			t.Fatalf("accepted parent %q for %q", parent, dir)
		}
	})
}

// FuzzPartStream: an image stream is a sequence of chunks, each naming its
// part; whatever order and sizes a peer sends, reading part by part yields
// each run of chunks of one part, in order, and never panics.
func FuzzPartStream(f *testing.F) {
	f.Add([]byte{0, 3, 'a', 'b', 'c', 1, 0, 1, 2, 'x', 'y', 0, 1, 'z'})
	f.Add([]byte{2, 255})
	f.Add([]byte{})
	names := []string{"images", "upper", "log", ""}
	f.Fuzz(func(t *testing.T, b []byte) {
		var chunks []*api.ImageChunk
		for len(b) >= 2 {
			n := int(b[1])
			if n > len(b)-2 {
				n = len(b) - 2
			}
			chunks = append(chunks, &api.ImageChunk{Part: names[int(b[0])%len(names)], Data: b[2 : 2+n]})
			b = b[2+n:]
		}
		if len(chunks) == 0 {
			return
		}
		// What a reader must see: consecutive chunks of one part make one
		// part (the first chunk always starts one).
		type run struct {
			part string
			data []byte
		}
		var want []run
		for i, c := range chunks {
			if i == 0 || c.Part != chunks[i-1].Part {
				want = append(want, run{part: c.Part})
			}
			want[len(want)-1].data = append(want[len(want)-1].data, c.Data...)
		}
		i := 1
		ps := &partStream{pending: chunks[0], recv: func() (*api.ImageChunk, error) {
			if i >= len(chunks) {
				return nil, io.EOF
			}
			i++
			return chunks[i-1], nil
		}}
		var got []run
		for {
			part, err := ps.next()
			if err != nil {
				t.Fatal(err)
			}
			if part == "" && ps.done && ps.pending == nil {
				break
			}
			data, err := io.ReadAll(ps)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, run{part, data})
		}
		// A part named "" cannot be told from the end; compare up to it.
		for k := range want {
			if want[k].part == "" {
				want = want[:k]
				break
			}
		}
		if len(got) < len(want) {
			t.Fatalf("read %d parts, sent %d", len(got), len(want))
		}
		for k := range want {
			if got[k].part != want[k].part || !bytes.Equal(got[k].data, want[k].data) {
				t.Fatalf("part %d: got %q %q, want %q %q", k, got[k].part, got[k].data, want[k].part, want[k].data)
			}
		}
	})
}
