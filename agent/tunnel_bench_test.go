package agent

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/agent/client"
	"github.com/ferry-agent/ferry/internal/pki"
)

// sinkFerry is a peer whose PageTunnel takes what comes and, at the
// sender's EOF mark, answers with its own: the far end of a page server
// that only counts.
type sinkFerry struct {
	api.UnimplementedFerryServer
	got chan int64
}

func (s *sinkFerry) PageTunnel(stream api.Ferry_PageTunnelServer) error {
	var n int64
	for {
		ch, err := stream.Recv()
		if err != nil {
			return err
		}
		n += int64(len(ch.GetData()))
		if ch.GetEof() {
			s.got <- n
			return stream.Send(&api.TunnelChunk{Eof: true})
		}
	}
}

// BenchmarkPageTunnel measures the channel every page of a migration
// crosses: CRIU's connection on one side, pumped (pump) through a
// PageTunnel stream of the mutual-TLS gRPC connection between two agents,
// with the agents' own TLS and flow-control settings, to the peer's
// handler. Both ends run in this process, on this machine's cores, as the
// two ferryds of the migration benchmark do. Compare its MB/s with the
// migration benchmark's wire (plain TCP) and with what a migration moves:
//
//	go test -run '^$' -bench PageTunnel -benchtime 5x ./agent/
func BenchmarkPageTunnel(b *testing.B) {
	const size = 256 << 20
	dir := b.TempDir()
	now := time.Now()
	ca, _, err := pki.LoadOrCreateCA(dir, now)
	if err != nil {
		b.Fatal(err)
	}
	tlsDir, err := ca.IssueNode(dir, "bench", []string{"127.0.0.1"}, 0, now)
	if err != nil {
		b.Fatal(err)
	}
	opts, err := TLSServerOptions(tlsDir)
	if err != nil {
		b.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	sink := &sinkFerry{got: make(chan int64, 1)}
	api.RegisterFerryServer(srv, sink)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Stop()
	peer, err := client.DialTLS(ln.Addr().String(), tlsDir)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = peer.Close() }()

	buf := make([]byte, 1<<20)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// CRIU's side: a TCP connection on loopback, as in the private
		// namespace a migration gives CRIU.
		cl, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		criu, err := net.Dial("tcp", cl.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		conn, err := cl.Accept()
		_ = cl.Close()
		if err != nil {
			b.Fatal(err)
		}
		done, err := openTunnelStream(b.Context(), peer.FerryClient, "m-bench", conn, nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		go func() {
			for sent := 0; sent < size; sent += len(buf) {
				if _, err := criu.Write(buf); err != nil {
					return
				}
			}
			_ = criu.(*net.TCPConn).CloseWrite()
		}()
		if _, err := io.Copy(io.Discard, criu); err != nil { // the peer's EOF mark closes it
			b.Fatal(err)
		}
		if err := <-done; err != nil && !errors.Is(err, io.EOF) {
			b.Fatal(err)
		}
		if n := <-sink.got; n != size {
			b.Fatalf("the peer got %d bytes of %d", n, size)
		}
		_ = criu.Close()
	}
}
