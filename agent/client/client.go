// Package client is the public Go client of the ferry agent API: ferryctl
// uses it, and so would a controller.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/ferry-agent/ferry/agent/api"
)

// DefaultSocket is ferryd's default local socket.
const DefaultSocket = "/run/ferry/ferryd.sock"

// Client talks to one ferryd.
type Client struct {
	api.FerryClient
	conn   *grpc.ClientConn
	target string
}

// ErrNotRunning means nothing listens at the socket.
var ErrNotRunning = errors.New("cannot reach ferryd")

// DialUnix connects to ferryd's local socket.
func DialUnix(socket string) (*Client, error) {
	if socket == "" {
		socket = DefaultSocket
	}
	if _, err := os.Stat(socket); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: socket %s does not exist (is ferryd running? --socket or FERRY_SOCKET picks another)", ErrNotRunning, socket)
		}
		return nil, fmt.Errorf("%w: socket %s: %w", ErrNotRunning, socket, err)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", socket, err)
	}
	return &Client{FerryClient: api.NewFerryClient(conn), conn: conn, target: socket}, nil
}

// Target is the socket or address the client talks to.
func (c *Client) Target() string { return c.target }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Explain adds the target to transport errors, so a caller sees which
// socket it tried when ferryd is not running.
func (c *Client) Explain(err error) error {
	if err == nil {
		return nil
	}
	// Only the client's own failure to reach ferryd is explained here; an
	// Unavailable that ferryd returns (a peer it could not reach) is its
	// answer and passes through.
	if st, ok := status.FromError(err); ok && st.Code() == codes.Unavailable && strings.Contains(st.Message(), "dial unix "+c.target) {
		return fmt.Errorf("%w at %s (is it running?): %s", ErrNotRunning, c.target, st.Message())
	}
	return err
}

// ExecResult is an exec'd process's end.
type ExecResult struct {
	ExitCode int
}

// Exec runs args in the container, copying its output to stdout and stderr.
func (c *Client) Exec(ctx context.Context, name string, args []string, stdout, stderr io.Writer) (*ExecResult, error) {
	s, err := c.FerryClient.Exec(ctx, &api.ExecRequest{Name: name, Args: args})
	if err != nil {
		return nil, c.Explain(err)
	}
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil, errors.New("exec stream ended without an exit code")
		}
		if err != nil {
			return nil, c.Explain(err)
		}
		switch k := m.Kind.(type) {
		case *api.ExecOutput_Stdout:
			if _, err := stdout.Write(k.Stdout); err != nil {
				return nil, err
			}
		case *api.ExecOutput_Stderr:
			if _, err := stderr.Write(k.Stderr); err != nil {
				return nil, err
			}
		case *api.ExecOutput_ExitCode:
			return &ExecResult{ExitCode: int(k.ExitCode)}, nil
		}
	}
}

// Logs copies a container's output to w; with follow until it ends or ctx is done.
func (c *Client) Logs(ctx context.Context, name string, follow bool, w io.Writer) error {
	s, err := c.FerryClient.Logs(ctx, &api.LogsRequest{Name: name, Follow: follow})
	if err != nil {
		return c.Explain(err)
	}
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return c.Explain(err)
		}
		if _, err := w.Write(m.Data); err != nil {
			return err
		}
	}
}

// DialTLS connects to a ferryd's --listen address with mutual TLS, using
// the ca.pem, node.pem and node-key.pem in tlsDir (a node's or a
// controller's folder made by `ferryctl certs`). The server must present a
// certificate from the same CA valid for the address's host.
func DialTLS(addr, tlsDir string) (*Client, error) {
	return DialTLSWith(addr, tlsDir)
}

// PeerWindow is the HTTP/2 flow-control window of connections between
// agents, per stream and per connection.
const PeerWindow = 16 << 20

// DialTLSWith is DialTLS with more gRPC options (a custom dialer, say).
func DialTLSWith(addr, tlsDir string, extra ...grpc.DialOption) (*Client, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(tlsDir, "node.pem"), filepath.Join(tlsDir, "node-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("tls-dir %s: %w", tlsDir, err)
	}
	caPEM, err := os.ReadFile(filepath.Join(tlsDir, "ca.pem"))
	if err != nil {
		return nil, fmt.Errorf("tls-dir %s: %w", tlsDir, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tls-dir %s: ca.pem holds no certificate", tlsDir)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("address %q: want HOST:PORT: %w", addr, err)
	}
	creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS13})
	// Keepalive pings find a dead peer or a cut wire within seconds, so a
	// migration that loses its peer rolls back instead of hanging.
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(creds),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 5 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
		grpc.WithInitialWindowSize(PeerWindow), grpc.WithInitialConnWindowSize(PeerWindow)}, extra...)
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", addr, err)
	}
	return &Client{FerryClient: api.NewFerryClient(conn), conn: conn, target: addr}, nil
}
