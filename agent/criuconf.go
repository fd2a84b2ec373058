package agent

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/ferry-agent/ferry/internal/atomicfile"
)

// CRIU options that libcontainer's CriuOpts do not carry go into a CRIU
// configuration file of the container's own. libcontainer passes the file
// named by the container's org.criu.config annotation to every CRIU call it
// makes for the container (runc's documented way to set such options; the
// default would be /etc/criu/runc.conf), and CRIU applies it over the
// options of the call. ferryd rewrites the file before each call:
//
//   - network-lock skip: CRIU's own lock runs iptables-restore several times
//     in the container's namespace on every dump (~50 ms with the container
//     frozen, here). ferryd cuts the container's link itself (netsetup's
//     Deactivate) right after the freeze, before the dump, and keeps it cut
//     until the migration ends either way, which is the external lock CRIU's
//     documentation asks for; a container without ferry's networking has a
//     namespace with only lo, which nothing outside can reach. (On restore,
//     CRIU takes the lock method from the dump's images, and it locks only a
//     network namespace it restores itself; ferry's namespace is external.)
//   - lazy-pages, address and port, for a post-copy dump: with
//     CriuOpts.LazyPages libcontainer first runs a CRIU feature check, one
//     more CRIU process probing the kernel inside the freeze; ferryd checked
//     the feature at its start (MigrationFeatures) already. The page
//     server's address and port go into the file too: given in the call
//     (CriuOpts.PageServer) they would make CRIU, which reads the file
//     after the call's options, push pages to a server instead. (CRIU then
//     also listens on that address only, not on every one.) ferryd's own
//     dump request (criudump.go) would not run that check either; the file
//     stays where these options are said, for every way CRIU is called.
//
// A container created before ferry wrote this file has no annotation: its
// calls go the way libcontainer's options alone give (usesCriuConf), and
// CRIU locks the network itself. The file is written before the freeze:
// nothing of it costs time while the container is frozen.
const (
	criuConfAnnotation = "org.criu.config"
	criuConfFile       = "criu.conf"
)

// withCriuConf names dir's CRIU configuration file in the spec.
func withCriuConf(o *specs.Spec, dir string) {
	if o.Annotations == nil {
		o.Annotations = map[string]string{}
	}
	o.Annotations[criuConfAnnotation] = filepath.Join(dir, criuConfFile)
}

// criuCall is what the CRIU configuration file says for one call.
type criuCall struct {
	lazyPages bool // a post-copy dump, serving pages on lazyAddr
}

// writeCriuConf writes dir's CRIU configuration file for the next call.
func writeCriuConf(dir string, call criuCall) error {
	var b strings.Builder
	b.WriteString("# Written by ferryd before each CRIU call for this container; see agent/criuconf.go.\n")
	b.WriteString("network-lock skip\n")
	if call.lazyPages {
		fmt.Fprintf(&b, "lazy-pages\naddress %s\nport %d\n", lazyHost, lazyPort)
	}
	if err := atomicfile.Write(filepath.Join(dir, criuConfFile), []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("CRIU configuration: %w", err)
	}
	return nil
}

// usesCriuConf tells whether lc's CRIU calls read the configuration file in
// dir (the container was created with the annotation).
func usesCriuConf(lc *libcontainer.Container, dir string) bool {
	f, ok := criuConfLabel(lc.Config().Labels)
	return ok && f == filepath.Join(dir, criuConfFile)
}

// warmCriuVersion has libcontainer ask CRIU for its version now, before a
// freeze or a restore: it asks once per container object, at the object's
// first CRIU call, with a CRIU process of its own. A checkpoint without an
// image directory asks and then fails at once, before it does anything
// (whatever the container's state).
func warmCriuVersion(lc *libcontainer.Container) {
	_ = lc.Checkpoint(&libcontainer.CriuOpts{})
}

// criuCgroups is the CriuOpts.ManageCgroupsMode of every CRIU call: CRIU
// leaves cgroups alone. libcontainer creates the container's cgroups, sets
// their limits and puts CRIU itself into them before a restore, so the
// restored tasks land there; CRIU's own cgroup work (mounting a cgroup
// "yard" of every hierarchy, restoring properties it then skips for
// cgroups that exist) cost ~15 ms of the freeze here. A ferry container
// has no cgroups of its own to carry along: its /sys/fs/cgroup is mounted
// read-only (one given CAP_SYS_ADMIN could remount it; its sub-cgroups
// would not move).
const criuCgroups = "ignore"

// finalDumpOpts are the options of every final dump (stop-and-copy,
// post-copy, pre-copy's last): the tasks stay as ferryd froze them, with
// their established TCP connections and file locks.
func finalDumpOpts() libcontainer.CriuOpts {
	return libcontainer.CriuOpts{LeaveRunning: true, TcpEstablished: true, FileLocks: true, ManageCgroupsMode: criuCgroups}
}
