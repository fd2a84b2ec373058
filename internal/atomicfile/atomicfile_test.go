package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWriteReplacesAndLeavesNoTemp(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	type rec struct{ N int }
	for i := 1; i <= 3; i++ {
		if err := WriteJSON(p, rec{N: i}, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var got rec
	if err := ReadJSON(p, &got); err != nil {
		t.Fatal(err)
	}
	if got.N != 3 {
		t.Fatalf("N=%d, want 3", got.N)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("dir holds %d entries, want only state.json", len(ents))
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", st.Mode())
	}
}

func TestWriteIntoMissingDirFails(t *testing.T) {
	if err := Write(filepath.Join(t.TempDir(), "no", "f"), []byte("x"), 0o600); err == nil {
		t.Fatal("write into a missing dir succeeded")
	}
}
