package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ferry-agent/ferry/agent/client"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// TLSServerOptions returns the gRPC options of the controller and peer
// listener: TLS 1.3 with the node's certificate, and every call refused with
// UNAUTHENTICATED unless the caller presented a certificate that chains to
// the cluster CA in dir/ca.pem and is valid now for client authentication.
//
// The client certificate is requested at the handshake but verified per call
// (in the interceptors) so that a caller without a valid one gets a clear
// UNAUTHENTICATED rather than a bare handshake failure; no handler runs
// before that check.
func TLSServerOptions(dir string) ([]grpc.ServerOption, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "node.pem"), filepath.Join(dir, "node-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("tls-dir %s: %w", dir, err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		return nil, fmt.Errorf("tls-dir %s: %w", dir, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tls-dir %s: ca.pem holds no certificate", dir)
	}
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequestClientCert,
		MinVersion:   tls.VersionTLS13,
	})
	check := func(ctx context.Context) error { return verifyPeer(ctx, pool) }
	return []grpc.ServerOption{
		grpc.Creds(creds),
		// Peers ping every 5 s (see client.DialTLS); a source that vanishes
		// mid-migration is noticed and its incoming container removed.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 4 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 5 * time.Second, Timeout: 5 * time.Second}),
		grpc.InitialWindowSize(client.PeerWindow), grpc.InitialConnWindowSize(client.PeerWindow),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := check(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := check(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}, nil
}

func verifyPeer(ctx context.Context, roots *x509.CertPool) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer information")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return status.Error(codes.Unauthenticated, "not a TLS connection")
	}
	certs := ti.State.PeerCertificates
	if len(certs) == 0 {
		return status.Error(codes.Unauthenticated, "no client certificate: controllers and peers must present one signed by the cluster CA")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return status.Errorf(codes.Unauthenticated, "client certificate %q rejected: %v", certs[0].Subject.CommonName, err)
	}
	return nil
}
