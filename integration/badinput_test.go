package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadInputChangesNothing: every invalid request gets an error naming the
// field and the value, the right gRPC code, and leaves nothing behind.
func TestBadInputChangesNothing(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a")
	d.start()
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.mustCtl("run", "taken", "--", "sleep", "1000")

	cases := []struct {
		name string
		args []string
		code string // gRPC code, or "" for a CLI-side refusal
		want []string
	}{
		{"uppercase name", []string{"run", "Bad"}, "InvalidArgument", []string{"name", `"Bad"`}},
		{"name with slash", []string{"run", "a/b"}, "InvalidArgument", []string{"name", `"a/b"`}},
		{"leading dash-like", []string{"run", "_x"}, "InvalidArgument", []string{"name", `"_x"`}},
		{"too long name", []string{"run", strings.Repeat("a", 64)}, "InvalidArgument", []string{"name"}},
		{"duplicate", []string{"run", "taken"}, "AlreadyExists", []string{`"taken"`}},
		{"missing rootfs", []string{"run", "x1", "--rootfs", "/nonexistent/rootfs"}, "InvalidArgument", []string{"rootfs", "/nonexistent/rootfs", "does not exist"}},
		{"rootfs not a dir", []string{"run", "x2", "--rootfs", notDir}, "InvalidArgument", []string{"rootfs", "not a directory"}},
		{"relative rootfs", []string{"run", "x3", "--rootfs", "opt/rootfs"}, "InvalidArgument", []string{"rootfs", `"opt/rootfs"`, "not an absolute path"}},
		{"traversing rootfs", []string{"run", "x4", "--rootfs", "/opt/ferry/../ferry/rootfs/busybox"}, "InvalidArgument", []string{"rootfs", `".."`}},
		{"rootfs and bundle", []string{"run", "x5", "--rootfs", defaultRootfs, "--bundle", "/tmp"}, "InvalidArgument", []string{"rootfs", "bundle"}},
		{"missing bundle", []string{"run", "x6", "--bundle", "/nonexistent/bundle"}, "InvalidArgument", []string{"bundle", "/nonexistent/bundle"}},
		{"negative cpu", []string{"run", "x7", "--cpu-guarantee", "-1"}, "", []string{"--cpu-guarantee", `"-1"`, "negative"}},
		{"unparsable memory", []string{"run", "x8", "--mem-limit", "lots"}, "", []string{"--mem-limit", `"lots"`}},
		{"negative memory", []string{"run", "x9", "--mem-guarantee", "-5M"}, "", []string{"--mem-guarantee", `"-5M"`, "negative"}},
		{"guarantee above limit", []string{"run", "x10", "--mem-guarantee", "128M", "--mem-limit", "64M"}, "InvalidArgument", []string{"memory guarantee 128Mi above memory limit 64Mi"}},
		{"cpu guarantee above limit", []string{"run", "x11", "--cpu-guarantee", "2", "--cpu-limit", "1"}, "InvalidArgument", []string{"cpu guarantee 2 above cpu limit 1"}},
		{"negative pids", []string{"run", "x12", "--pids", "-3"}, "InvalidArgument", []string{"pids -3"}},
		{"bad env", []string{"run", "x13", "--env", "NOEQUALS"}, "InvalidArgument", []string{"env", `"NOEQUALS"`}},
		{"global sysctl", []string{"run", "x14", "--sysctl", "kernel.pid_max=100000"}, "InvalidArgument", []string{"kernel.pid_max", "global"}},
		{"unknown sysctl", []string{"run", "x17", "--sysctl", "net.ipv4.no_such_key=1"}, "InvalidArgument", []string{"net.ipv4.no_such_key", "unknown"}},
		{"malformed sysctl value", []string{"run", "x18", "--sysctl", "kernel.shmmax=1\n2"}, "InvalidArgument", []string{"kernel.shmmax", "malformed value"}},
		{"malformed sysctl", []string{"run", "x19", "--sysctl", "novalue"}, "", []string{"--sysctl", `"novalue"`}},
		{"unknown capability", []string{"run", "x20", "--cap-add", "SUPERPOWER"}, "InvalidArgument", []string{"cap_add", `"SUPERPOWER"`}},
		{"missing binary", []string{"run", "x15", "--", "/no/such/binary"}, "InvalidArgument", []string{"/no/such/binary"}},
		{"bad hostname", []string{"run", "x16", "--hostname", "bad host"}, "InvalidArgument", []string{"hostname", `"bad host"`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := d.ctl(tc.args...)
			if code == 0 {
				t.Fatalf("ferryctl %v succeeded", tc.args)
			}
			if got := grpcCode(errOut); tc.code != "" && got != tc.code {
				t.Errorf("code %q, want %q (stderr %q)", got, tc.code, errOut)
			}
			for _, w := range tc.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("error %q does not contain %q", errOut, w)
				}
			}
			if len(tc.args) > 1 && tc.args[1] != "taken" {
				d.assertNoTrace(t, tc.args[1])
			}
		})
	}
	// Nothing but "taken" exists: no half-made state dir, cgroup or libcontainer state.
	for _, dir := range []string{filepath.Join(d.root, "containers"), filepath.Join(d.runDir, "libcontainer")} {
		ents, _ := os.ReadDir(dir)
		if len(ents) != 1 || ents[0].Name() != "taken" {
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			t.Errorf("%s holds %v, want only taken", dir, names)
		}
	}
	cg := cgroupDirs(d.cgParent)
	for _, p := range cg {
		base := filepath.Base(p)
		if base != "taken" && !strings.HasSuffix(p, d.cgParent) {
			t.Errorf("cgroup %s left by a refused request", p)
		}
	}
	d.mustCtl("rm", "-f", "taken")
}

// TestUnknownContainerEveryCommand: NotFound, naming the container.
func TestUnknownContainerEveryCommand(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "a")
	d.start()
	for _, args := range [][]string{
		{"inspect", "ghost"}, {"logs", "ghost"}, {"exec", "ghost", "--", "true"},
		{"stop", "ghost"}, {"rm", "ghost"}, {"rm", "-f", "ghost"},
	} {
		_, errOut, code := d.ctl(args...)
		if code == 0 || grpcCode(errOut) != "NotFound" || !strings.Contains(errOut, `"ghost"`) {
			t.Errorf("ferryctl %v: exit %d, stderr %q; want NotFound naming \"ghost\"", args, code, errOut)
		}
	}
	// exec in a container that is not running.
	d.mustCtl("run", "done", "--", "true")
	d.waitState("done", "exited", 10e9)
	if _, errOut, _ := d.ctl("exec", "done", "--", "true"); grpcCode(errOut) != "FailedPrecondition" {
		t.Errorf("exec in an exited container: %q, want FailedPrecondition", errOut)
	}
	if _, errOut, _ := d.ctl("exec", "done", "--", "true"); !strings.Contains(errOut, "not running") {
		t.Errorf("exec in an exited container: %q", errOut)
	}
	d.mustCtl("rm", "done")
}

// TestDaemonNotRunning: the CLI says which socket it tried.
func TestDaemonNotRunning(t *testing.T) {
	requireHost(t)
	d := newDaemon(t, "down") // never started
	for _, args := range [][]string{{"ps"}, {"version"}, {"run", "x"}} {
		_, errOut, code := d.ctl(args...)
		if code == 0 || !strings.Contains(errOut, d.socket) || !strings.Contains(errOut, "ferryd") {
			t.Errorf("ferryctl %v with no ferryd: exit %d, stderr %q; want the socket path named", args, code, errOut)
		}
	}
	// A socket file with nobody listening (ferryd crashed) is reported the same way.
	d.start()
	d.kill9()
	_, errOut, code := d.ctl("ps")
	if code == 0 || !strings.Contains(errOut, d.socket) {
		t.Errorf("ferryctl ps after ferryd died: exit %d, stderr %q", code, errOut)
	}
}
