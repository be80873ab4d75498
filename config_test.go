package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/resolver"
	"github.com/connectable/connectable/sockpath"
)

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func TestParseConfigDefaults(t *testing.T) {
	c, pos, err := parseConfig("connectable", nil, env(), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pos) != 0 || c.port != 0 || c.dns != nil || c.iptables != "auto" || c.connectTimeout != 3*time.Second ||
		c.dnsMinTTL != time.Second || c.resync != 30*time.Second || c.logFormat != "text" || c.dnsCacheSize != resolver.DefaultCacheSize {
		t.Errorf("defaults: %+v, positional %v", c, pos)
	}
}

func TestParseConfigEnvAndFlags(t *testing.T) {
	c, pos, err := parseConfig("connectable",
		[]string{"redis.service.consul", "--dns", "127.0.0.1:8600", "--port=7000"},
		env("PORT", "6500", "CONNECTABLE_CONNECT_TIMEOUT", "750ms", "DOCKER_HOST", "tcp://127.0.0.1:2375",
			"CONNECTABLE_DNS", "192.0.2.1", "CONNECTABLE_DNS_CACHE_SIZE", "500"),
		&bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.port != 7000 {
		t.Errorf("port = %d; want 7000 (the flag wins over PORT)", c.port)
	}
	if c.connectTimeout != 750*time.Millisecond {
		t.Errorf("connect timeout = %v; want 750ms from the environment", c.connectTimeout)
	}
	if c.dockerHost != "tcp://127.0.0.1:2375" {
		t.Errorf("docker host = %q", c.dockerHost)
	}
	if len(c.dns) != 1 || c.dns[0] != "127.0.0.1:8600" {
		t.Errorf("dns = %v; want [127.0.0.1:8600]", c.dns)
	}
	if c.dnsCacheSize != 500 {
		t.Errorf("dns cache size = %d; want 500 from the environment", c.dnsCacheSize)
	}
	if len(pos) != 1 || pos[0] != "redis.service.consul" {
		t.Errorf("positional = %v", pos)
	}
}

func TestParseConfigInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  []string
		want string // in the error
	}{
		{"port not a number", []string{"--port", "abc"}, nil, "port"},
		{"port out of range", []string{"--port", "70000"}, nil, "port"},
		{"PORT invalid", nil, []string{"PORT", "-1"}, "PORT"},
		{"negative duration", []string{"--connect-timeout", "-1s"}, nil, "connect-timeout"},
		{"zero duration", []string{"--dns-timeout", "0s"}, nil, "dns-timeout"},
		{"not a duration", nil, []string{"CONNECTABLE_DNS_STALE", "soon"}, "CONNECTABLE_DNS_STALE"},
		{"bad dns", []string{"--dns", "127.0.0.1:99999"}, nil, "dns"},
		{"dns port with leading zero", []string{"--dns", "127.0.0.1:053"}, nil, `port "053": leading zero`},
		{"zero cache size", []string{"--dns-cache-size", "0"}, nil, "dns-cache-size"},
		{"cache size not a number", nil, []string{"CONNECTABLE_DNS_CACHE_SIZE", "1e4"}, "CONNECTABLE_DNS_CACHE_SIZE"},
		{"bad iptables", []string{"--iptables", "ebtables"}, nil, "iptables"},
		{"bad log level", []string{"--log-level", "loud"}, nil, "log-level"},
		{"bad log format", nil, []string{"CONNECTABLE_LOG_FORMAT", "xml"}, "CONNECTABLE_LOG_FORMAT"},
		{"unknown flag", []string{"--nope"}, nil, "nope"},
		{"bad allow-targets", []string{"--allow-targets", "127.0.0.0/8,10.0.0.0/33"}, nil, `-allow-targets: "10.0.0.0/33"`},
		{"bad CONNECTABLE_DENY_TARGETS", nil, []string{"CONNECTABLE_DENY_TARGETS", "bridge"}, `CONNECTABLE_DENY_TARGETS: "bridge"`},
		{"bad label-allow", []string{"--label-allow", "[a"}, nil, `-label-allow: "[a"`},
		{"negative max-conns", []string{"--max-conns", "-1"}, nil, "max-conns"},
		{"zero max-dials", []string{"--max-dials-per-namespace", "0"}, nil, "max-dials-per-namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			_, _, err := parseConfig("connectable", tc.args, env(tc.env...), &stderr)
			if err == nil {
				t.Fatalf("no error")
			}
			if msg := err.Error() + stderr.String(); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not name %q", msg, tc.want)
			}
		})
	}
}

func TestTenantOptions(t *testing.T) {
	c, _, err := parseConfig("connectable",
		[]string{"--allow-targets", "127.0.0.0/8", "--label-allow", "*.service.consul, db:5432"},
		env("CONNECTABLE_DENY_TARGETS", "172.17.0.0/16,fd00::/8", "CONNECTABLE_MAX_CONNS_PER_NAMESPACE", "100"),
		&bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.allowTargets) != 1 || len(c.denyTargets) != 2 || c.maxConnsPerNS != 100 || c.maxDialsPerNS != 128 {
		t.Errorf("allow %v, deny %v, per namespace %d, dials %d", c.allowTargets, c.denyTargets, c.maxConnsPerNS, c.maxDialsPerNS)
	}
	for value, ok := range map[string]bool{
		"redis.service.consul": true, "Redis.Service.Consul": true, "db:5432": true,
		"127.0.0.1:8500": false, "redis.service.consul.evil": false, "a.b.service.consul": true,
	} {
		if err := validateLabel(c, value); (err == nil) != ok {
			t.Errorf("validateLabel(%q) = %v; want allowed %v", value, err, ok)
		}
	}
	c, _, _ = parseConfig("connectable", nil, env(), &bytes.Buffer{})
	if err := validateLabel(c, "127.0.0.1:8500"); err != nil {
		t.Errorf("without --label-allow: %v", err)
	}
	if perNS, global := connCaps(c, 20000); perNS != 1250 || global != 9000 {
		t.Errorf("caps at a file limit of 20000: %d per namespace, %d in all; want 1250 and 9000", perNS, global)
	}
	c.maxConnsPerNS, c.maxConns = 50000, 100
	if perNS, global := connCaps(c, 20000); perNS != 100 || global != 100 {
		t.Errorf("caps from flags: %d, %d; want the namespace's within the global 100", perNS, global)
	}
}

func TestRunExitCodes(t *testing.T) {
	for _, tc := range []struct {
		name        string
		args        []string
		code        int
		out, errOut string // what stdout and stderr must contain
	}{
		{"version", []string{"version"}, 0, "connectable dev", ""},
		{"help", []string{"--help"}, 0, "", "Usage:\n  connectable [options]"},
		{"invalid flag", []string{"--port", "x"}, 2, "", `invalid value "x" for flag -port`},
		{"unknown command", []string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{"resolve without name", []string{"resolve"}, 2, "", "usage: connectable resolve NAME"},
		{"resolve invalid name", []string{"resolve", "not a name"}, 2, "", "not a name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, env(), &stdout, &stderr)
			if code != tc.code {
				t.Errorf("exit code %d, want %d; stderr: %s", code, tc.code, stderr.String())
			}
			if !strings.Contains(stdout.String(), tc.out) {
				t.Errorf("stdout %q, want it to contain %q", stdout.String(), tc.out)
			}
			if !strings.Contains(stderr.String(), tc.errOut) {
				t.Errorf("stderr %q, want it to contain %q", stderr.String(), tc.errOut)
			}
			if tc.code == 0 && tc.out == "" && stdout.Len() != 0 {
				t.Errorf("stdout %q; want nothing", stdout.String())
			}
		})
	}
}

func TestHelpListsEveryOption(t *testing.T) {
	var stdout, stderr bytes.Buffer
	run(context.Background(), []string{"--help"}, env(), &stdout, &stderr)
	help := stderr.String()
	for _, o := range options {
		if !strings.Contains(help, "--"+o.name) || !strings.Contains(help, o.env) {
			t.Errorf("--help lacks --%s or its variable %s", o.name, o.env)
		}
	}
}

// TestResolveCommand runs `connectable resolve` against a real dnsmasq:
// the operator's first check when a label does not work.
func TestResolveCommand(t *testing.T) {
	dns := testenv.Dnsmasq(t, []testenv.SRV{
		{Name: "web.service.test", Target: "a.node.test", Port: 8080, Priority: 1, Weight: 10},
		{Name: "web.service.test", Target: "b.node.test", Port: 8081, Priority: 2, Weight: 10},
	}, map[string][]string{"a.node.test": {"127.0.0.2"}, "b.node.test": {"fd00::2"}})

	var stdout, stderr bytes.Buffer
	// Flags after the name work as well as before it.
	code := run(context.Background(), []string{"resolve", "web.service.test", "--dns", dns}, env(), &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit code %d: %s", code, stderr.String())
	}
	if got, want := stdout.String(), "127.0.0.2:8080\n[fd00::2]:8081\n"; got != want {
		t.Errorf("resolve printed %q; want %q (priority order, one ip:port per line)", got, want)
	}

	stdout.Reset()
	stderr.Reset()
	code = run(context.Background(), []string{"resolve", "--dns", dns, "missing.service.test"}, env(), &stdout, &stderr)
	if code == 0 || !strings.Contains(stderr.String(), "missing.service.test") {
		t.Errorf("resolving a missing name: exit %d, stderr %q; want non-zero and the name", code, stderr.String())
	}
}

// TestCleanupCommand: cleanup of a directory nothing pinned in succeeds,
// refuses while a daemon holds the directory, and --help says what
// SIGTERM leaves and how to remove it.
func TestCleanupCommand(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "connectable")
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"cleanup", "--bpf-dir", dir}, env(), &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "nothing pinned at "+dir) {
		t.Errorf("cleanup of nothing: code %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
	stdout.Reset()
	stderr.Reset()
	plain := t.TempDir()
	if code := run(context.Background(), []string{"cleanup", "--bpf-dir", plain}, env(), &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "not on a bpffs") {
		t.Errorf("cleanup of a directory of files: code %d, stderr %q; want 1 and a refusal", code, stderr.String())
	}

	testenv.NeedRoot(t)
	mnt := t.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		testenv.Skipf(t, "mounting a bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	dir = filepath.Join(mnt, "connectable")
	lock, err := sockpath.Lock(dir) // as a running daemon holds it
	if err != nil {
		t.Fatal(err)
	}
	stdout.Reset()
	stderr.Reset()
	if code := run(context.Background(), []string{"cleanup", "--bpf-dir", dir}, env(), &stdout, &stderr); code != 1 ||
		!strings.Contains(stderr.String(), "another connectable holds the pin directory") || !strings.Contains(stderr.String(), "stop the daemon first") {
		t.Errorf("cleanup while held: code %d, stderr %q; want 1 and a refusal", code, stderr.String())
	}
	lock.Unlock()
	stdout.Reset()
	stderr.Reset()
	if code := run(context.Background(), []string{"cleanup", "--bpf-dir", dir}, env(), &stdout, &stderr); code != 0 {
		t.Errorf("cleanup after the holder let go: code %d, stderr %q", code, stderr.String())
	}
	if code := run(context.Background(), []string{"cleanup", "extra"}, env(), &stdout, &stderr); code != 2 {
		t.Errorf("cleanup with an argument: code %d; want 2", code)
	}
	stderr.Reset()
	run(context.Background(), []string{"--help"}, env(), &stdout, &stderr)
	for _, want := range []string{"connectable cleanup [--bpf-dir DIR]", "Signals: SIGTERM", "refuses no connect", "One daemon per --bpf-dir"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}
