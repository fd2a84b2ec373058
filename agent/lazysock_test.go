package agent

import (
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// restoreSide writes what a CRIU restore writes on the lazy-pages socket:
// for each pid a word, and for a pid > 0 one byte with the descriptor.
func restoreSide(t *testing.T, c *net.UnixConn, pids []int32, fds []*os.File) {
	t.Helper()
	for i, pid := range pids {
		var w [4]byte
		binary.NativeEndian.PutUint32(w[:], uint32(pid))
		if _, err := c.Write(w[:]); err != nil {
			t.Fatal(err)
		}
		if pid > 0 && pid != lazyRestoreFinished {
			if _, _, err := c.WriteMsgUnix([]byte{0}, unix.UnixRights(int(fds[i].Fd())), nil); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// daemonSide reads the way criu lazy-pages does (recv of 4 bytes without
// room for descriptors, then recvmsg of one byte with room for one) and
// returns the pids and the inode of each descriptor received.
func daemonSide(t *testing.T, c *net.UnixConn, n int) (pids []int32, inodes []uint64) {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	fd := int(f.Fd())
	for i := 0; i < n; i++ {
		var w [4]byte
		got, _, err := unix.Recvfrom(fd, w[:], 0)
		if err != nil || got != 4 {
			t.Fatalf("pid %d: %d bytes, %v", i, got, err)
		}
		pid := int32(binary.NativeEndian.Uint32(w[:]))
		pids = append(pids, pid)
		if pid <= 0 || pid == lazyRestoreFinished {
			continue
		}
		oob := make([]byte, unix.CmsgSpace(4))
		var b [1]byte
		_, oobn, flags, _, err := unix.Recvmsg(fd, b[:], oob, 0)
		if err != nil || flags&unix.MSG_CTRUNC != 0 {
			t.Fatalf("descriptor of %d: %v (flags %#x)", pid, err, flags)
		}
		rights, err := socketRights(oob[:oobn])
		if err != nil || len(rights) != 1 {
			t.Fatalf("descriptor of %d: %v, %d descriptors", pid, err, len(rights))
		}
		var st unix.Stat_t
		if err := unix.Fstat(rights[0], &st); err != nil {
			t.Fatal(err)
		}
		_ = unix.Close(rights[0])
		inodes = append(inodes, st.Ino)
	}
	return pids, inodes
}

func unixPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		defer func() { _ = f.Close() }()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

func pipeInode(t *testing.T) (*os.File, uint64) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
	var st unix.Stat_t
	if err := unix.Fstat(int(r.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return r, st.Ino
}

func TestRelayLazyMessagesKeepsDescriptorsWithTheirByte(t *testing.T) {
	restoreEnd, relayIn := unixPair(t)
	relayOut, daemonEnd := unixPair(t)
	f1, ino1 := pipeInode(t)
	f2, ino2 := pipeInode(t)
	pids := []int32{41, -42, 43, lazyRestoreFinished}
	// All of it is queued before the relay reads: the pid and the byte
	// with the descriptor must not be read (and passed on) as one.
	restoreSide(t, restoreEnd, pids, []*os.File{f1, nil, f2, nil})
	errc := make(chan error, 1)
	go func() { errc <- relayLazyMessages(relayIn, relayOut) }()
	gotPids, inodes := daemonSide(t, daemonEnd, len(pids))
	if err := <-errc; err != nil {
		t.Fatalf("relay: %v", err)
	}
	for i := range pids {
		if gotPids[i] != pids[i] {
			t.Fatalf("pids: got %v, want %v", gotPids, pids)
		}
	}
	if len(inodes) != 2 || inodes[0] != ino1 || inodes[1] != ino2 {
		t.Fatalf("descriptors: got inodes %v, want [%d %d]", inodes, ino1, ino2)
	}
}

func TestRelayLazyMessagesErrors(t *testing.T) {
	t.Run("restore closes before it finished", func(t *testing.T) {
		restoreEnd, relayIn := unixPair(t)
		relayOut, _ := unixPair(t)
		f, _ := pipeInode(t)
		restoreSide(t, restoreEnd, []int32{7}, []*os.File{f})
		_ = restoreEnd.Close()
		err := relayLazyMessages(relayIn, relayOut)
		if err == nil || !strings.Contains(err.Error(), "before it finished") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("a descriptor with the pid", func(t *testing.T) {
		restoreEnd, relayIn := unixPair(t)
		relayOut, _ := unixPair(t)
		f, _ := pipeInode(t)
		if _, _, err := restoreEnd.WriteMsgUnix([]byte{7, 0, 0, 0}, unix.UnixRights(int(f.Fd())), nil); err != nil {
			t.Fatal(err)
		}
		err := relayLazyMessages(relayIn, relayOut)
		if err == nil || !strings.Contains(err.Error(), "descriptor where none belongs") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("no descriptor with the byte", func(t *testing.T) {
		restoreEnd, relayIn := unixPair(t)
		relayOut, _ := unixPair(t)
		if _, err := restoreEnd.Write([]byte{7, 0, 0, 0, 0}); err != nil {
			t.Fatal(err)
		}
		err := relayLazyMessages(relayIn, relayOut)
		if err == nil || !strings.Contains(err.Error(), "want one descriptor, got 0") {
			t.Fatalf("got %v", err)
		}
	})
}

// The restore connects before the daemon has a socket; the relay passes
// its messages on once the daemon listens.
func TestLazyRelayWaitsForTheDaemon(t *testing.T) {
	dir := t.TempDir()
	restoreWork, daemonWork := filepath.Join(dir, "work"), filepath.Join(dir, "lazy")
	ready, ended := make(chan struct{}), make(chan struct{})
	r, err := listenLazyRelay(restoreWork, daemonWork, ready, ended)
	if err != nil {
		t.Fatal(err)
	}
	defer r.close()
	rc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: filepath.Join(restoreWork, lazySockName), Net: "unix"})
	if err != nil {
		t.Fatalf("the restore's connect: %v", err)
	}
	defer func() { _ = rc.Close() }()
	f, ino := pipeInode(t)
	restoreSide(t, rc, []int32{5, lazyRestoreFinished}, []*os.File{f, nil})

	if err := os.MkdirAll(daemonWork, 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(daemonWork, lazySockName), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	go waitForSocket(filepath.Join(daemonWork, lazySockName), ready, ended, 10*time.Second)
	_ = ln.SetDeadline(time.Now().Add(10 * time.Second))
	dc, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = dc.Close() }()
	pids, inodes := daemonSide(t, dc, 2)
	if pids[0] != 5 || pids[1] != lazyRestoreFinished || len(inodes) != 1 || inodes[0] != ino {
		t.Fatalf("got pids %v inodes %v, want [5 RSTF] [%d]", pids, inodes, ino)
	}
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("relay: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not end after the restore finished")
	}
}

func TestLazyRelayDaemonEndsFirst(t *testing.T) {
	dir := t.TempDir()
	ready, ended := make(chan struct{}), make(chan struct{})
	r, err := listenLazyRelay(filepath.Join(dir, "work"), filepath.Join(dir, "lazy"), ready, ended)
	if err != nil {
		t.Fatal(err)
	}
	defer r.close()
	rc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: filepath.Join(dir, "work", lazySockName), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = rc.Close() }()
	close(ended)
	select {
	case err := <-r.done:
		if err == nil || !strings.Contains(err.Error(), "ended before the restore could reach it") {
			t.Fatalf("got %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not give up")
	}
	// The restore's end is closed: its sends fail rather than wait.
	_ = rc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := rc.Read(make([]byte, 1)); err == nil {
		t.Fatalf("read %d bytes from a relay that gave up", n)
	}
}
