package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRestartStorm: containers are started and removed while ferryd is
// killed -9 and restarted 10 times. Afterwards none is lost, none is
// duplicated, and ferryd's view equals the kernel's: every container it
// lists as running has a live init in its cgroup, and every container
// cgroup belongs to a container it lists.
func TestRestartStorm(t *testing.T) {
	requireHost(t)
	requireV1(t)
	d := newDaemon(t, "storm")
	d.start()

	const total = 50
	type outcome struct {
		created, removed, ambiguous bool
	}
	var mu sync.Mutex
	results := map[string]*outcome{}
	churnDone := make(chan struct{})
	go func() {
		defer close(churnDone)
		for i := 0; i < total; i++ {
			name := "s" + strconv.Itoa(i)
			var errOut string
			var code int
			// A refusal to connect means the request never reached ferryd:
			// try again. A failure mid-call leaves the outcome unknown.
			for try := 0; try < 100; try++ {
				_, errOut, code = d.ctl("run", name, "--", "sleep", "1000")
				if code == 0 || !strings.Contains(errOut, "cannot reach ferryd") {
					break
				}
				time.Sleep(30 * time.Millisecond)
			}
			mu.Lock()
			o := &outcome{created: code == 0, ambiguous: code != 0}
			results[name] = o
			mu.Unlock()
			if i%4 == 3 { // remove an earlier one
				victim := "s" + strconv.Itoa(i-2)
				var code int
				var errOut string
				for try := 0; try < 100; try++ {
					_, errOut, code = d.ctl("rm", "-f", victim)
					if code == 0 || !strings.Contains(errOut, "cannot reach ferryd") {
						break
					}
					time.Sleep(30 * time.Millisecond)
				}
				mu.Lock()
				if code == 0 {
					results[victim].removed = true
				} else {
					results[victim].ambiguous = true // ferryd may have died mid-removal
				}
				mu.Unlock()
			}
		}
	}()
	for k := 0; k < 10; k++ {
		time.Sleep(time.Duration(300+(k*137)%400) * time.Millisecond)
		d.kill9()
		d.start()
	}
	<-churnDone
	d.kill9()
	d.start()

	var listed []container
	if err := json.Unmarshal([]byte(d.mustCtl("ps", "-o", "json")), &listed); err != nil {
		t.Fatal(err)
	}
	seen := map[string]container{}
	for _, c := range listed {
		if _, dup := seen[c.Name]; dup {
			t.Errorf("container %s listed twice", c.Name)
		}
		seen[c.Name] = c
	}
	for name, o := range results {
		c, ok := seen[name]
		switch {
		case o.ambiguous:
			// Either outcome is fine, as long as it is whole (checked below).
		case o.removed && ok:
			t.Errorf("%s was removed but is listed (%s)", name, c.State)
		case o.created && !o.removed && !ok:
			t.Errorf("%s was created and never removed, but is lost", name)
		case o.created && !o.removed && c.State != "running":
			t.Errorf("%s is %s, want running", name, c.State)
		}
	}
	// ferryd's view against the kernel's.
	for _, c := range listed {
		if c.State != "running" {
			t.Logf("%s is %s (exit %d): %s", c.Name, c.State, c.ExitCode, c.StatusReason)
			continue
		}
		if !pidAlive(c.Pid) {
			t.Errorf("%s listed running with pid %d, which is not alive", c.Name, c.Pid)
			continue
		}
		procs, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", c.Cgroup, "cgroup.procs"))
		if err != nil || !strings.Contains(" "+strings.Join(strings.Fields(string(procs)), " ")+" ", " "+strconv.Itoa(c.Pid)+" ") {
			t.Errorf("%s: pid %d not in its cgroup %s (%v)", c.Name, c.Pid, c.Cgroup, err)
		}
	}
	ents, _ := os.ReadDir(filepath.Join("/sys/fs/cgroup/memory", d.cgParent))
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		if c, ok := seen[e.Name()]; !ok || c.State != "running" {
			t.Errorf("cgroup %s/%s belongs to no running container ferryd lists", d.cgParent, e.Name())
		}
	}
	running := 0
	for _, c := range listed {
		if c.State == "running" {
			running++
		}
	}
	monitors := 0
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if b, err := os.ReadFile("/proc/" + p.Name() + "/cmdline"); err == nil &&
			strings.Contains(string(b), "monitor") && strings.Contains(string(b), d.root+"/") {
			monitors++
		}
	}
	if monitors != running {
		t.Errorf("%d monitor processes for %d running containers", monitors, running)
	}
	t.Logf("%d containers listed (%d running) after 10 kills; %d runs ambiguous", len(listed), running, func() int {
		n := 0
		for _, o := range results {
			if o.ambiguous {
				n++
			}
		}
		return n
	}())
	for name := range results {
		d.ctl("rm", "-f", name)
		d.assertNoTrace(t, name)
	}
}
