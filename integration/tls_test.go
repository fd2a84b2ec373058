package integration

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/agent/client"
	"github.com/ferry-agent/ferry/internal/pki"
)

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// rawTLSClient dials with an arbitrary client certificate (or none).
func rawTLSClient(t *testing.T, addr, caDir string, cert *tls.Certificate) api.FerryClient {
	t.Helper()
	caPEM, err := os.ReadFile(filepath.Join(caDir, pki.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cfg := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return api.NewFerryClient(conn)
}

// TestMutualTLS: a controller with a certificate from the cluster CA is
// served; one with none, one from another CA or an expired one gets
// UNAUTHENTICATED and changes nothing.
func TestMutualTLS(t *testing.T) {
	requireHost(t)
	now := time.Now()
	pkiDir, otherDir := t.TempDir(), t.TempDir()
	ca, _, err := pki.LoadOrCreateCA(pkiDir, now)
	if err != nil {
		t.Fatal(err)
	}
	nodeDir, err := ca.IssueNode(pkiDir, "node-a", nil, 0, now)
	if err != nil {
		t.Fatal(err)
	}
	ctlDir, err := ca.IssueNode(pkiDir, "controller", nil, 0, now)
	if err != nil {
		t.Fatal(err)
	}
	expiredDir, err := ca.IssueNode(pkiDir, "expired", nil, time.Hour, now.Add(-48*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := pki.LoadOrCreateCA(otherDir, now)
	if err != nil {
		t.Fatal(err)
	}
	intruderDir, err := other.IssueNode(otherDir, "intruder", nil, 0, now)
	if err != nil {
		t.Fatal(err)
	}

	addr := "127.0.0.1:" + freePort(t)
	d := newHostNetDaemon(t, "a", "--listen", addr, "--tls-dir", nodeDir)
	d.start()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	good, err := client.DialTLS(addr, ctlDir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = good.Close() }()
	v, err := good.Version(ctx, &api.VersionRequest{})
	if err != nil || v.NodeName != "a" {
		t.Fatalf("controller with a valid certificate: %v, %v", v, err)
	}

	load := func(dir string) *tls.Certificate {
		c, err := tls.LoadX509KeyPair(filepath.Join(dir, pki.CertFile), filepath.Join(dir, pki.KeyFile))
		if err != nil {
			t.Fatal(err)
		}
		return &c
	}
	for name, cl := range map[string]api.FerryClient{
		"no certificate": rawTLSClient(t, addr, pkiDir, nil),
		"another CA":     rawTLSClient(t, addr, pkiDir, load(intruderDir)),
		"expired":        rawTLSClient(t, addr, pkiDir, load(expiredDir)),
	} {
		_, err := cl.RunContainer(ctx, &api.RunContainerRequest{Name: "sneaky", Args: []string{"sleep", "100"}})
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: RunContainer got %v, want Unauthenticated", name, err)
		}
		_, err = cl.ListContainers(ctx, &api.ListContainersRequest{})
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: ListContainers got %v, want Unauthenticated", name, err)
		}
		s, err := cl.Logs(ctx, &api.LogsRequest{Name: "sneaky"})
		if err == nil {
			_, err = s.Recv()
		}
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: Logs stream got %v, want Unauthenticated", name, err)
		}
	}
	// A controller may not make this node use its own / (or any directory
	// outside the allowed ones) as a container's root.
	for _, rootfs := range []string{"/", "/etc", "/opt/ferry/rootfs/../../etc"} {
		_, err := good.RunContainer(ctx, &api.RunContainerRequest{Name: "escape", Rootfs: rootfs, Args: []string{"true"}})
		if status.Code(err) != codes.FailedPrecondition && status.Code(err) != codes.InvalidArgument {
			t.Errorf("remote run with rootfs %q: %v, want FailedPrecondition", rootfs, err)
		}
	}
	d.assertNoTrace(t, "escape")
	resp, err := good.ListContainers(ctx, &api.ListContainersRequest{})
	if err != nil || len(resp.Containers) != 0 {
		t.Fatalf("after refused calls: %v containers, err %v", len(resp.GetContainers()), err)
	}
	d.assertNoTrace(t, "sneaky")
}
