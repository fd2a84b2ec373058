package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestCAAndNodeCertificates(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	ca, created, err := LoadOrCreateCA(dir, now)
	if err != nil || !created {
		t.Fatalf("create CA: %v (created %v)", err, created)
	}
	again, created, err := LoadOrCreateCA(dir, now)
	if err != nil || created || !again.Cert.Equal(ca.Cert) {
		t.Fatalf("reload CA: %v (created %v)", err, created)
	}
	out, err := ca.IssueNode(dir, "node-a", []string{"10.1.2.3", "a.example"}, 0, now)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(out, CertFile), filepath.Join(out, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(filepath.Join(out, CAFile))
	pool.AppendCertsFromPEM(caPEM)
	for _, name := range []string{"node-a", "localhost", "10.1.2.3", "127.0.0.1", "a.example"} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "node-b"}); err == nil {
		t.Error("certificate valid for a name it was not issued for")
	}
	st, _ := os.Stat(filepath.Join(out, KeyFile))
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v", st.Mode())
	}
	for _, bad := range []struct{ name, san string }{{"Bad Name", ""}, {"ok", "not a san!"}} {
		var sans []string
		if bad.san != "" {
			sans = []string{bad.san}
		}
		if _, err := ca.IssueNode(dir, bad.name, sans, 0, now); !errors.Is(err, ErrInvalid) {
			t.Errorf("IssueNode(%q, %q) = %v, want ErrInvalid", bad.name, bad.san, err)
		}
	}
}
