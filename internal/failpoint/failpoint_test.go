package failpoint

import "testing"

func TestCheck(t *testing.T) {
	t.Setenv("FERRY_FAILPOINTS", "a,b=error")
	for _, name := range []string{"a", "b"} {
		if err := Check(name); Enabled != (err != nil) {
			t.Errorf("Check(%q) = %v with Enabled=%v", name, err, Enabled)
		}
	}
	if err := Check("c"); err != nil {
		t.Errorf("Check(c) = %v, want nil (not turned on)", err)
	}
}
