package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	criurpc "github.com/checkpoint-restore/go-criu/v7/rpc"
	securejoin "github.com/cyphar/filepath-securejoin"
	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// ferryd asks CRIU for its dumps itself (criu swrk) rather than through
// libcontainer's Checkpoint, for two reasons. A dump streaming its pages
// takes a socket of ferryd's (criuDump). And libcontainer always asks for
// CRIU's debug log (level 4), and at that level CRIU writes a line for
// every run of pages it finds and lists its page pipes in full, ~5,000
// lines for a 1 GiB process at ~10 µs each here: ~35-40 ms of a post-copy
// dump, with the container frozen. CRIU takes the level from the call only
// (its configuration file cannot lower it). ferryd asks for warnings and
// errors (dumpLogLevel), which is what the error messages quote anyway.
//
// The request is the one libcontainer's Checkpoint (runc 1.4) builds for a
// ferry container, so that libcontainer's Restore takes the images as its
// own: the container's root, its init, the CRIU configuration file of its
// org.criu.config annotation, its network namespace as the external
// extRootNetNS, the freezer cgroup (ferryd froze it), the external mounts
// (bind mounts, cgroup v1 bind mounts, masked files, device nodes, each
// under its path in the container) and descriptors.json (what the init's
// stdio were). What a ferry container never has is left out: a terminal,
// a PID namespace of another's, shell jobs.
const dumpLogLevel = 2

// criuDump dumps lc (pre-dump when o.PreDump) with the options libcontainer
// would take from o; CRIU's log is dump.log or predump.log in
// o.WorkDirectory. With ps, the dump sends its pages to a page server over
// that socket (o.PageServer must be set too) instead of a TCP connection
// of its own; criuDump closes ps in any case.
//
// Why a socket of ferryd's: CRIU corks its page server connection and
// pushes only the commands it waits an answer for, so on TCP the last
// pages and the closing message waited out the cork's 200 ms, inside the
// freeze of a final dump; a Unix socket has no cork. CRIU's RPC takes a
// page server socket for restores only, and its configuration file
// (ps-socket) wants the descriptor's number in CRIU's process: so ferryd
// starts criu swrk itself (go-criu's starts it without extra files), the
// socket on fd 4, and names it in a configuration file of the dump's own.
func criuDump(lc *libcontainer.Container, o *libcontainer.CriuOpts, ps *os.File) error {
	if ps != nil {
		defer func() { _ = ps.Close() }()
	}
	req, closeDirs, err := dumpRequest(lc, o)
	if err != nil {
		return err
	}
	defer closeDirs()
	var extra []*os.File
	if ps != nil {
		if req.Ps == nil {
			return errors.New("dump: a page server socket without a page server")
		}
		conf, err := psConf(req.GetConfigFile(), o.WorkDirectory, swrkPSFd)
		if err != nil {
			return err
		}
		req.ConfigFile, extra = proto.String(conf), []*os.File{ps}
	}
	typ := criurpc.CriuReqType_DUMP
	if o.PreDump {
		typ = criurpc.CriuReqType_PRE_DUMP
	}
	return swrk(typ, req, extra, ps)
}

// swrkPSFd is the page server socket's descriptor in criu swrk.
const swrkPSFd = 4

// psConf writes dir/ps.conf: the configuration file conf's options (if it
// exists), and ps-socket fd.
func psConf(conf, dir string, fd int) (string, error) {
	b, err := os.ReadFile(conf)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("dump: CRIU configuration %s: %w", conf, err)
	}
	if len(b) > 0 && b[len(b)-1] != '\n' {
		b = append(b, '\n')
	}
	b = fmt.Appendf(b, "ps-socket %d\n", fd)
	p := filepath.Join(dir, "ps.conf")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		return "", err
	}
	return p, nil
}

// swrk runs one request in a criu swrk of its own ("criu" from PATH, as
// libcontainer runs it) with extra on fds 4 and up (closed here once CRIU
// has them, as is closeAfterStart), and waits for it to end. After a
// pre-dump CRIU waits for the next request and ends with an error when the
// connection closes instead (libcontainer ignores that exit too): the
// answer is what counts.
func swrk(typ criurpc.CriuReqType, opts *criurpc.CriuOpts, extra []*os.File, closeAfterStart *os.File) error {
	fds, err := unix.Socketpair(unix.AF_LOCAL, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	cln, srv := os.NewFile(uintptr(fds[0]), "criu-client"), os.NewFile(uintptr(fds[1]), "criu-server")
	defer func() { _ = cln.Close() }()
	cmd := exec.Command("criu", "swrk", "3")
	cmd.ExtraFiles = append([]*os.File{srv}, extra...)
	err = cmd.Start()
	_ = srv.Close()
	if closeAfterStart != nil {
		_ = closeAfterStart.Close()
	}
	if err != nil {
		return fmt.Errorf("criu swrk: %w", err)
	}
	resp, rerr := swrkRoundTrip(cln, &criurpc.CriuReq{Type: &typ, Opts: opts})
	_ = cln.Close()
	werr := cmd.Wait()
	if rerr != nil {
		return errors.Join(rerr, werr)
	}
	if !resp.GetSuccess() {
		msg := resp.GetCrErrmsg()
		if msg == "" {
			msg = fmt.Sprintf("errno %d", resp.GetCrErrno())
		}
		return fmt.Errorf("criu failed: type %s: %s", typ, msg)
	}
	if resp.GetType() != typ {
		return fmt.Errorf("criu answered %s to %s", resp.GetType(), typ)
	}
	if typ == criurpc.CriuReqType_PRE_DUMP {
		return nil
	}
	if werr != nil {
		return fmt.Errorf("criu swrk: %w", werr)
	}
	return nil
}

// swrkRoundTrip sends req and reads CRIU's answer (one message each).
func swrkRoundTrip(c *os.File, req *criurpc.CriuReq) (*criurpc.CriuResp, error) {
	b, err := proto.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write(b); err != nil {
		return nil, fmt.Errorf("criu swrk: send the request: %w", err)
	}
	buf := make([]byte, 2<<20)
	n, err := c.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("criu swrk: no answer: %w", err)
	}
	resp := &criurpc.CriuResp{}
	if err := proto.Unmarshal(buf[:n], resp); err != nil {
		return nil, fmt.Errorf("criu swrk: the answer: %w", err)
	}
	return resp, nil
}

// dumpRequest builds the request; the func it returns closes the directories
// it opened for CRIU (on an error it closes them itself).
func dumpRequest(lc *libcontainer.Container, o *libcontainer.CriuOpts) (_ *criurpc.CriuOpts, _ func(), retErr error) {
	if o.ImagesDirectory == "" || o.WorkDirectory == "" {
		return nil, nil, errors.New("dump: images and work directories are required")
	}
	if o.ManageCgroupsMode != criuCgroups {
		return nil, nil, fmt.Errorf("dump: cgroup mode %q: ferryd dumps with %q only", o.ManageCgroupsMode, criuCgroups)
	}
	cfg := lc.Config()
	st, err := lc.State()
	if err != nil {
		return nil, nil, err
	}
	if st.InitProcessPid <= 0 {
		return nil, nil, errors.New("dump: the container has no init")
	}
	var files []*os.File
	closeDirs := func() {
		for _, f := range files {
			_ = f.Close()
		}
	}
	defer func() {
		if retErr != nil {
			closeDirs()
		}
	}()
	openDir := func(dir string) (int32, error) {
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return 0, err
		}
		f, err := os.Open(dir)
		if err != nil {
			return 0, err
		}
		files = append(files, f)
		return int32(f.Fd()), nil
	}
	imagesFd, err := openDir(o.ImagesDirectory)
	if err != nil {
		return nil, nil, err
	}
	workFd, err := openDir(o.WorkDirectory)
	if err != nil {
		return nil, nil, err
	}
	cgMode := criurpc.CriuCgMode_IGNORE
	logFile := "dump.log"
	if o.PreDump {
		logFile = "predump.log"
	}
	req := &criurpc.CriuOpts{
		ImagesDirFd:       proto.Int32(imagesFd),
		WorkDirFd:         proto.Int32(workFd),
		LogLevel:          proto.Int32(dumpLogLevel),
		LogFile:           proto.String(logFile),
		Root:              proto.String(cfg.Rootfs),
		ManageCgroups:     proto.Bool(true),
		ManageCgroupsMode: &cgMode,
		Pid:               proto.Int32(int32(st.InitProcessPid)),
		LeaveRunning:      proto.Bool(o.LeaveRunning),
		TcpEstablished:    proto.Bool(o.TcpEstablished),
		FileLocks:         proto.Bool(o.FileLocks),
		LazyPages:         proto.Bool(o.LazyPages),
	}
	switch f, ok := criuConfLabel(cfg.Labels); {
	case !ok:
		req.ConfigFile = proto.String("/etc/criu/runc.conf") // libcontainer's default
	case f != "":
		req.ConfigFile = proto.String(f)
	}
	if p := cfg.Namespaces.PathOf(configs.NEWNET); p != "" {
		var ns unix.Stat_t
		if err := unix.Stat(p, &ns); err != nil {
			return nil, nil, fmt.Errorf("dump: network namespace: %w", err)
		}
		req.External = append(req.External, fmt.Sprintf("net[%d]:extRootNetNS", ns.Ino))
	}
	if p := cfg.Namespaces.PathOf(configs.NEWPID); p != "" {
		return nil, nil, errors.New("dump: a PID namespace of another's is not supported")
	}
	if p := freezerPath(st.CgroupPaths); p != "" {
		req.FreezeCgroup = proto.String(p)
	}
	if o.PageServer.Address != "" && o.PageServer.Port != 0 {
		req.Ps = &criurpc.CriuPageServerInfo{Address: proto.String(o.PageServer.Address), Port: proto.Int32(o.PageServer.Port)}
	}
	if o.ParentImage != "" {
		req.ParentImg, req.TrackMem = proto.String(o.ParentImage), proto.Bool(true)
	}
	if o.PreDump {
		return req, closeDirs, nil
	}
	ext := func(key, val string) {
		req.ExtMnt = append(req.ExtMnt, &criurpc.ExtMountMap{Key: proto.String(key), Val: proto.String(val)})
	}
	hasCgroupns := cfg.Namespaces.Contains(configs.NEWCGROUP)
	for _, m := range cfg.Mounts {
		switch m.Device {
		case "bind":
			d := mountDest(cfg.Rootfs, m.Destination)
			ext(d, d)
		case "cgroup":
			if cgroups.IsCgroup2UnifiedMode() || hasCgroupns {
				continue
			}
			// cgroup v1: libcontainer binds each hierarchy's cgroup of
			// the container under the mount.
			mounts, err := cgroups.GetCgroupMounts(false)
			if err != nil {
				return nil, nil, err
			}
			for _, mm := range mounts {
				d := mountDest(cfg.Rootfs, filepath.Join(m.Destination, filepath.Base(mm.Mountpoint)))
				ext(d, d)
			}
		}
	}
	for _, p := range cfg.MaskPaths {
		fi, err := os.Stat(fmt.Sprintf("/proc/%d/root/%s", st.InitProcessPid, p))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, nil, err
		}
		if !fi.IsDir() {
			ext(p, "/dev/null")
		}
	}
	for _, d := range cfg.Devices {
		ext(d.Path, d.Path)
	}
	fds, err := json.Marshal(st.ExternalDescriptors)
	if err == nil {
		err = os.WriteFile(filepath.Join(o.ImagesDirectory, "descriptors.json"), fds, 0o600)
	}
	if err != nil {
		return nil, nil, err
	}
	return req, closeDirs, nil
}

// mountDest is a mount's path in the container, as CRIU names it (with
// symlinks in the rootfs resolved, as libcontainer does).
func mountDest(rootfs, dest string) string {
	d := strings.TrimPrefix(dest, rootfs)
	if p, err := securejoin.SecureJoin(rootfs, d); err == nil {
		d = p[len(rootfs):]
	}
	return d
}

// freezerPath is the cgroup CRIU finds the container's tasks frozen in:
// the v1 freezer hierarchy's, or the unified one's.
func freezerPath(paths map[string]string) string {
	if p := paths["freezer"]; p != "" {
		return p
	}
	return paths[""]
}

// criuConfLabel is the CRIU configuration file the container's
// org.criu.config annotation names.
func criuConfLabel(labels []string) (string, bool) {
	for _, l := range labels {
		if v, ok := strings.CutPrefix(l, criuConfAnnotation+"="); ok {
			return v, true
		}
	}
	return "", false
}
