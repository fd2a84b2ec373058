// Package testenv holds the checks privileged tests make before they run:
// locally they skip with a reason, under CI=true they fail, so a CI run can
// never pass by silently skipping what it was meant to prove.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run under CI (CI=true).
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips t locally and fails it under CI.
func Unavailable(t testing.TB, why string) {
	t.Helper()
	if InCI() {
		t.Fatalf("required for this test and missing under CI=true: %s", why)
	}
	t.Skipf("skipped: %s (fails under CI=true)", why)
}

// RequireRoot needs euid 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root")
	}
}

// RequireBinary needs name on PATH (or as an absolute path) and returns its path.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Unavailable(t, name+" not found (run make deps)")
	}
	return p
}

// RequirePath needs path to exist.
func RequirePath(t testing.TB, path, why string) {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		Unavailable(t, path+": "+why)
	}
}
