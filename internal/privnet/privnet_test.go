package privnet

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/internal/testenv"
)

func TestPrivateLoopback(t *testing.T) {
	testenv.RequireRoot(t)
	ns, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ns.Close() }()
	ln, err := ns.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	addr := ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, "inside")
			_ = c.Close()
		}
	}()

	// From this process's own namespace the listener is out of reach.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr); err == nil {
		_ = c.Close()
		t.Fatalf("dial %s from the host's namespace succeeded; the private loopback is reachable", addr)
	}
	c, err := ns.Dial(ctx, addr)
	if err != nil {
		t.Fatalf("dial %s inside: %v", addr, err)
	}
	b, err := io.ReadAll(c)
	_ = c.Close()
	if err != nil || string(b) != "inside" {
		t.Fatalf("read %q, %v; want \"inside\"", b, err)
	}

	// A process started in it lives in it.
	cmd := exec.Command("sleep", "5")
	if err := ns.Start(cmd); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	ino, err := ns.Inode()
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("net:[%d]", ino); link != want {
		t.Fatalf("child's netns %s, want %s", link, want)
	}
	self, _ := os.Readlink("/proc/self/ns/net")
	if strings.EqualFold(self, link) {
		t.Fatalf("the namespace is this process's own (%s)", self)
	}
}
