// Command ferryd is the ferry node agent: it runs containers, keeps their
// state on disk and reattaches to them when it restarts.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/opencontainers/runc/libcontainer"
	_ "github.com/opencontainers/runc/libcontainer/nsenter" // the C constructor that joins namespaces in "ferryd init"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/ferry-agent/ferry/agent"
	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/netsetup"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func init() {
	// libcontainer re-executes this binary as "ferryd init" inside the new
	// container; that must happen before anything else runs.
	if len(os.Args) > 1 && os.Args[1] == "init" {
		libcontainer.Init()
	}
}

type options struct {
	config, root, runDir, socket, listen, tlsDir, nodeName, cgroupParent string
	defaultRootfs, criu, logLevel, logFormat, bpfRoot                    string
	capacityCPU, capacityMem, reserveCPU, reserveMem, pressure, metrics  string
	bridge, subnet, ipRange                                              string
	streamMin                                                            string
	logMax                                                               int64
	relaxMem, relaxCPU                                                   time.Duration
	sysctlAllow, remoteRootfs                                            []string
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "monitor" {
		os.Exit(agent.RunMonitor(os.Args[2:]))
	}
	if err := rootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ferryd:", err)
		os.Exit(1)
	}
}

func rootCmd() *cobra.Command {
	var o options
	host, _ := os.Hostname()
	cmd := &cobra.Command{
		Use:   "ferryd",
		Short: "ferry node agent: runs cgroup-isolated containers and keeps them across its own restarts",
		Long: `ferryd runs containers through runc's libcontainer, keeps their state under --root,
and serves the ferry API on a root-only unix socket (and, with --listen, on TCP with
mutual TLS for controllers and peers). Stopping ferryd leaves containers running; on
start it reloads every container and reattaches to the running ones.

Every flag can also be set in a JSON config file (--config) with the flag's name as
key, e.g. {"root": "/var/lib/ferry", "log-max": 10485760}. Flags given on the
command line win over the file.

"ferryd init" and "ferryd monitor" are internal entry points (the container's
init and its per-container monitor); they are not meant to be run by hand.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.config != "" {
				if err := applyConfigFile(cmd.Flags(), o.config); err != nil {
					return err
				}
			}
			return serve(o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.config, "config", "", "JSON config file with flag names as keys")
	f.StringVar(&o.root, "root", "/var/lib/ferry", "state directory")
	f.StringVar(&o.runDir, "run-dir", "/run/ferry", "runtime directory")
	f.StringVar(&o.socket, "socket", "/run/ferry/ferryd.sock", "local API socket (mode 0600, root only)")
	f.StringVar(&o.listen, "listen", "", "TCP address for controllers and peers, mutual TLS (off when empty)")
	f.StringVar(&o.tlsDir, "tls-dir", "/etc/ferry/tls", "directory with ca.pem, node.pem and node-key.pem for --listen")
	f.StringVar(&o.nodeName, "node-name", host, "this node's name")
	f.StringVar(&o.cgroupParent, "cgroup-parent", "/ferry", "absolute cgroup path under which containers are created")
	f.StringVar(&o.defaultRootfs, "default-rootfs", "/opt/ferry/rootfs/busybox", "rootfs used when a run names none")
	f.StringVar(&o.criu, "criu", "criu", "CRIU binary")
	f.Int64Var(&o.logMax, "log-max", 10<<20, "per-container log size cap in bytes (one rotated file is kept besides)")
	f.StringArrayVar(&o.sysctlAllow, "sysctl-allow", nil, "narrow the sysctls containers may write to these keys or prefixes (net.ipv4.*); repeatable; never widens beyond the namespaced ones")
	f.StringArrayVar(&o.remoteRootfs, "remote-rootfs", nil, "a directory under which controllers and peers may name a rootfs or bundle (repeatable; the default rootfs's directory is always allowed)")
	f.StringVar(&o.bpfRoot, "bpf-root", "/sys/fs/bpf/ferry", "where the sysctl guards' BPF programs are pinned (its parent is mounted as bpffs if needed)")
	f.StringVar(&o.bridge, "bridge", "ferry0", "host bridge the containers' veths join (empty: networking off, containers get lo only)")
	f.StringVar(&o.subnet, "subnet", "10.87.0.0/16", "the L2 segment's IPv4 subnet, shared by the hosts on it")
	f.StringVar(&o.ipRange, "ip-range", "", "this node's own slice of --subnet for new addresses (default: all of it); hosts on one segment need disjoint ranges")
	f.StringVar(&o.capacityCPU, "capacity-cpu", "", "node CPU capacity in cores (default: detected)")
	f.StringVar(&o.capacityMem, "capacity-memory", "", "node memory capacity, e.g. 16G (default: detected MemTotal)")
	f.StringVar(&o.reserveCPU, "reserve-cpu", "", "CPU held back for the system and ferryd (default: 5% of capacity, at least 0.1)")
	f.StringVar(&o.reserveMem, "reserve-memory", "", "memory held back for the system and ferryd (default: 5%, between 256Mi and 4Gi)")
	f.StringVar(&o.pressure, "pressure-source", "host", "PSI the harden/relax detector reads: host (/proc/pressure) or parent (the containers' parent cgroup only)")
	f.DurationVar(&o.relaxMem, "relax-after-memory", 30*time.Second, "memory pressure must stay low this long before ceilings are restored")
	f.DurationVar(&o.relaxCPU, "relax-after-cpu", 10*time.Second, "CPU pressure must stay low this long before ceilings are restored")
	f.StringVar(&o.streamMin, "stopcopy-stream-min", "256Mi", "memory in use from which a stop-and-copy streams the pages to the peer while CRIU dumps them (smaller: dumped to disk, sent after; 0: always stream)")
	f.StringVar(&o.metrics, "metrics-addr", "", "address for Prometheus metrics on /metrics, e.g. 127.0.0.1:9464 (off when empty)")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&o.logFormat, "log-format", "text", "text or json")
	return cmd
}

// applyConfigFile sets every flag named in the JSON file that was not given
// on the command line.
func applyConfigFile(fs *pflag.FlagSet, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	var kv map[string]any
	if err := json.Unmarshal(b, &kv); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	for k, v := range kv {
		fl := fs.Lookup(k)
		if fl == nil || k == "config" {
			return fmt.Errorf("config %s: unknown key %q", path, k)
		}
		if fl.Changed {
			continue
		}
		vals := []any{v}
		if list, ok := v.([]any); ok {
			if fl.Value.Type() != "stringArray" {
				return fmt.Errorf("config %s: key %q takes one value, not a list", path, k)
			}
			vals = list
		}
		for _, v := range vals {
			var s string
			switch x := v.(type) {
			case string:
				s = x
			case float64:
				s = strconv.FormatFloat(x, 'f', -1, 64)
			case bool:
				s = strconv.FormatBool(x)
			default:
				return fmt.Errorf("config %s: key %q: want a string, number, bool or a list of strings", path, k)
			}
			if err := fs.Set(k, s); err != nil {
				return fmt.Errorf("config %s: key %q value %q: %w", path, k, s, err)
			}
		}
	}
	return nil
}

func newLogger(level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log-level %q: %w", level, err)
	}
	ho := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, ho)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, ho)), nil
	}
	return nil, fmt.Errorf("log-format %q: want text or json", format)
}

func serve(o options) error {
	log, err := newLogger(o.logLevel, o.logFormat)
	if err != nil {
		return err
	}
	streamMin, err := cgroup.ParseSize(o.streamMin)
	if err != nil {
		return fmt.Errorf("--stopcopy-stream-min: %w", err)
	}
	for _, d := range []string{o.root, o.runDir, filepath.Dir(o.socket)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	lock, err := lockRoot(o.root)
	if err != nil {
		return err
	}
	defer func() { _ = lock.Close() }()

	if err := useCriu(o.criu, o.runDir); err != nil {
		return err
	}
	capacity, reserved, err := resourceFlags(o)
	if err != nil {
		return err
	}
	network, err := networkFlags(o)
	if err != nil {
		return err
	}
	a, err := agent.New(agent.Config{
		Capacity: capacity, Reserved: reserved, PressureSource: o.pressure, Detector: detector(o), Network: network,
		TLSDir: o.tlsDir, RemoteRootfs: o.remoteRootfs,
		Root: o.root, RunDir: o.runDir, NodeName: o.nodeName, CgroupParent: o.cgroupParent,
		DefaultRootfs: o.defaultRootfs, CriuPath: o.criu, LogMax: o.logMax, Version: version,
		SysctlAllow: o.sysctlAllow, BPFRoot: o.bpfRoot, StopCopyStreamMin: streamMin,
	}, log)
	if err != nil {
		return err
	}
	defer a.Close()
	if err := a.Load(context.Background()); err != nil {
		return err
	}

	srv := grpc.NewServer()
	api.RegisterFerryServer(srv, agent.NewServer(a, log))
	ul, err := listenUnix(o.socket)
	if err != nil {
		return err
	}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ul) }()

	if o.listen != "" {
		topts, err := agent.TLSServerOptions(o.tlsDir)
		if err != nil {
			srv.Stop()
			return err
		}
		tsrv := grpc.NewServer(topts...)
		api.RegisterFerryServer(tsrv, agent.NewPeerServer(a, log))
		tl, err := net.Listen("tcp", o.listen)
		if err != nil {
			srv.Stop()
			return fmt.Errorf("listen %s: %w", o.listen, err)
		}
		go func() { errc <- tsrv.Serve(tl) }()
		defer tsrv.Stop()
		log.Info("serving controllers and peers with mutual TLS", "addr", tl.Addr().String())
	}

	if o.metrics != "" {
		ml, err := net.Listen("tcp", o.metrics)
		if err != nil {
			srv.Stop()
			return fmt.Errorf("metrics-addr %s: %w", o.metrics, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", a.MetricsHandler())
		msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = msrv.Serve(ml) }()
		defer func() { _ = msrv.Close() }()
		log.Info("serving metrics", "addr", ml.Addr().String())
	}

	log.Info("ferryd serving", "version", version, "socket", o.socket, "root", o.root, "node", o.nodeName)
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.Warn("sd_notify", "err", err)
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sigs:
		log.Info("stopping; containers keep running", "signal", s.String())
		_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
	case err := <-errc:
		log.Error("server failed", "err", err)
		srv.Stop()
		return err
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop()
	}
	return nil
}

// networkFlags parses --bridge, --subnet and --ip-range.
func networkFlags(o options) (netsetup.Config, error) {
	if o.bridge == "" {
		return netsetup.Config{}, nil
	}
	cfg := netsetup.Config{Bridge: o.bridge}
	var err error
	if cfg.Subnet, err = netip.ParsePrefix(o.subnet); err != nil {
		return cfg, fmt.Errorf("--subnet %q: %w", o.subnet, err)
	}
	if o.ipRange != "" {
		if cfg.IPRange, err = netip.ParsePrefix(o.ipRange); err != nil {
			return cfg, fmt.Errorf("--ip-range %q: %w", o.ipRange, err)
		}
	}
	return cfg, nil
}

// detector is the default harden/relax configuration with the flags' relax windows.
func detector(o options) cgroup.DetectorConfig {
	d := cgroup.DefaultDetectorConfig()
	d.Memory.LeaveWindow, d.CPU.LeaveWindow = o.relaxMem, o.relaxCPU
	return d
}

// resourceFlags parses the capacity and reservation flags.
func resourceFlags(o options) (cgroup.Amount, *cgroup.Amount, error) {
	var capacity cgroup.Amount
	var err error
	if o.capacityCPU != "" {
		if capacity.CPU, err = cgroup.ParseCPU(o.capacityCPU); err != nil {
			return capacity, nil, fmt.Errorf("--capacity-cpu: %w", err)
		}
	}
	if o.capacityMem != "" {
		if capacity.Memory, err = cgroup.ParseSize(o.capacityMem); err != nil {
			return capacity, nil, fmt.Errorf("--capacity-memory: %w", err)
		}
	}
	if o.reserveCPU == "" && o.reserveMem == "" {
		return capacity, nil, nil
	}
	if o.reserveCPU == "" || o.reserveMem == "" {
		return capacity, nil, errors.New("--reserve-cpu and --reserve-memory: give both or neither")
	}
	var reserved cgroup.Amount
	if reserved.CPU, err = cgroup.ParseCPU(o.reserveCPU); err != nil {
		return capacity, nil, fmt.Errorf("--reserve-cpu: %w", err)
	}
	if reserved.Memory, err = cgroup.ParseSize(o.reserveMem); err != nil {
		return capacity, nil, fmt.Errorf("--reserve-memory: %w", err)
	}
	return capacity, &reserved, nil
}

// lockRoot makes sure one ferryd at a time uses root.
func lockRoot(root string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(root, "ferryd.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock root: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("root %s is in use by another ferryd: %w", root, err)
	}
	return f, nil
}

// listenUnix listens on a root-only socket, replacing a stale one.
func listenUnix(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		_ = c.Close()
		return nil, fmt.Errorf("socket %s: another ferryd is serving on it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("socket %s: remove stale: %w", path, err)
	}
	// One thread sets the umask, creates the socket and puts the umask
	// back (threads that ran CRIU in criuview have a filesystem context,
	// and so a umask, of their own).
	runtime.LockOSThread()
	old := unix.Umask(0o177)
	l, err := net.Listen("unix", path)
	unix.Umask(old)
	runtime.UnlockOSThread()
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return l, nil
}

// useCriu makes --criu the CRIU that everything runs: libcontainer (here
// and in the monitors) runs "criu" from PATH, so a link named criu in the
// run directory goes first on PATH.
func useCriu(criu, runDir string) error {
	if criu == "" || criu == "criu" {
		return nil
	}
	path, err := exec.LookPath(criu)
	if err != nil {
		return fmt.Errorf("--criu %q: %w", criu, err)
	}
	if path, err = filepath.Abs(path); err != nil {
		return fmt.Errorf("--criu %q: %w", criu, err)
	}
	dir := filepath.Join(runDir, "criu-bin")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	link := filepath.Join(dir, "criu")
	_ = os.Remove(link)
	if err := os.Symlink(path, link); err != nil {
		return fmt.Errorf("--criu %q: %w", criu, err)
	}
	return os.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
}
