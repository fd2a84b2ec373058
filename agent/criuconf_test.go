package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/ferry-agent/ferry/cgroup"
)

func TestCriuConf(t *testing.T) {
	dir := t.TempDir()
	o := &specs.Spec{}
	withCriuConf(o, dir)
	if got, want := o.Annotations[criuConfAnnotation], filepath.Join(dir, "criu.conf"); got != want {
		t.Fatalf("annotation %q = %q, want %q", criuConfAnnotation, got, want)
	}
	for _, tc := range []struct {
		call criuCall
		want []string
	}{
		{criuCall{}, []string{"network-lock skip"}},
		{criuCall{lazyPages: true}, []string{"network-lock skip", "lazy-pages", "address 127.0.0.1", "port 2700"}},
	} {
		if err := writeCriuConf(dir, tc.call); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, "criu.conf"))
		if err != nil {
			t.Fatal(err)
		}
		var opts []string
		for _, l := range strings.Split(string(b), "\n") {
			if l != "" && !strings.HasPrefix(l, "#") {
				opts = append(opts, l)
			}
		}
		if strings.Join(opts, "|") != strings.Join(tc.want, "|") {
			t.Errorf("%+v: options %q, want %q", tc.call, opts, tc.want)
		}
	}
	// A spec converted for libcontainer carries the file as a label, which
	// is where libcontainer looks for it.
	o = OCISpec(&Spec{Name: "c", Args: []string{"sh"}, Cwd: "/"}, "/merged", "/ferry/c", "")
	withCriuConf(o, dir)
	cfg, err := LibcontainerConfig(o, cgroup.Spec{Guarantee: cgroup.Amount{CPU: 0.1}})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range cfg.Labels {
		found = found || l == criuConfAnnotation+"="+filepath.Join(dir, "criu.conf")
	}
	if !found {
		t.Fatalf("labels %q lack %s", cfg.Labels, criuConfAnnotation)
	}
}
