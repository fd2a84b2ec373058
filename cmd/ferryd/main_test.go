package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigFileFillsUnsetFlags(t *testing.T) {
	p := filepath.Join(t.TempDir(), "ferryd.json")
	if err := os.WriteFile(p, []byte(`{"root": "/srv/ferry", "log-max": 2048, "node-name": "from-file", "sysctl-allow": ["net.ipv4.*", "kernel.shmmax"]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := rootCmd()
	if err := cmd.ParseFlags([]string{"--node-name", "from-flag"}); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(cmd.Flags(), p); err != nil {
		t.Fatal(err)
	}
	get := func(k string) string { return cmd.Flags().Lookup(k).Value.String() }
	if get("root") != "/srv/ferry" || get("log-max") != "2048" {
		t.Errorf("file values not applied: root %s log-max %s", get("root"), get("log-max"))
	}
	if got := get("sysctl-allow"); got != "[net.ipv4.*,kernel.shmmax]" {
		t.Errorf("sysctl-allow %s", got)
	}
	if get("node-name") != "from-flag" {
		t.Errorf("node-name %q: the command line must win over the file", get("node-name"))
	}
}

func TestConfigFileErrorsNameTheKey(t *testing.T) {
	for body, want := range map[string]string{
		`{"no-such-flag": 1}`: `unknown key "no-such-flag"`,
		`{"log-max": "lots"}`: `key "log-max" value "lots"`,
		`{"root": ["a"]}`:     `key "root"`,
		`not json`:            "invalid character",
	} {
		p := filepath.Join(t.TempDir(), "c.json")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		err := applyConfigFile(rootCmd().Flags(), p)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), p) {
			t.Errorf("config %s: err %v, want it to name %q and the file", body, err, want)
		}
	}
}
