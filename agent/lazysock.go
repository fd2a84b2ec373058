package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// A post-copy restore hands each restored task's userfaultfd to the
// lazy-pages daemon over a UNIX socket, lazy-pages.socket in its working
// directory, which it connects to early, before it restores anything. The
// daemon creates that socket only after it has started and probed the
// kernel (~35 ms here without a kerndat cache), and it can start only once
// the images are in: started one after the other, both are on the path of
// the container's downtime. lazyRelay lets them start together: the
// monitor listens on the restore's socket itself, takes the restore's
// connection at once, and passes its messages on to the daemon's own
// socket (in another directory) once that exists.
//
// CRIU's protocol on that socket (criu/uffd.c, unchanged since CRIU 3.5),
// restore to daemon only: per task an int32 PID and then, for a PID > 0,
// one byte carrying the userfaultfd (SCM_RIGHTS); a zombie is sent as its
// negative PID alone; at the end the int32 lazyRestoreFinished. The relay
// keeps those boundaries: a descriptor must arrive with the byte the daemon
// reads it with.
const (
	lazySockName        = "lazy-pages.socket"
	lazyRestoreFinished = 0x52535446 // "RSTF", LAZY_PAGES_RESTORE_FINISHED
)

// lazyRelay is the restore's end of the lazy-pages socket.
type lazyRelay struct {
	ln   *net.UnixListener
	done chan error // the relay's end: nil once the restore said it finished
}

// listenLazyRelay listens on lazy-pages.socket in restoreWork (the
// restore's CRIU working directory) and relays the one connection the
// restore makes to the daemon's socket in daemonWork, once daemonReady
// (closed when the daemon's socket exists) says so. daemonEnded yields the
// daemon's end, should it end first.
func listenLazyRelay(restoreWork, daemonWork string, daemonReady <-chan struct{}, daemonEnded <-chan struct{}) (*lazyRelay, error) {
	if err := os.MkdirAll(restoreWork, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(restoreWork, lazySockName)
	_ = os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("lazy-pages socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	r := &lazyRelay{ln: ln, done: make(chan error, 1)}
	go func() {
		r.done <- r.run(filepath.Join(daemonWork, lazySockName), daemonReady, daemonEnded)
	}()
	return r, nil
}

// close stops listening; a relay under way goes on.
func (r *lazyRelay) close() { _ = r.ln.Close() }

func (r *lazyRelay) run(daemonSock string, daemonReady, daemonEnded <-chan struct{}) error {
	from, err := r.ln.AcceptUnix()
	_ = r.ln.Close()
	if err != nil {
		return err
	}
	defer func() { _ = from.Close() }()
	select {
	case <-daemonReady:
	case <-daemonEnded:
		return errors.New("criu lazy-pages ended before the restore could reach it")
	}
	// The socket file exists from the daemon's bind; it listens a moment
	// later.
	var to *net.UnixConn
	for tries := 0; ; tries++ {
		to, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: daemonSock, Net: "unix"})
		if err == nil {
			break
		}
		if !errors.Is(err, unix.ECONNREFUSED) || tries == 1000 {
			return fmt.Errorf("lazy-pages daemon: %w", err)
		}
		time.Sleep(time.Millisecond)
	}
	defer func() { _ = to.Close() }()
	return relayLazyMessages(from, to)
}

// relayLazyMessages passes the restore's messages (from) on to the daemon
// (to) until the restore says it finished, or closes its end.
func relayLazyMessages(from, to *net.UnixConn) error {
	var word [4]byte
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		if err := readExact(from, word[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the restore closed the lazy-pages socket before it finished")
			}
			return err
		}
		if _, err := to.Write(word[:]); err != nil {
			return err
		}
		v := int32(binary.NativeEndian.Uint32(word[:]))
		switch {
		case v == lazyRestoreFinished:
			return nil
		case v <= 0:
			continue // a zombie: no descriptor follows
		}
		var b [1]byte
		n, oobn, _, _, err := from.ReadMsgUnix(b[:], oob)
		if err == nil && n != 1 {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return fmt.Errorf("userfaultfd of %d: %w", v, err)
		}
		fds, err := socketRights(oob[:oobn])
		if err != nil {
			return fmt.Errorf("userfaultfd of %d: %w", v, err)
		}
		if len(fds) != 1 {
			closeFds(fds)
			return fmt.Errorf("userfaultfd of %d: want one descriptor, got %d", v, len(fds))
		}
		_, _, err = to.WriteMsgUnix(b[:], unix.UnixRights(fds[0]), nil)
		_ = unix.Close(fds[0]) // the daemon holds its own copy now
		if err != nil {
			return err
		}
	}
}

// readExact fills p with a message that carries no descriptors.
func readExact(c *net.UnixConn, p []byte) error {
	oob := make([]byte, unix.CmsgSpace(4*4))
	for got := 0; got < len(p); {
		n, oobn, _, _, err := c.ReadMsgUnix(p[got:], oob)
		if oobn > 0 {
			fds, _ := socketRights(oob[:oobn])
			closeFds(fds)
			return errors.New("a descriptor where none belongs")
		}
		got += n
		if err != nil {
			if errors.Is(err, io.EOF) && got > 0 {
				return io.ErrUnexpectedEOF
			}
			return err
		}
		if n == 0 {
			return io.EOF
		}
	}
	return nil
}

func socketRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		f, err := unix.ParseUnixRights(&m)
		if err != nil {
			closeFds(fds)
			return nil, err
		}
		fds = append(fds, f...)
	}
	return fds, nil
}

func closeFds(fds []int) {
	for _, fd := range fds {
		_ = unix.Close(fd)
	}
}

// waitForSocket closes ready once path exists and tells whether it did;
// it gives up when ended yields first or after within.
func waitForSocket(path string, ready chan<- struct{}, ended <-chan struct{}, within time.Duration) bool {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			close(ready)
			return true
		}
		select {
		case <-ended:
			return false
		case <-time.After(time.Millisecond):
		}
	}
	return false
}
