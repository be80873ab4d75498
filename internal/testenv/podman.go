package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// PodmanImageName is the busybox image that StartPodman imports into each
// service's own storage.
const PodmanImageName = "localhost/connectable-test/busybox:latest"

// PodmanTimeout bounds one podman command of a test; podman answers here in
// about a second, also under load.
const PodmanTimeout = 2 * time.Minute

// pauseScript is the infra process of the test's pods (podman's own pause
// image is built from catatonit, which podman only recommends). As PID 1 it
// must handle TERM itself, or every pod stop would wait out the timeout.
const pauseScript = "#!/bin/sh\ntrap 'exit 0' TERM INT\nsleep 2147483647 &\nwait\n"

// podmanConf is the containers.conf of a test's podman. This sandbox's
// runc cannot raise resource limits (no CAP_SYS_RESOURCE), so every
// container, a pod's infra container too, gets limits it already has.
const podmanConf = `[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
`

// Podman is a rootful `podman system service` serving the Docker API on a
// socket of its own, with its own storage, state, events and network
// configuration, so that it sees only what its test made.
type Podman struct {
	// Host is the service's endpoint, for DOCKER_HOST or --docker-host.
	Host string
	// Image is the busybox image in the service's storage: the same root
	// file system as BusyboxImage, plus /pause for pods.
	Image string

	t      testing.TB
	dir    string
	global []string // flags that make the CLI use the service's storage
	env    []string
	cmd    *exec.Cmd
	exited chan struct{}
	logs   SyncBuffer
}

// NeedPodman skips unless the test runs as root and podman is installed.
func NeedPodman(t testing.TB) {
	t.Helper()
	NeedRoot(t)
	NeedCommand(t, "podman", "busybox")
	out, err := exec.Command("podman", "version", "--format", "{{.Client.Version}}").CombinedOutput()
	if err != nil {
		Skipf(t, "needs a working podman: podman version: %v: %s", err, bytes.TrimSpace(out))
	}
}

// StartPodman starts a podman service for the test, imports the busybox
// image and returns once the service answers. When the test ends, every pod
// and container of the service is removed (a test fails if one cannot be),
// the service is stopped by its PID and its directory removed.
//
// The podman CLI of Command shares the service's storage, as the podman
// command and the service of a host share it: containers it runs are the
// service's, and their events reach the service's subscribers.
func StartPodman(t testing.TB) *Podman {
	t.Helper()
	NeedPodman(t)
	// Not t.TempDir: a socket path must fit in 108 bytes, and subtests'
	// names make t.TempDir's long.
	dir, err := os.MkdirTemp("", "cnt-podman-")
	if err != nil {
		t.Fatal(err)
	}
	p := &Podman{
		Host:  "unix://" + filepath.Join(dir, "podman.sock"),
		Image: PodmanImageName,
		t:     t,
		dir:   dir,
		global: []string{
			"--root", filepath.Join(dir, "root"),
			"--runroot", filepath.Join(dir, "run"),
			"--tmpdir", filepath.Join(dir, "tmp"),
			"--network-config-dir", filepath.Join(dir, "networks"),
			// vfs leaves no mounts behind for RemoveAll to trip over.
			"--storage-driver", "vfs",
			"--events-backend", "file",
			"--cgroup-manager", "cgroupfs",
		},
		env:    append(os.Environ(), "CONTAINERS_CONF="+filepath.Join(dir, "containers.conf"), "TMPDIR="+filepath.Join(dir, "tmp")),
		exited: make(chan struct{}),
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing the podman directory: %v", err)
		}
	})
	for _, sub := range []string{"tmp", "networks"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "containers.conf"), []byte(podmanConf), 0o600); err != nil {
		t.Fatal(err)
	}

	rootfs, err := busyboxRootFS(map[string]string{"pause": pauseScript})
	if err != nil {
		t.Fatalf("building the busybox root file system: %v", err)
	}
	imp := p.command(context.Background(), "import", "--change", `CMD ["/bin/sh"]`, "-", PodmanImageName)
	imp.Stdin = rootfs
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("podman import: %v: %s", err, bytes.TrimSpace(out))
	}

	p.cmd = p.command(context.Background(), "system", "service", "--time=0", p.Host)
	p.cmd.Stdout, p.cmd.Stderr = &p.logs, &p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting podman system service: %v", err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	// Registered after the directory's removal, so it runs before it.
	t.Cleanup(p.stop)
	if err := p.waitReady(30 * time.Second); err != nil {
		t.Fatalf("podman system service: %v\n%s", err, p.logs.String())
	}
	return p
}

func (p *Podman) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "podman", append(slices.Clone(p.global), args...)...)
	cmd.Env = p.env
	return cmd
}

// waitReady polls the service's /_ping until it answers.
func (p *Podman) waitReady(timeout time.Duration) error {
	sock := strings.TrimPrefix(p.Host, "unix://")
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	var err error
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		select {
		case <-p.exited:
			return errors.New("exited before it answered")
		default:
		}
		var resp *http.Response
		if resp, err = client.Get("http://podman/_ping"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("/_ping: %s", resp.Status)
		}
	}
	return fmt.Errorf("no answer within %v: %w", timeout, err)
}

// Logs returns what the service printed.
func (p *Podman) Logs() string { return p.logs.String() }

// Command runs the podman CLI on the service's storage and returns what it
// printed on stdout; a failure carries its stderr.
func (p *Podman) Command(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), PodmanTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := p.command(ctx, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	switch {
	case ctx.Err() != nil:
		return stdout.Bytes(), fmt.Errorf("podman %s: no answer within %v", strings.Join(args, " "), PodmanTimeout)
	case err != nil:
		return stdout.Bytes(), fmt.Errorf("podman %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.Bytes(), nil
}

// Run runs `podman run -d --label connectable.test=1 <args>` and returns the
// new container's full ID. args must choose its network (--network none,
// ns:<path> or container:<id>, or --pod): podman's default bridge network
// adds nat rules to the machine's own namespace, which tests never change.
// The container is removed when the test ends, if it still exists.
func (p *Podman) Run(t testing.TB, args ...string) string {
	t.Helper()
	if err := checkPodmanNetwork(args, true); err != nil {
		t.Fatalf("podman run %s: %v", strings.Join(args, " "), err)
	}
	name := containerName(args)
	full := []string{"run", "-d", "--label", TestLabel}
	if name == "" {
		name = RandomName("cnt-test-")
		full = append(full, "--name", name)
	}
	t.Cleanup(func() {
		if _, err := p.Command("rm", "-f", "-t", "0", "--ignore", name); err != nil {
			t.Error(err)
		}
	})
	out, err := p.Command(append(full, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return lastLine(out)
}

// Pod runs `podman pod create --label connectable.test=1 <args>`, with the
// test image's /pause as its infra process, and returns the pod's ID. args
// must choose the pod's network, as for Run. The pod and its containers
// are removed when the test ends.
func (p *Podman) Pod(t testing.TB, args ...string) string {
	t.Helper()
	if err := checkPodmanNetwork(args, false); err != nil {
		t.Fatalf("podman pod create %s: %v", strings.Join(args, " "), err)
	}
	name := containerName(args)
	full := []string{"pod", "create", "--label", TestLabel, "--infra-image", p.Image, "--infra-command", "/pause"}
	if name == "" {
		name = RandomName("cnt-test-pod-")
		full = append(full, "--name", name)
	}
	t.Cleanup(func() {
		if _, err := p.Command("pod", "rm", "-f", "-t", "0", "--ignore", name); err != nil {
			t.Error(err)
		}
	})
	out, err := p.Command(append(full, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return lastLine(out)
}

func lastLine(out []byte) string {
	lines := strings.Fields(string(out))
	if len(lines) == 0 {
		return ""
	}
	return lines[len(lines)-1]
}

// checkPodmanNetwork makes sure args choose a network other than podman's
// default bridge. Like containerName, it does not tell options from the
// command's arguments.
func checkPodmanNetwork(args []string, mayJoinPod bool) error {
	for i, a := range args {
		var v string
		switch {
		case (a == "--network" || a == "--net") && i+1 < len(args):
			v = args[i+1]
		case strings.HasPrefix(a, "--network="), strings.HasPrefix(a, "--net="):
			v = a[strings.IndexByte(a, '=')+1:]
		case mayJoinPod && (a == "--pod" || strings.HasPrefix(a, "--pod=")):
			return nil
		default:
			continue
		}
		if v == "none" || strings.HasPrefix(v, "ns:") || strings.HasPrefix(v, "container:") {
			return nil
		}
		return fmt.Errorf("network %q: only none, ns:<path> and container:<id> leave the host's rules alone", v)
	}
	return errors.New("no --network given: podman's default bridge would add nat rules to the host's namespace")
}

// stop removes every pod and container of the service, checks none is
// left, and stops the service by its PID.
func (p *Podman) stop() {
	t := p.t
	for _, args := range [][]string{{"pod", "rm", "-a", "-f", "-t", "0"}, {"rm", "-a", "-f", "-t", "0"}} {
		if _, err := p.Command(args...); err != nil {
			t.Errorf("removing what the test left: %v", err)
		}
	}
	if out, err := p.Command("ps", "-a", "-q"); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("podman containers left after removal: %v: %s", err, out)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Errorf("podman system service did not exit within 30s of SIGTERM; killing it")
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	if t.Failed() {
		t.Logf("podman system service logs:\n%s", p.logs.String())
	}
}
