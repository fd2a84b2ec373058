// Command ferryctl is the operator CLI of the ferry node agent. It talks to
// the local ferryd through the agent's public client package.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/agent/client"
	"github.com/ferry-agent/ferry/cgroup"
	"github.com/ferry-agent/ferry/internal/pki"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// exitError carries an exit code out of a command (exec passes its process's through).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := rootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		if st, ok := status.FromError(err); ok {
			fmt.Fprintf(os.Stderr, "ferryctl: %s (%s)\n", st.Message(), st.Code())
		} else {
			fmt.Fprintln(os.Stderr, "ferryctl:", err)
		}
		os.Exit(1)
	}
}

var socket string

func dial() (*client.Client, error) { return client.DialUnix(socket) }

func rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "ferryctl",
		Short:         "Inspect and operate the ferry agent on this host",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	def := os.Getenv("FERRY_SOCKET")
	if def == "" {
		def = client.DefaultSocket
	}
	root.PersistentFlags().StringVar(&socket, "socket", def, "ferryd's local socket (env FERRY_SOCKET)")
	root.AddCommand(runCmd(), psCmd(), inspectCmd(), logsCmd(), execCmd(), stopCmd(), rmCmd(), versionCmd(), certsCmd(), eventsCmd(), nodeCmd(), migrateCmd(), migrationsCmd())
	return root
}

func runCmd() *cobra.Command {
	var (
		rootfs, bundle, cpuG, cpuL, memG, memL, hostname, ip string
		pids                                                 int64
		env, sysctls, capAdd, publish                        []string
	)
	cmd := &cobra.Command{
		Use:   "run NAME [flags] [-- CMD ARGS...]",
		Short: "Create and start a container",
		Long: `Create and start a container. The rootfs (default: the agent's built-in busybox rootfs)
is the read-only lower layer of an overlay; the container writes to its own upper layer.
Sizes take K/M/G/T (powers of 1024) or KB/MB/GB (powers of 1000); CPU is in cores
(0.5, 2) or millicores (250m). The limit defaults to the guarantee.`,
		Example: `  ferryctl run web -- sh -c 'while true; do date; sleep 1; done'
  ferryctl run db --rootfs /srv/rootfs/db --mem-guarantee 256M --mem-limit 1G --cpu-guarantee 0.5 --cpu-limit 2`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &api.RunContainerRequest{Name: args[0], Rootfs: rootfs, Bundle: bundle, Env: env,
				Hostname: hostname, Ip: ip, PidsMax: pids, Args: args[1:], CapAdd: capAdd, Publish: publish,
				Guarantee: &api.Resources{}, Ceiling: &api.Resources{}}
			var err error
			for _, f := range []struct {
				flag, val string
				dst       *float64
			}{{"cpu-guarantee", cpuG, &req.Guarantee.CpuCores}, {"cpu-limit", cpuL, &req.Ceiling.CpuCores}} {
				if f.val != "" {
					if *f.dst, err = cgroup.ParseCPU(f.val); err != nil {
						return fmt.Errorf("--%s: %w", f.flag, err)
					}
				}
			}
			for _, f := range []struct {
				flag, val string
				dst       *int64
			}{{"mem-guarantee", memG, &req.Guarantee.MemoryBytes}, {"mem-limit", memL, &req.Ceiling.MemoryBytes}} {
				if f.val != "" {
					if *f.dst, err = cgroup.ParseSize(f.val); err != nil {
						return fmt.Errorf("--%s: %w", f.flag, err)
					}
				}
			}
			if len(sysctls) > 0 {
				req.Sysctls = map[string]string{}
				for _, kv := range sysctls {
					k, v, ok := strings.Cut(kv, "=")
					if !ok {
						return fmt.Errorf("--sysctl %q: want KEY=VALUE", kv)
					}
					req.Sysctls[k] = v
				}
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			ctr, err := c.RunContainer(cmd.Context(), req)
			if err != nil {
				return c.Explain(err)
			}
			fmt.Println(ctr.Name)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&rootfs, "rootfs", "", "absolute path of the root filesystem (read-only lower layer)")
	f.StringVar(&bundle, "bundle", "", "absolute path of an OCI bundle (config.json and its rootfs)")
	f.StringVar(&cpuG, "cpu-guarantee", "", "CPU guarantee in cores")
	f.StringVar(&cpuL, "cpu-limit", "", "CPU ceiling in cores")
	f.StringVar(&memG, "mem-guarantee", "", "memory guarantee")
	f.StringVar(&memL, "mem-limit", "", "memory ceiling")
	f.Int64Var(&pids, "pids", 0, "maximum number of processes (0: no limit)")
	f.StringArrayVar(&env, "env", nil, "environment variable KEY=VALUE (repeatable)")
	f.StringVar(&hostname, "hostname", "", "host name (default: the container's name)")
	f.StringArrayVar(&sysctls, "sysctl", nil, "namespaced sysctl KEY=VALUE (repeatable)")
	f.StringVar(&ip, "ip", "", "pin the container's address")
	f.StringArrayVarP(&publish, "publish", "p", nil, "publish a port: [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp] (repeatable)")
	f.StringArrayVar(&capAdd, "cap-add", nil, "add a capability to the default set, e.g. NET_ADMIN (repeatable)")
	return cmd
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func psCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List containers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			resp, err := c.ListContainers(cmd.Context(), &api.ListContainersRequest{})
			if err != nil {
				return c.Explain(err)
			}
			switch output {
			case "json":
				items := make([]client.ContainerView, 0, len(resp.Containers))
				for _, ct := range resp.Containers {
					items = append(items, client.View(ct))
				}
				return printJSON(items)
			default:
				tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
				_, _ = fmt.Fprintln(tw, "NAME\tSTATE\tPID\tIP\tCPU G/EFF\tMEM G/EFF\tSTARTED\tCOMMAND")
				for _, ct := range resp.Containers {
					state := ct.State
					if ct.State == "exited" || ct.State == "stopped" {
						state = fmt.Sprintf("%s (%d)", ct.State, ct.ExitCode)
					}
					_, _ = fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", ct.Name, state, ct.Pid, dash(ct.Ip),
						cpuPair(ct.Guarantee, ct.EffectiveCeiling), memPair(ct.Guarantee, ct.EffectiveCeiling), since(ct.StartedAt), oneLine(strings.Join(ct.Args, " ")))
				}
				return tw.Flush()
			}
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func cpuPair(g, l *api.Resources) string {
	f := func(v float64) string {
		if v == 0 {
			return "-"
		}
		return fmt.Sprintf("%g", v)
	}
	return f(g.GetCpuCores()) + "/" + f(l.GetCpuCores())
}

func memPair(g, l *api.Resources) string {
	f := func(v int64) string {
		if v == 0 {
			return "-"
		}
		return cgroup.FormatSize(v)
	}
	return f(g.GetMemoryBytes()) + "/" + f(l.GetMemoryBytes())
}

func since(ts string) string {
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}

func inspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a container as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			ct, err := c.GetContainer(cmd.Context(), &api.GetContainerRequest{Name: args[0]})
			if err != nil {
				return c.Explain(err)
			}
			return printJSON(client.View(ct))
		},
	}
}

func logsCmd() *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print a container's stdout and stderr",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			err = c.Logs(cmd.Context(), args[0], follow, os.Stdout)
			if err != nil && cmd.Context().Err() != nil {
				return nil // interrupted while following
			}
			return err
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output until the container ends")
	return cmd
}

func execCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "exec NAME -- CMD [ARGS...]",
		Short:   "Run a command in a running container; its output and exit code are passed through",
		Example: "  ferryctl exec web -- cat /etc/hostname",
		Args:    cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			res, err := c.Exec(cmd.Context(), args[0], args[1:], os.Stdout, os.Stderr)
			if err != nil {
				return err
			}
			if res.ExitCode != 0 {
				return exitError{res.ExitCode}
			}
			return nil
		},
	}
}

func stopCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop NAME",
		Short: "Stop a container: SIGTERM, then SIGKILL after the timeout",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if timeout < 0 {
				return fmt.Errorf("--timeout %s: negative", timeout)
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			ct, err := c.StopContainer(cmd.Context(), &api.StopContainerRequest{Name: args[0], TimeoutMs: timeout.Milliseconds()})
			if err != nil {
				return c.Explain(err)
			}
			fmt.Printf("%s %s (exit code %d)\n", ct.Name, ct.State, ct.ExitCode)
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Second, "time between SIGTERM and SIGKILL")
	return cmd
}

func rmCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove containers (running ones only with -f)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			var errs []error
			for _, n := range args {
				if _, err := c.RemoveContainer(cmd.Context(), &api.RemoveContainerRequest{Name: n, Force: force}); err != nil {
					errs = append(errs, c.Explain(err))
					continue
				}
				fmt.Println(n)
			}
			return errors.Join(errs...)
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill a running container first")
	return cmd
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Show client and daemon versions, the CRIU version and the cgroup mode",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Printf("client:      %s\n", version)
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			v, err := c.Version(cmd.Context(), &api.VersionRequest{})
			if err != nil {
				return c.Explain(err)
			}
			rows := [][2]string{{"daemon", v.AgentVersion}, {"node", v.NodeName}, {"criu", v.CriuVersion},
				{"cgroup", v.CgroupMode}, {"kernel", v.Kernel}, {"go", v.GoVersion}}
			for _, r := range rows {
				fmt.Printf("%-12s %s\n", r[0]+":", r[1])
			}
			return nil
		},
	}
}

func certsCmd() *cobra.Command {
	var (
		nodes    []string
		validity time.Duration
	)
	cmd := &cobra.Command{
		Use:   "certs DIR --node NAME[=SAN,...]...",
		Short: "Create a cluster CA in DIR (if none) and a certificate folder DIR/NAME per node or controller",
		Long: `Create a cluster CA in DIR (ca.pem, ca-key.pem) unless one is there, and for each --node
a folder DIR/NAME with ca.pem, node.pem and node-key.pem: the folder that node's
ferryd --tls-dir takes, or a controller's client identity. Each certificate is valid
as TLS server and client for NAME, localhost, 127.0.0.1, ::1 and the extra names or
IP addresses after "=". Keep ca-key.pem safe: whoever holds it can join the cluster.`,
		Example: `  ferryctl certs /etc/ferry/pki --node host-a=10.0.0.1 --node host-b=10.0.0.2 --node controller`,
		Args:    cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			if len(nodes) == 0 {
				return errors.New("--node: at least one node or controller name is needed")
			}
			now := time.Now()
			ca, created, err := pki.LoadOrCreateCA(args[0], now)
			if err != nil {
				return err
			}
			if created {
				fmt.Printf("created cluster CA %s\n", filepath.Join(args[0], pki.CAFile))
			}
			for _, n := range nodes {
				name, sanList, _ := strings.Cut(n, "=")
				var sans []string
				if sanList != "" {
					sans = strings.Split(sanList, ",")
				}
				out, err := ca.IssueNode(args[0], name, sans, validity, now)
				if err != nil {
					return fmt.Errorf("--node %q: %w", n, err)
				}
				fmt.Println(out)
			}
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&nodes, "node", nil, "node or controller NAME, optionally =SAN,SAN (IP addresses or DNS names); repeatable")
	cmd.Flags().DurationVar(&validity, "validity", 2*365*24*time.Hour, "certificate validity")
	return cmd
}

func eventsCmd() *cobra.Command {
	var (
		follow bool
		types  []string
		output string
	)
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Stream the agent's events: recent ones first, then new ones as they happen",
		Example: `  ferryctl events                       # history, then follow
  ferryctl events --follow=false -o json  # history only, one JSON object per line
  ferryctl events --type node.hardened --type node.relaxed`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("-o %q: want text or json", output)
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			s, err := c.Events(cmd.Context(), &api.EventsRequest{Replay: true, NoFollow: !follow, Types: types})
			if err != nil {
				return c.Explain(err)
			}
			enc := json.NewEncoder(os.Stdout)
			enc.SetEscapeHTML(false)
			for {
				e, err := s.Recv()
				if errors.Is(err, io.EOF) || (err != nil && cmd.Context().Err() != nil) {
					return nil
				}
				if err != nil {
					return c.Explain(err)
				}
				if output == "json" {
					if err := enc.Encode(client.EventView(e)); err != nil {
						return err
					}
					continue
				}
				keys := make([]string, 0, len(e.Attributes))
				for k := range e.Attributes {
					keys = append(keys, k)
				}
				sort.Strings(keys)
				var attrs []string
				for _, k := range keys {
					attrs = append(attrs, k+"="+e.Attributes[k])
				}
				fmt.Printf("%s  %-22s %-16s %s  %s\n", e.Time, e.Type, dash(e.Container), e.Message, strings.Join(attrs, " "))
			}
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", true, "keep streaming new events")
	cmd.Flags().StringArrayVar(&types, "type", nil, "only events of this type (repeatable)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "text or json (one object per line)")
	return cmd
}

func nodeCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Show the node's resources: capacity, allocatable, guaranteed, used, pressure, state, scarcest",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			r, err := c.Node(cmd.Context(), &api.NodeRequest{})
			if err != nil {
				return c.Explain(err)
			}
			if output == "json" {
				return printJSON(client.NodeView(r))
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			_, _ = fmt.Fprintln(tw, "RESOURCE\tCAPACITY\tRESERVED\tALLOCATABLE\tGUARANTEED\tFREE\tUSED\tPRESSURE(avg10)\tSTATE")
			for _, rr := range []*api.ResourceReport{r.Cpu, r.Memory} {
				f := func(v float64) string {
					if rr.GetUnit() == "bytes" {
						return humanBytes(v)
					}
					return fmt.Sprintf("%.2f", v)
				}
				_, _ = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s (%.0f%%)\t%s\t%.1f%%\t%s\n", rr.GetResource(), f(rr.GetCapacity()),
					f(rr.GetReserved()), f(rr.GetAllocatable()), f(rr.GetGuaranteed()), f(rr.GetUnguaranteed()),
					100*rr.GetUnguaranteedShare(), f(rr.GetUsed()), rr.GetPressureAvg10(), rr.GetState())
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Printf("scarcest: %s    node: %s    cgroup driver: %s\n", r.Scarcest, r.NodeName, r.CgroupDriver)
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	return cmd
}

// humanBytes renders a byte count with two decimals in the largest binary unit.
func humanBytes(v float64) string {
	units := []string{"", "Ki", "Mi", "Gi", "Ti"}
	i := 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2f%s", v, units[i])
}

func migrateCmd() *cobra.Command {
	var (
		to, mode, id string
		maxDowntime  time.Duration
		rounds       int32
		bandwidth    string
	)
	cmd := &cobra.Command{
		Use:   "migrate NAME --to HOST:PORT",
		Short: "Move a running container to a peer ferryd, live; it keeps its address and connections",
		Long: `Move a running container to the peer ferryd listening (with mutual TLS) at HOST:PORT.
The peer admits it and prepares its network namespace with the same address and MAC;
then the container is frozen, dumped with CRIU, its images, upper layer and log are sent
inside the authenticated channel, and the peer restores it. Only the peer's confirmation
deletes the copy here; any failure before it thaws the container where it was.

Modes:
  stopcopy  freeze, dump everything, send, restore: the downtime grows with the memory.
  postcopy  freeze, dump all but the memory, restore on the peer at once; the peer
            fetches each page on fault (and the rest in the background) from this
            node's frozen copy, through a tunnel inside the same channel. This copy
            is deleted only once the peer has every page. Needs userfaultfd and, without
            CAP_SYS_RESOURCE, fs.pipe-max-size >= 4 MiB on both nodes.
  precopy   pre-dump rounds while the container runs, each sending the pages dirtied
            since the one before, until the predicted final downtime fits
            --max-downtime, the rounds stop shrinking, or --max-rounds; then a short
            freeze for the rest. Needs soft-dirty memory tracking on this kernel.
  auto      (default) precopy where this kernel tracks dirty memory; else stopcopy
            when its predicted downtime (from --bandwidth, the last migration to that
            node, or else a short probe of the channel) fits --max-downtime, else
            postcopy where both nodes can; it says which it ran and why.
The progress is printed per phase, then a summary. Interrupting ferryctl before the
freeze cancels the migration; afterwards the migration runs to its end on the agent.`,
		Example: "  ferryctl migrate web --to 10.0.0.2:7443",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return errors.New("--to: the peer's HOST:PORT is needed")
			}
			if maxDowntime < 0 {
				return fmt.Errorf("--max-downtime %s: negative", maxDowntime)
			}
			var bw int64
			if bandwidth != "" {
				var err error
				if bw, err = cgroup.ParseSize(bandwidth); err != nil {
					return fmt.Errorf("--bandwidth: %w", err)
				}
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			s, err := c.Migrate(cmd.Context(), &api.MigrateRequest{Name: args[0], Peer: to, Mode: mode,
				MaxDowntimeMs: maxDowntime.Milliseconds(), MaxRounds: rounds, BandwidthBytesPerSecond: bw, MigrationId: id})
			if err != nil {
				return c.Explain(err)
			}
			var last *api.Migration
			for {
				m, err := s.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					if last != nil {
						printMigrationSummary(last)
					}
					return c.Explain(err)
				}
				switch {
				case last != nil && m.Rounds != last.Rounds && len(m.PrecopyRounds) > 0:
					r := m.PrecopyRounds[len(m.PrecopyRounds)-1]
					fmt.Printf("[%7.3fs] %-9s round %d  %d pages (%s) in %d ms, %d left to the round before; dirty %s/s; predicted downtime %d ms: %s\n",
						float64(m.TotalMs)/1000, m.Phase, r.Round, r.PagesWritten, humanBytes(float64(r.Bytes)), r.Ms, r.PagesSkippedParent,
						humanBytes(r.DirtyPagesPerSecond*4096), r.PredictedDowntimeMs, r.Decision)
				case last == nil || m.Phase != last.Phase:
					fmt.Printf("[%7.3fs] %-9s round %d  %s sent\n", float64(m.TotalMs)/1000, m.Phase, m.Rounds, humanBytes(float64(m.BytesSent)))
				case m.BytesSent != last.BytesSent:
					// Progress within the transfer.
					rate := 0.0
					if m.TotalMs > last.TotalMs {
						rate = float64(m.BytesSent-last.BytesSent) / (float64(m.TotalMs-last.TotalMs) / 1000)
					}
					fmt.Printf("[%7.3fs] %-9s           %s sent  %s/s\n", float64(m.TotalMs)/1000, m.Phase, humanBytes(float64(m.BytesSent)), humanBytes(rate))
				}
				last = m
			}
			if last != nil {
				printMigrationSummary(last)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&to, "to", "", "the peer ferryd's --listen address, HOST:PORT")
	f.StringVar(&mode, "mode", "auto", "auto, stopcopy, precopy or postcopy")
	f.DurationVar(&maxDowntime, "max-downtime", 300*time.Millisecond, "downtime target")
	f.Int32Var(&rounds, "max-rounds", 0, "pre-copy round limit (0: default)")
	f.StringVar(&bandwidth, "bandwidth", "", "bandwidth cap per second, e.g. 100M")
	f.StringVar(&id, "id", "", "migration id (idempotency key; default: a new one)")
	return cmd
}

func printMigrationSummary(m *api.Migration) {
	fmt.Printf("migration %s: %s (%s) %s -> %s\n", m.Id, m.State, m.Phase, m.Container, dash(m.PeerNode))
	fmt.Printf("  mode:       %s (%s)\n", m.Mode, m.ModeReason)
	fmt.Printf("  rounds:     %d\n  bytes:      %s\n", m.Rounds, humanBytes(float64(m.BytesSent)))
	fmt.Printf("  total:      %d ms\n  downtime:   %d ms (frozen; CRIU's own frozen time %d ms)\n", m.TotalMs, m.FrozenMs, m.CriuFrozenMs)
	fmt.Printf("  dump:       %d ms\n  transfer:   %d ms\n  restore:    %d ms\n", m.DumpMs, m.TransferMs, m.RestoreMs)
	for _, r := range m.PrecopyRounds {
		fmt.Printf("  round %d:    %d pages written, %d left to the round before, frozen %d ms, %s in %d ms: %s (predicted downtime %d ms)\n",
			r.Round, r.PagesWritten, r.PagesSkippedParent, r.FrozenMs, humanBytes(float64(r.Bytes)), r.Ms, r.Decision, r.PredictedDowntimeMs)
	}
	if m.Mode == "precopy" {
		fmt.Printf("  final dump: %d pages written, %d left to the rounds before\n", m.FinalPagesWritten, m.FinalPagesSkippedParent)
	}
	if m.Mode == "postcopy" {
		fmt.Printf("  post-copy:  %d ms after the restore until the last page was in (%s of pages)\n", m.PostcopyMs, humanBytes(float64(m.PostcopyBytes)))
	}
	if m.Error != "" {
		fmt.Printf("  error:      %s\n", m.Error)
	}
}

func migrationsCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "migrations",
		Short: "List the migrations this node ran as the source, with their figures",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			r, err := c.ListMigrations(cmd.Context(), &api.ListMigrationsRequest{})
			if err != nil {
				return c.Explain(err)
			}
			if output == "json" {
				out := make([]client.MigrationJSON, 0, len(r.Migrations))
				for _, m := range r.Migrations {
					out = append(out, client.MigrationView(m))
				}
				return printJSON(out)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			_, _ = fmt.Fprintln(tw, "ID\tCONTAINER\tPEER\tMODE\tSTATE\tDOWNTIME\tTOTAL\tBYTES\tSTARTED")
			for _, m := range r.Migrations {
				_, _ = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%dms\t%dms\t%s\t%s\n", m.Id, m.Container, dash(m.PeerNode), m.Mode,
					m.State, m.FrozenMs, m.TotalMs, humanBytes(float64(m.BytesSent)), m.StartedAt)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	cmd.AddCommand(&cobra.Command{
		Use:   "cancel ID",
		Short: "Cancel a running migration before its freeze; the container keeps running here",
		Long: `Cancel a migration this node runs as the source. Before the container is frozen the
migration stops, the peer removes what it prepared and the container runs on here
untouched. Once frozen, a migration cannot be cancelled: it ends by itself, moved to
the peer or rolled back here (FailedPrecondition).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial()
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			m, err := c.CancelMigration(cmd.Context(), &api.CancelMigrationRequest{Id: args[0]})
			if err != nil {
				return c.Explain(err)
			}
			printMigrationSummary(m)
			return nil
		},
	})
	return cmd
}

// oneLine keeps a table cell on one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
