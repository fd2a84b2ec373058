// Package privnet makes private network namespaces that hold nothing but a
// loopback device. A migration's CRIU page traffic (CRIU's page server and
// lazy-pages daemon, and ferryd's end of the authenticated tunnel to the
// peer) runs on such a loopback: no other process on the host can connect
// to it, read pages from it or feed pages into it. CRIU itself offers only
// plain TCP for that traffic, listening on every address when it serves
// lazy pages.
package privnet

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NS is a private network namespace, kept alive by an open handle (and by
// any process started in it).
type NS struct {
	h netns.NsHandle
	f *os.File // when made from a file: keeps the descriptor open
}

// FromFile takes a namespace handed over as an open file (for instance to
// a child process), which it keeps open.
func FromFile(f *os.File) *NS {
	return &NS{h: netns.NsHandle(f.Fd()), f: f}
}

// File returns a new open file of the namespace, for a child process.
func (n *NS) File() (*os.File, error) {
	fd, err := unix.Dup(int(n.h))
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(fd)
	return os.NewFile(uintptr(fd), "netns"), nil
}

// New makes a network namespace with its loopback up.
func New() (*NS, error) {
	type result struct {
		h   netns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		err := onThread(func() error {
			h, err := netns.New()
			if err != nil {
				return fmt.Errorf("new network namespace: %w", err)
			}
			lo, err := netlink.LinkByName("lo")
			if err == nil {
				err = netlink.LinkSetUp(lo)
			}
			if err != nil {
				_ = h.Close()
				return fmt.Errorf("loopback up in a new network namespace: %w", err)
			}
			ch <- result{h: h}
			return nil
		})
		if err != nil {
			ch <- result{err: err}
		}
	}()
	r := <-ch
	if r.err != nil {
		return nil, r.err
	}
	return &NS{h: r.h}, nil
}

// Do runs f on a thread in the namespace. Sockets f opens, and processes it
// starts, stay in the namespace; goroutines it starts do not run there.
func (n *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		errc <- onThread(func() error {
			if err := netns.Set(n.h); err != nil {
				return fmt.Errorf("enter private network namespace: %w", err)
			}
			return f()
		})
	}()
	return <-errc
}

// onThread runs f locked to its thread and puts the thread back into its
// network namespace afterwards. Should that fail, the thread stays locked
// and the runtime discards it when the goroutine ends (unless it is the
// main thread, which then sleeps for good rather than run other code in
// the wrong namespace).
func onThread(f func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("this thread's network namespace: %w", err)
	}
	defer func() { _ = orig.Close() }()
	err = f()
	if netns.Set(orig) == nil {
		runtime.UnlockOSThread()
	}
	return err
}

// Listen opens a TCP listener in the namespace.
func (n *NS) Listen(addr string) (*net.TCPListener, error) {
	var ln net.Listener
	err := n.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// Dial connects to addr in the namespace.
func (n *NS) Dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// Join puts the calling thread into the namespace and leaves it there: for
// a thread whose namespaces its owner puts back (criuview's Do).
func (n *NS) Join() error {
	if err := netns.Set(n.h); err != nil {
		return fmt.Errorf("enter private network namespace: %w", err)
	}
	return nil
}

// Start starts cmd in the namespace.
func (n *NS) Start(cmd *exec.Cmd) error {
	return n.Do(cmd.Start)
}

// Close drops the handle; the namespace goes when its last process does.
func (n *NS) Close() error {
	if n == nil || n.h == -1 {
		return nil
	}
	var err error
	if n.f != nil {
		err = n.f.Close()
	} else {
		err = n.h.Close()
	}
	n.h = -1
	return err
}

// Inode identifies the namespace, as /proc/PID/ns/net does.
func (n *NS) Inode() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(n.h), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
