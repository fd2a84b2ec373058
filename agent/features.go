package agent

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"

	"github.com/ferry-agent/ferry/agent/api"
	"github.com/ferry-agent/ferry/internal/criuview"
	"github.com/ferry-agent/ferry/migrate"
)

// pipeMaxNeeded is the pipe size CRIU's page pipes grow to while serving
// lazy pages. Without CAP_SYS_RESOURCE a pipe cannot grow past
// fs.pipe-max-size, and CRIU's lazy transfer then fails with EBADF
// ("page-pipe: splice: Bad file descriptor").
const pipeMaxNeeded = 4 << 20

const pipeMaxSizeFile = "/proc/sys/fs/pipe-max-size"

// criuChecks runs `criu check --feature` once per agent: the kernel's
// answer does not change while ferryd runs.
type criuChecks struct {
	once                   sync.Once
	dirtyTrack, uffd       bool
	dirtyTrackWhy, uffdWhy string
}

func (c *criuChecks) run(view *criuview.View, criu string) {
	c.once.Do(func() {
		c.dirtyTrack, c.dirtyTrackWhy = criuFeature(view, criu, "mem_dirty_track")
		c.uffd, c.uffdWhy = criuFeature(view, criu, "uffd-noncoop")
	})
}

func criuFeature(view *criuview.View, criu, name string) (bool, string) {
	if criu == "" {
		criu = "criu"
	}
	var out []byte
	err := view.Do(func() (err error) {
		out, err = exec.Command(criu, "check", "--feature", name).CombinedOutput()
		return err
	})
	if err != nil {
		return false, fmt.Sprintf("criu check --feature %s: %s", name, lastLine(string(out), err))
	}
	return true, ""
}

func lastLine(out string, err error) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if l := strings.TrimSpace(lines[len(lines)-1]); l != "" {
		return l
	}
	return err.Error()
}

// MigrationFeatures reports what CRIU can do on this node. The pipe limit
// is read each time: an operator may raise it while ferryd runs.
func (a *Agent) MigrationFeatures() *api.MigrationFeatures {
	a.checks.run(a.criuView, a.cfg.CriuPath)
	f := &api.MigrationFeatures{MemDirtyTrack: a.checks.dirtyTrack, LazyPages: a.checks.uffd}
	switch {
	case !a.checks.uffd:
		f.LazyPagesReason = a.checks.uffdWhy
	default:
		if why := pipeLimitProblem(); why != "" {
			f.LazyPages, f.LazyPagesReason = false, why
		}
	}
	return f
}

// pipeLimitProblem says why CRIU's page pipes would not fit, or "".
func pipeLimitProblem() string {
	if hasCapSysResource() {
		return ""
	}
	b, err := os.ReadFile(pipeMaxSizeFile)
	if err != nil {
		return "read " + pipeMaxSizeFile + ": " + err.Error()
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return fmt.Sprintf("%s: %q: %v", pipeMaxSizeFile, strings.TrimSpace(string(b)), err)
	}
	if v < pipeMaxNeeded {
		return fmt.Sprintf("ferryd lacks CAP_SYS_RESOURCE and fs.pipe-max-size is %d, below the %d CRIU's lazy page pipes need: raise it (sysctl -w fs.pipe-max-size=%d)",
			v, pipeMaxNeeded, pipeMaxNeeded)
	}
	return ""
}

// hasCapSysResource reads the effective capability set of this process.
func hasCapSysResource() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<24) != 0 // CAP_SYS_RESOURCE
		}
	}
	return false
}

func nodeFeatures(f *api.MigrationFeatures) migrate.NodeFeatures {
	return migrate.NodeFeatures{MemDirtyTrack: f.GetMemDirtyTrack(), LazyPages: f.GetLazyPages()}
}
