package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestSplitRuntimeArgs(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		own  map[string]string
		rest []string
	}{
		{"docker's script", []string{"--hook-socket=/s", "--hook-strict", "--", "--root", "/r", "create", "--bundle", "/b", "id"},
			map[string]string{"hook-socket": "/s", "hook-strict": "true"}, []string{"--root", "/r", "create", "--bundle", "/b", "id"}},
		{"no separator", []string{"--runc", "/usr/bin/runc", "--root", "/r", "state", "id"},
			map[string]string{"runc": "/usr/bin/runc"}, []string{"--root", "/r", "state", "id"}},
		{"nothing of ours", []string{"--version"}, map[string]string{}, []string{"--version"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			own, rest, err := splitRuntimeArgs(tc.args)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(own, tc.own) || !reflect.DeepEqual(rest, tc.rest) {
				t.Errorf("got %v %v; want %v %v", own, rest, tc.own, tc.rest)
			}
		})
	}
	if _, _, err := splitRuntimeArgs([]string{"--hook-timeout"}); err == nil {
		t.Error("--hook-timeout without a value: no error")
	}
}

func TestRuncCommand(t *testing.T) {
	for _, tc := range []struct {
		args        []string
		cmd, bundle string
	}{
		{[]string{"--root", "/r", "--log", "/l", "--log-format", "json", "create", "--bundle", "/b", "--pid-file", "/p", "id"}, "create", "/b"},
		{[]string{"--systemd-cgroup", "run", "-b=/x", "id"}, "run", "/x"},
		{[]string{"create", "id"}, "create", "."},
		{[]string{"--root", "/r", "start", "id"}, "start", "."},
		{[]string{"--version"}, "", ""},
	} {
		cmd, bundle := runcCommand(tc.args)
		if cmd != tc.cmd || bundle != tc.bundle {
			t.Errorf("runcCommand(%q) = %q, %q; want %q, %q", tc.args, cmd, bundle, tc.cmd, tc.bundle)
		}
	}
}

// The hook goes after libnetwork's, in its stage; nothing else of the
// configuration changes; a second run adds nothing.
func TestAddHook(t *testing.T) {
	for _, tc := range []struct {
		name, hooks, stage string
		index              int
	}{
		{"docker 20.10", `{"prestart":[{"path":"/proc/1/exe","args":["libnetwork-setkey","-exec-root=/x","id","nid"]}]}`, "prestart", 1},
		{"libnetwork in createRuntime", `{"createRuntime":[{"path":"/proc/1/exe","args":["libnetwork-setkey"]},{"path":"/other"}]}`, "createRuntime", 2},
		{"no hooks", `null`, "prestart", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.json")
			orig := `{"ociVersion":"1.0.2-dev","process":{"args":["sh"]},"linux":{"sysctl":{"a":"b"}},"hooks":` + tc.hooks + `}`
			if err := os.WriteFile(path, []byte(orig), 0o600); err != nil {
				t.Fatal(err)
			}
			args := []string{"connectable", "hook", "--hook-socket=/s"}
			for range 2 {
				if err := addHook(path, "/bin/connectable", args); err != nil {
					t.Fatal(err)
				}
			}
			data, _ := os.ReadFile(path)
			var got map[string]any
			if err := json.Unmarshal(data, &got); err != nil {
				t.Fatal(err)
			}
			hooks := got["hooks"].(map[string]any)[tc.stage].([]any)
			if len(hooks) != tc.index+1 {
				t.Fatalf("%s has %d hooks; want %d: %s", tc.stage, len(hooks), tc.index+1, data)
			}
			h := hooks[tc.index].(map[string]any)
			if h["path"] != "/bin/connectable" || !reflect.DeepEqual(h["args"], []any{"connectable", "hook", "--hook-socket=/s"}) {
				t.Errorf("hook %d of %s is %v", tc.index, tc.stage, h)
			}
			if got["ociVersion"] != "1.0.2-dev" || got["linux"].(map[string]any)["sysctl"].(map[string]any)["a"] != "b" {
				t.Errorf("the rest of the configuration changed: %s", data)
			}
			if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
				t.Errorf("mode %v; want 0600", fi.Mode().Perm())
			}
		})
	}
}

func TestReadBundle(t *testing.T) {
	for _, tc := range []struct {
		name, linux  string
		host, joined bool
		sysctl       map[string]string
	}{
		{"own namespace, IPv6 asked", `{"namespaces":[{"type":"mount"},{"type":"network"}],"sysctl":{"net.ipv6.conf.all.disable_ipv6":"0","net.ipv4.ip_forward":"1"}}`,
			false, false, map[string]string{"net.ipv6.conf.all.disable_ipv6": "0"}},
		{"IPv6 off is not ours to apply", `{"namespaces":[{"type":"network"}],"sysctl":{"net.ipv6.conf.all.disable_ipv6":"1"}}`, false, false, nil},
		{"joined", `{"namespaces":[{"type":"network","path":"/proc/5/ns/net"}]}`, false, true, nil},
		{"host", `{"namespaces":[{"type":"mount"}]}`, true, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"linux":`+tc.linux+`}`), 0o600); err != nil {
				t.Fatal(err)
			}
			host, joined, sysctl, err := readBundle(dir)
			if err != nil {
				t.Fatal(err)
			}
			if host != tc.host || joined != tc.joined || !reflect.DeepEqual(sysctl, tc.sysctl) {
				t.Errorf("got host %v joined %v sysctl %v; want %v %v %v", host, joined, sysctl, tc.host, tc.joined, tc.sysctl)
			}
		})
	}
}

// hookRun runs hookCmd with a state on stdin against socket.
func hookRun(t *testing.T, socket string, timeout time.Duration, strict bool) (int, string) {
	t.Helper()
	c := &config{hookSocket: socket, hookTimeout: timeout, hookStrict: strict, hookLog: "stderr"}
	var stderr bytes.Buffer
	state := `{"ociVersion":"1.0.2","id":"` + strings.Repeat("a", 64) + `","pid":12345,"status":"creating"}`
	code := hookCmd(context.Background(), c, strings.NewReader(state), &stderr)
	return code, stderr.String()
}

// The daemon down: the hook returns at once, and 1 only in strict mode;
// silent: it gives up after its bound.
func TestHookWithoutDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "hook.sock")
	start := time.Now()
	code, out := hookRun(t, sock, 5*time.Second, false)
	if code != 0 || !strings.Contains(out, "is the daemon running?") || time.Since(start) > 4*time.Second {
		t.Errorf("daemon down: exit %d after %v, %q; want 0 at once, saying so", code, time.Since(start), out)
	}
	if code, out := hookRun(t, sock, 5*time.Second, true); code != 1 || !strings.Contains(out, "--hook-strict") {
		t.Errorf("daemon down, strict: exit %d, %q; want 1", code, out)
	}

	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { <-done; c.Close() }()
		}
	}()
	start = time.Now()
	code, out = hookRun(t, sock, 300*time.Millisecond, false)
	took := time.Since(start)
	if code != 0 || !strings.Contains(out, "no answer from the daemon within") || took < 300*time.Millisecond {
		t.Errorf("silent daemon: exit %d after %v, %q; want 0 after the bound", code, took, out)
	}
}

// The daemon's answers: served, unlabelled and skipped let the container
// start, strict or not; not served fails it only in strict mode.
func TestHookAnswers(t *testing.T) {
	for _, tc := range []struct {
		name        string
		rep         hookReply
		lax, strict int
		sayInStrict string
	}{
		{"served", hookReply{Served: true, Labeled: true}, 0, 0, ""},
		{"unlabelled", hookReply{}, 0, 0, ""},
		{"refused labels", hookReply{Labeled: true, Skipped: true, Reason: "no valid connect.* labels"}, 0, 0, ""},
		{"set-up failed", hookReply{Labeled: true, Reason: "waiting for x: context deadline exceeded"}, 0, 1, "context deadline exceeded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "hook.sock")
			ln, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					var req hookRequest
					if err := json.NewDecoder(c).Decode(&req); err == nil && req.PID == 12345 {
						b, _ := json.Marshal(tc.rep)
						c.Write(append(b, '\n'))
					}
					c.Close()
				}
			}()
			if code, out := hookRun(t, sock, 5*time.Second, false); code != tc.lax {
				t.Errorf("exit %d; want %d (%s)", code, tc.lax, out)
			}
			code, out := hookRun(t, sock, 5*time.Second, true)
			if code != tc.strict || !strings.Contains(out, tc.sayInStrict) {
				t.Errorf("strict: exit %d, %q; want %d saying %q", code, out, tc.strict, tc.sayInStrict)
			}
		})
	}
}

func TestHookConfig(t *testing.T) {
	dir := t.TempDir()
	daemonJSON := filepath.Join(dir, "daemon.json")
	if err := os.WriteFile(daemonJSON, []byte(`{"data-root":"/var/lib/docker","runtimes":{"other":{"path":"/x"}}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := hookConfigCmd([]string{"docker", "--default-runtime", "--binary", "/usr/local/bin/connectable", "--hook-timeout", "3s", "--write", daemonJSON}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	data, _ := os.ReadFile(daemonJSON)
	var got map[string]any
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"data-root":       "/var/lib/docker",
		"default-runtime": "connectable",
		"runtimes": map[string]any{
			"other":       map[string]any{"path": "/x"},
			"connectable": map[string]any{"path": "/usr/local/bin/connectable", "runtimeArgs": []any{"runtime", "--hook-timeout=3s", "--"}},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("daemon.json:\n%s\nwant %v", data, want)
	}

	stdout.Reset()
	if code := hookConfigCmd([]string{"podman", "--binary", "/usr/local/bin/connectable"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	var hook map[string]any
	if err := json.Unmarshal(stdout.Bytes(), &hook); err != nil {
		t.Fatalf("%v: %s", err, stdout.String())
	}
	if hook["version"] != "1.0.0" || !reflect.DeepEqual(hook["stages"], []any{"prestart"}) ||
		!reflect.DeepEqual(hook["hook"], map[string]any{"path": "/usr/local/bin/connectable", "args": []any{"connectable", "hook"}}) {
		t.Errorf("podman hook: %s", stdout.String())
	}
}
