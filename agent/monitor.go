package agent

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	_ "github.com/opencontainers/cgroups/devices" // libcontainer sets device rules only with this driver linked in
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ferry-agent/ferry/internal/atomicfile"
	"github.com/ferry-agent/ferry/internal/criuview"
	"github.com/ferry-agent/ferry/internal/proc"
)

// Files in a container's state directory.
const (
	specFile     = "spec.json"         // ferryd: the validated request and operator intent
	lcConfigFile = "libcontainer.json" // ferryd: the libcontainer config the monitor creates from
	initFile     = "init.json"         // monitor: the init process, once it runs
	exitFile     = "exit.json"         // monitor: how the init process ended
	logFile      = "container.log"     // monitor: the container's stdout and stderr
	monitorLog   = "monitor.log"       // the monitor's own diagnostics
)

// initInfo is what the monitor records once the container's init runs.
type initInfo struct {
	Pid          int       `json:"pid"`
	PidStart     uint64    `json:"pid_start"`
	MonitorPid   int       `json:"monitor_pid"`
	MonitorStart uint64    `json:"monitor_start"`
	StartedAt    time.Time `json:"started_at"`
}

// exitInfo is what the monitor records when the init process has ended.
type exitInfo struct {
	ExitCode   int       `json:"exit_code"`
	Signal     string    `json:"signal,omitempty"`
	FinishedAt time.Time `json:"finished_at"`
}

// monitorReply is a message from the monitor to ferryd on the ready pipe:
// one (Init or Error), and in a post-copy restore a second one (Lazy).
type monitorReply struct {
	Lazy  *lazyOutcome `json:"lazy,omitempty"`
	Init  *initInfo    `json:"init,omitempty"`
	Error string       `json:"error,omitempty"`
}

// monitorCommand builds the command that starts a monitor for the container
// in dir. The ready pipe's write end becomes the monitor's fd 3.
// lazyOutcome is how a post-copy restore's page transfer ended.
type lazyOutcome struct {
	Error string `json:"error,omitempty"` // "": every page came in
}

// restoreSource says where a monitor restores its container from; the zero
// value starts it instead.
type restoreSource struct {
	images string
	// Post-copy: the monitor runs criu lazy-pages in the migration's
	// private network namespace (netns, passed as fd 4) and, should the
	// daemon fail, kills the container at once: a task whose missing pages
	// can no longer come would read zeros instead.
	lazy  bool
	criu  string
	netns *os.File
	pages *os.File // the daemon's page server socket (fd 5)
	// Staged (the monitor's side): commands from ferryd, see
	// monitorProc.command. The monitor creates the container and gets
	// ready, then waits here; the freeze on the source comes meanwhile.
	ctrl *os.File
	// CRIU's /run (criuview), where the host's is not a tmpfs.
	view *criuview.View
}

func monitorCommand(self, dir, lcRoot string, logMax int64, restore restoreSource, ready, ctrl *os.File) (*exec.Cmd, error) {
	out, err := os.OpenFile(filepath.Join(dir, monitorLog), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("monitor log: %w", err)
	}
	args := []string{"monitor", "--dir", dir, "--lc-root", lcRoot, "--log-max", strconv.FormatInt(logMax, 10)}
	if restore.images != "" {
		args = append(args, "--restore", restore.images)
		if restore.lazy {
			args = append(args, "--lazy-pages", "--criu", restore.criu)
		}
		if t := restore.view.Tmpfs(); t != "" {
			args = append(args, "--criu-run", t)
			for _, k := range restore.view.Keep() {
				args = append(args, "--criu-run-keep", k)
			}
		}
	}
	extra := []*os.File{ready} // fd 3
	if restore.lazy {
		extra = append(extra, restore.netns, restore.pages) // fds 4 and 5
	}
	if ctrl != nil {
		args = append(args, "--staged", strconv.Itoa(3+len(extra)))
		extra = append(extra, ctrl)
	}
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.ExtraFiles = extra
	// Its own session: signals to ferryd's process group never reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Env = append(os.Environ(), "GOGC=50")
	return cmd, nil
}

// RunMonitor is the "ferryd monitor" entry point. It creates and starts the
// container described in --dir, tells ferryd on fd 3, then waits for the
// init process, logging its output, and records its exit. Returns the exit
// status for the monitor process.
func RunMonitor(args []string) int {
	fs := flag.NewFlagSet("monitor", flag.ContinueOnError)
	dir := fs.String("dir", "", "container state directory")
	lcRoot := fs.String("lc-root", "", "libcontainer state root")
	logMax := fs.Int64("log-max", 10<<20, "log size cap in bytes")
	restore := fs.String("restore", "", "restore the container from these CRIU images instead of starting it")
	lazy := fs.Bool("lazy-pages", false, "post-copy: run criu lazy-pages (work dir IMAGES-lazy) in the network namespace on fd 4, its page server socket on fd 5, and restore the memory from it")
	criu := fs.String("criu", "criu", "the criu binary, for --lazy-pages")
	criuRun := fs.String("criu-run", "", "with --restore: a tmpfs CRIU is to see as /run (its kernel probe cache; criuview)")
	var criuKeep []string
	fs.Func("criu-run-keep", "with --criu-run: a directory under /run to keep in CRIU's view (repeatable)", func(s string) error {
		criuKeep = append(criuKeep, s)
		return nil
	})
	staged := fs.Int("staged", 0, "with --restore: get ready, then restore when fd N says so ('i': the images are in; 'r': restore; EOF: give up)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("container", filepath.Base(*dir))
	logrus.SetOutput(os.Stderr)
	ready := os.NewFile(3, "ready")
	var mu sync.Mutex
	reply := func(r monitorReply, last bool) {
		mu.Lock()
		defer mu.Unlock()
		if ready == nil {
			return
		}
		// ferryd may be gone: a write error is all that comes of it.
		if err := json.NewEncoder(ready).Encode(r); err != nil {
			log.Warn("reply to ferryd", "err", err)
		}
		if last {
			_ = ready.Close()
			ready = nil
		}
	}
	rs := restoreSource{images: *restore, lazy: *lazy, criu: *criu, view: criuview.FromArgs(*criuRun, criuKeep)}
	if *lazy {
		rs.netns = os.NewFile(4, "netns")
		// Not for CRIU's restore: the daemon alone gets this one.
		syscall.CloseOnExec(5)
		rs.pages = os.NewFile(5, "lazy-pages socket")
	}
	if *staged > 0 && *restore != "" {
		rs.ctrl = os.NewFile(uintptr(*staged), "ctrl")
	}
	code, err := monitor(*dir, *lcRoot, *logMax, rs, log,
		func(ii *initInfo) { reply(monitorReply{Init: ii}, !*lazy) },
		func(err error) {
			o := &lazyOutcome{}
			if err != nil {
				o.Error = err.Error()
			}
			reply(monitorReply{Lazy: o}, true)
		})
	if err != nil {
		log.Error("monitor failed", "err", err)
		reply(monitorReply{Error: err.Error()}, true)
		return 1
	}
	reply(monitorReply{Lazy: &lazyOutcome{Error: "the container ended before every page came in"}}, true)
	return code
}

func monitor(dir, lcRoot string, logMax int64, restore restoreSource, log *slog.Logger, started func(*initInfo), lazyEnded func(error)) (int, error) {
	// The restored or started init is our child; orphans below it come to us.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("set child subreaper: %w", err)
	}
	var rec record
	if err := atomicfile.ReadJSON(filepath.Join(dir, specFile), &rec); err != nil {
		return 0, fmt.Errorf("read spec: %w", err)
	}
	spec := rec.Spec
	var cfg configs.Config
	if err := atomicfile.ReadJSON(filepath.Join(dir, lcConfigFile), &cfg); err != nil {
		return 0, fmt.Errorf("read libcontainer config: %w", err)
	}
	if restore.images != "" && cfg.Cgroups != nil && cfg.Cgroups.Resources != nil {
		// No memory limit of the container's own while CRIU restores it
		// (the node's parent cgroup still bounds it): libcontainer puts
		// CRIU into the container's cgroup, where the page cache of the
		// images it reads is charged too, and processes that share memory
		// copy-on-write are in the images once each. At the ceiling (or
		// at the guarantee, on a node short of memory) such restores were
		// OOM-killed now and then. ferryd writes the limits as soon as
		// the restore returns (elastic Add).
		cfg.Cgroups.Memory = 0
	}
	logOut, err := openCappedLog(filepath.Join(dir, logFile), logMax)
	if err != nil {
		return 0, err
	}
	defer func() { _ = logOut.Close() }()
	r, w, err := os.Pipe()
	if err != nil {
		return 0, fmt.Errorf("output pipe: %w", err)
	}
	copied := make(chan error, 1)
	go func() { copied <- copyToLog(logOut, r) }()

	c, err := libcontainer.Create(lcRoot, spec.Name, &cfg)
	if err != nil {
		_ = w.Close()
		return 0, fmt.Errorf("create container %q: %w", spec.Name, err)
	}
	p := &libcontainer.Process{
		Args: spec.Args, Env: spec.processEnv(), Cwd: spec.Cwd,
		Stdout: w, Stderr: w, Init: true,
	}
	restoreWork := restore.images + "-work"
	var daemon *lazyDaemon
	var relay *lazyRelay
	startDaemon := func() error {
		if !restore.lazy || daemon != nil {
			return nil
		}
		var err error
		if daemon, err = startLazyDaemon(restore, restore.images+"-lazy"); err != nil {
			return err
		}
		relay, err = listenLazyRelay(restoreWork, daemon.work, daemon.ready, daemon.done)
		return err
	}
	// Whatever way the monitor leaves, the daemon goes too.
	defer func() {
		if relay != nil {
			relay.close()
		}
		if daemon != nil {
			daemon.stop()
		}
	}()
	if restore.ctrl != nil {
		warmCriuVersion(c)
		if err := awaitRestore(restore.ctrl, startDaemon); err != nil {
			_ = w.Close()
			return 0, errors.Join(err, c.Destroy())
		}
	}
	if err := startDaemon(); err != nil {
		_ = w.Close()
		return 0, errors.Join(err, c.Destroy())
	}
	if restore.images != "" {
		// The restored tasks' stdout and stderr are re-attached to our pipe
		// (libcontainer maps the dumped pipes to the process's stdio).
		// On a thread of its own in CRIU's /run (criuview): libcontainer
		// starts CRIU from the calling thread.
		err = restore.view.Do(func() error {
			return c.Restore(p, &libcontainer.CriuOpts{
				ImagesDirectory: restore.images, WorkDirectory: restoreWork,
				TcpEstablished: true, FileLocks: true, LazyPages: restore.lazy, StatusFd: -1, ManageCgroupsMode: criuCgroups,
			})
		})
		if err != nil && relay != nil {
			select {
			case rerr := <-relay.done:
				err = errors.Join(err, rerr)
			default:
			}
		}
		if err != nil {
			_ = w.Close()
			derr := c.Destroy()
			return 0, errors.Join(fmt.Errorf("restore container %q: %w", spec.Name, err), derr)
		}
	} else if err := c.Run(p); err != nil {
		_ = w.Close()
		derr := c.Destroy()
		return 0, errors.Join(fmt.Errorf("start container %q: %w", spec.Name, err), derr)
	}
	_ = w.Close() // the init holds its own copy
	pid, err := p.Pid()
	if err != nil {
		return 0, errors.Join(fmt.Errorf("init pid: %w", err), c.Signal(unix.SIGKILL))
	}
	ii := &initInfo{Pid: pid, MonitorPid: os.Getpid(), StartedAt: time.Now().UTC()}
	if ii.PidStart, err = proc.StartTime(pid); err == nil {
		ii.MonitorStart, err = proc.StartTime(os.Getpid())
	}
	if err == nil {
		err = atomicfile.WriteJSON(filepath.Join(dir, initFile), ii, 0o600)
	}
	if err != nil {
		_ = c.Signal(unix.SIGKILL)
		_, _ = p.Wait()
		return 0, errors.Join(fmt.Errorf("record init: %w", err), c.Destroy())
	}
	log.Info("container running", "pid", pid)
	started(ii)
	if daemon != nil {
		go func() {
			if err := <-relay.done; err != nil {
				// The daemon has not all the tasks' userfaultfds: their
				// missing pages would never come.
				log.Error("post-copy: the restore's lazy-pages socket", "err", err)
				daemon.stop()
			}
		}()
		go func() {
			err := daemon.wait()
			if err != nil {
				log.Error("post-copy page transfer failed; killing the container", "err", err)
				_ = c.Signal(unix.SIGKILL)
			} else {
				log.Info("post-copy: every page is in")
			}
			lazyEnded(err)
		}()
	}

	ps, werr := p.Wait()
	ei := exitInfo{FinishedAt: time.Now().UTC(), ExitCode: -1}
	if ps != nil {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok {
			switch {
			case ws.Exited():
				ei.ExitCode = ws.ExitStatus()
			case ws.Signaled():
				ei.ExitCode = 128 + int(ws.Signal())
				ei.Signal = unix.SignalName(ws.Signal())
			}
		}
	} else {
		log.Warn("wait for init", "err", werr)
	}
	// Output from processes that outlived init ends when the pipe closes.
	select {
	case err := <-copied:
		if err != nil {
			log.Warn("copy output to log", "err", err)
		}
	case <-time.After(2 * time.Second):
		_ = r.Close()
	}
	if err := c.Destroy(); err != nil {
		log.Warn("destroy container", "err", err)
	}
	if err := atomicfile.WriteJSON(filepath.Join(dir, exitFile), ei, 0o600); err != nil {
		return 0, fmt.Errorf("record exit: %w", err)
	}
	log.Info("container exited", "exit_code", ei.ExitCode, "signal", ei.Signal)
	return 0, nil
}

var _ io.Writer = (*cappedLog)(nil)

// awaitRestore reads a staged monitor's commands until the one to restore;
// imagesIn runs on monitorImagesIn. The pipe's end (ferryd gave up, or
// died) is an error.
func awaitRestore(ctrl *os.File, imagesIn func() error) error {
	defer func() { _ = ctrl.Close() }()
	b := make([]byte, 1)
	for {
		if _, err := io.ReadFull(ctrl, b); err != nil {
			return fmt.Errorf("staged restore: ferryd gave up (%w)", err)
		}
		switch b[0] {
		case monitorImagesIn:
			if err := imagesIn(); err != nil {
				return err
			}
		case monitorRestore:
			return nil
		default:
			return fmt.Errorf("staged restore: unknown command %q", b[0])
		}
	}
}
