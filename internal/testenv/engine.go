package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// EngineConfig configures a private Docker Engine started by StartEngine.
type EngineConfig struct {
	// NetNS optionally names the network namespace (a path such as
	// /var/run/netns/NAME) the engine runs in; if "", a new one from
	// NewNetNS. Its bridge and nat rules stay inside that namespace.
	NetNS string
	// Bip optionally gives the engine's docker0 an address and subnet in
	// 198.18.0.0/15 (e.g. "198.18.201.1/24"); if "", --bridge=none.
	Bip string
	// Runtimes optionally registers OCI runtimes (name → path of the
	// executable), as daemon.json's "runtimes" does.
	Runtimes map[string]string
	// RuntimeArgs optionally gives registered runtimes their arguments
	// (name → daemon.json's runtimeArgs), which dockerd puts before the
	// runtime's own.
	RuntimeArgs map[string][]string
	// DefaultRuntime optionally names the runtime containers get when
	// docker run names none.
	DefaultRuntime string
	// Args are further dockerd flags.
	Args []string
}

// Engine is a private dockerd started by StartEngine: its own socket, data
// root, exec root and configuration, so that nothing of the machine's own
// engine changes.
type Engine struct {
	NetNS  string // the network namespace it runs in
	Socket string // its API socket's path
	PID    int
	dir    string
	cmd    *exec.Cmd
	args   []string // nsenter's, to start it again
	done   chan struct{}
	logs   SyncBuffer
}

// Host returns the engine's address for DOCKER_HOST and docker -H.
func (e *Engine) Host() string { return "unix://" + e.Socket }

// Logs returns what dockerd printed.
func (e *Engine) Logs() string { return e.logs.String() }

// StartEngine starts a private Docker Engine inside a network namespace
// and stops it, by its PID, when the test ends (DESIGN.md, "Private engines
// in namespaces"). It uses the vfs storage driver, which works anywhere and
// serves small local images; it starts with no images (ImportBusybox).
func StartEngine(t testing.TB, cfg EngineConfig) *Engine {
	t.Helper()
	NeedRoot(t)
	NeedCommand(t, "dockerd", "docker", "nsenter")
	if cfg.NetNS == "" {
		cfg.NetNS = NewNetNS(t)
	}
	// Short paths: a unix socket's path must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "cnt-engine-")
	if err != nil {
		t.Fatal(err)
	}
	e := &Engine{NetNS: cfg.NetNS, Socket: filepath.Join(dir, "docker.sock"), dir: dir}
	t.Cleanup(func() {
		if err := e.stop(); err != nil {
			t.Error(err)
		}
	})
	// Its own configuration file: the machine's /etc/docker/daemon.json
	// names a data root and storage driver that clash with these flags.
	conf := map[string]any{}
	if len(cfg.Runtimes) > 0 {
		rts := map[string]any{}
		for name, path := range cfg.Runtimes {
			rt := map[string]any{"path": path}
			if args := cfg.RuntimeArgs[name]; len(args) > 0 {
				rt["runtimeArgs"] = args
			}
			rts[name] = rt
		}
		conf["runtimes"] = rts
	}
	if cfg.DefaultRuntime != "" {
		conf["default-runtime"] = cfg.DefaultRuntime
	}
	confJSON, _ := json.Marshal(conf)
	if err := os.WriteFile(filepath.Join(dir, "daemon.json"), confJSON, 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--net=" + cfg.NetNS, "--", "dockerd",
		"--config-file", filepath.Join(dir, "daemon.json"),
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"-H", e.Host(),
		"--storage-driver", "vfs",
		"--userland-proxy=false",
	}
	if cfg.Bip != "" {
		args = append(args, "--bip", cfg.Bip)
	} else {
		args = append(args, "--bridge", "none")
	}
	e.args = append(args, cfg.Args...)
	e.start(t)
	return e
}

func (e *Engine) start(t testing.TB) {
	t.Helper()
	e.done = make(chan struct{})
	e.cmd = exec.Command("nsenter", e.args...)
	e.cmd.Stdout, e.cmd.Stderr = &e.logs, &e.logs
	// Its own process group, so that a stop reaches nothing else.
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("starting dockerd: %v", err)
	}
	// nsenter execs dockerd: the PID is the engine's.
	e.PID = e.cmd.Process.Pid
	done := e.done
	go func() { _ = e.cmd.Wait(); close(done) }()
	if err := e.waitReady(time.Minute); err != nil {
		t.Fatalf("private engine in %s: %v\n%s", e.NetNS, err, e.Logs())
	}
}

// Restart stops the engine by its PID (SIGTERM) and starts it again on the
// same roots, as an upgrade or a crash-and-restart of dockerd would; its
// containers keep running through it only if it runs with --live-restore.
func (e *Engine) Restart(t testing.TB) {
	t.Helper()
	_ = syscall.Kill(e.PID, syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("dockerd %d did not stop within 30s of SIGTERM", e.PID)
	}
	e.start(t)
}

func (e *Engine) waitReady(timeout time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", e.Socket)
		},
	}}
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-e.done:
			return errors.New("dockerd exited")
		default:
		}
		resp, err := client.Get("http://engine/_ping")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer on %s within %v: %v", e.Socket, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Docker runs the docker CLI against this engine, as testenv.Docker does
// against the machine's.
func (e *Engine) Docker(args ...string) ([]byte, error) {
	return Docker(append([]string{"-H", e.Host()}, args...)...)
}

// ImportBusybox imports the busybox image (BusyboxImageName) into this
// engine and returns its name.
func (e *Engine) ImportBusybox(t testing.TB) string {
	t.Helper()
	NeedCommand(t, "busybox")
	rootfs, err := busyboxRootFS(nil)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("docker", "-H", e.Host(), "import", "--change", `CMD ["/bin/sh"]`, "-", BusyboxImageName)
	cmd.Stdin = rootfs
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("docker import into %s: %v: %s", e.Socket, err, bytes.TrimSpace(out))
	}
	return BusyboxImageName
}

// Stop stops the engine now, as a host that goes down would lose it; the
// test's clean-up then only removes what it left. It is idempotent.
func (e *Engine) Stop() error { return e.stop() }

// stop removes the engine's containers, stops it by its PID, unmounts what
// its roots still hold and removes them.
func (e *Engine) stop() error {
	var errs []error
	// Never started (or its start failed): there is no PID to signal, and
	// kill(0) would signal the test's own process group.
	if e.PID == 0 {
		e.done = make(chan struct{})
		close(e.done)
	}
	select {
	case <-e.done:
	default:
		if out, err := e.Docker("ps", "-aq"); err == nil {
			for _, id := range strings.Fields(string(out)) {
				if _, err := e.Docker("rm", "-f", id); err != nil {
					errs = append(errs, err)
				}
			}
		}
		_ = syscall.Kill(e.PID, syscall.SIGTERM)
		select {
		case <-e.done:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-e.PID, syscall.SIGKILL)
			<-e.done
			errs = append(errs, fmt.Errorf("dockerd %d did not stop within 30s of SIGTERM; killed", e.PID))
		}
	}
	if e.dir == "" {
		return errors.Join(errs...)
	}
	if err := unmountUnder(e.dir); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(e.dir); err != nil {
		errs = append(errs, fmt.Errorf("removing the engine's directory: %w", err))
	}
	e.dir = ""
	return errors.Join(errs...)
}

// unmountUnder unmounts every mount point below dir, deepest first.
func unmountUnder(dir string) error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 {
			if p := unescapeOctal(f[4]); p == dir || strings.HasPrefix(p, dir+"/") {
				points = append(points, p)
			}
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	var errs []error
	for _, p := range points {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeOctal undoes mountinfo's \040-style escapes.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
