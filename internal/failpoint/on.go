//go:build failpoints

package failpoint

import (
	"fmt"
	"os"
	"strings"
	"time"
)

// Enabled reports whether this binary has failpoints compiled in.
const Enabled = true

// Check returns an error (or blocks) if the failpoint name is turned on.
func Check(name string) error {
	for _, fp := range strings.Split(os.Getenv("FERRY_FAILPOINTS"), ",") {
		n, action, _ := strings.Cut(strings.TrimSpace(fp), "=")
		if n != name {
			continue
		}
		switch action {
		case "sleep":
			time.Sleep(time.Minute)
			return fmt.Errorf("failpoint %s: slept", name)
		case "delay":
			time.Sleep(3 * time.Second)
			return nil
		default:
			return fmt.Errorf("failpoint %s: injected failure", name)
		}
	}
	return nil
}
