package migrate

import (
	"bytes"
	"testing"
)

// FuzzExtractTree feeds arbitrary bytes to ExtractTree and checks that,
// whatever it accepted or refused, nothing exists outside the destination
// (the sentinel beside it is untouched) and the destination holds no device
// other than whiteouts, no FIFO, no socket, no setid file.
//
// The seed corpus is in testdata/fuzz/FuzzExtractTree, made by
// `go run ./testdata/genseeds` (valid trees, and each kind of refused
// entry); crashers found by `go test -fuzz` are committed beside them.
// Each input gets fresh directories from t.TempDir: on this machine's ext4
// /tmp that costs ~5 ms, on tmpfs ~0.3 ms, so fuzz with TMPDIR=/dev/shm.
func FuzzExtractTree(f *testing.F) {
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		sb := newSandbox(t)
		t.Cleanup(func() { makeRemovable(sb.dest) })
		limits := Limits{MaxBytes: 64 << 10, MaxFiles: 16}
		s, _ := ExtractTree(bytes.NewReader(data), sb.dest, limits)
		if s.Bytes > limits.MaxBytes || s.Entries() > limits.MaxFiles {
			t.Errorf("created %d entries, %d bytes, over limits %+v", s.Entries(), s.Bytes, limits)
		}
		sb.checkContained(t)
	})
}
