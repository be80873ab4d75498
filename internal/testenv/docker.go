package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BusyboxImageName is the local image BusyboxImage builds. It never comes
// from a registry: the test engine has none.
const BusyboxImageName = "connectable-test/busybox:latest"

// TestLabel marks every container RunContainer starts, so a leftover one is
// easy to find (docker ps -a --filter label=connectable.test=1).
const TestLabel = "connectable.test=1"

// BusyboxImage returns the name of a tiny local image holding Debian's static
// busybox, its applets linked under /bin, and /bin/sh as its command. The
// image is built from the host's busybox on first use and kept for later
// runs; concurrent callers, in this process or in other test binaries,
// serialise on a lock file so it is built once.
func BusyboxImage(t testing.TB) string {
	t.Helper()
	NeedDocker(t)
	NeedCommand(t, "busybox")
	name, err := EnsureBusyboxImage()
	if err != nil {
		t.Fatalf("building %s: %v", BusyboxImageName, err)
	}
	return name
}

// EnsureBusyboxImage is BusyboxImage for programs that are not tests, such
// as the benchmark.
func EnsureBusyboxImage() (string, error) {
	lock, err := os.OpenFile(filepath.Join(os.TempDir(), "connectable-test-busybox.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", fmt.Errorf("opening image build lock: %w", err)
	}
	defer lock.Close()
	// The lock is released when the file is closed, so a crashed test can
	// never leave it held.
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("locking image build lock: %w", err)
	}
	if exec.Command("docker", "image", "inspect", BusyboxImageName).Run() == nil {
		return BusyboxImageName, nil
	}
	return BusyboxImageName, buildBusyboxImage()
}

// buildBusyboxImage streams a root file system straight into docker import,
// so nothing is left on disk.
func buildBusyboxImage() error {
	rootfs, err := busyboxRootFS(nil)
	if err != nil {
		return err
	}
	cmd := exec.Command("docker", "import", "--change", `CMD ["/bin/sh"]`, "-", BusyboxImageName)
	cmd.Stdin = rootfs
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("docker import: %w: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// busyboxRootFS returns, as a tar archive, a root file system holding the
// host's static busybox with its applets linked under /bin, and the extra
// executable files (path → content).
func busyboxRootFS(extra map[string]string) (*bytes.Buffer, error) {
	path, err := exec.LookPath("busybox")
	if err != nil {
		return nil, err
	}
	bin, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading busybox: %w", err)
	}
	out, err := exec.Command(path, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("listing busybox applets: %w", err)
	}

	var rootfs bytes.Buffer
	tw := tar.NewWriter(&rootfs)
	now := time.Now()
	for _, dir := range []string{"bin/", "etc/", "tmp/", "proc/", "sys/", "dev/", "root/", "var/", "usr/", "usr/bin/", "sbin/"} {
		mode := int64(0o755)
		if dir == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: mode, ModTime: now}); err != nil {
			return nil, err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755, Size: int64(len(bin)), ModTime: now}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, err
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + applet, Linkname: "busybox", Mode: 0o777, ModTime: now}); err != nil {
			return nil, err
		}
	}
	passwd := []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
	group := []byte("root:x:0:\nnogroup:x:65534:\n")
	for name, data := range map[string][]byte{"etc/passwd": passwd, "etc/group": group} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: now}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	for name, data := range extra {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o755, Size: int64(len(data)), ModTime: now}); err != nil {
			return nil, err
		}
		if _, err := tw.Write([]byte(data)); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return &rootfs, nil
}

// DockerTimeout bounds one docker command of a test. The engine here answers
// in well under a second; one that has not answered in minutes is stuck. The
// Docker 20.10 engine of this machine's kind can deadlock for good when
// containers exit at the same moment: a lock-order cycle in libnetwork between
// two exits' network clean-ups (getNetworksFromStore against getSvcRecords),
// of the kind reported in moby/moby#46661. Seen here once, on 20.10.24, in
// `docker rm -f` of 50 containers at once.
const DockerTimeout = 2 * time.Minute

// ErrDockerStuck is the error of a docker command that outlived DockerTimeout.
var ErrDockerStuck = errors.New("the Docker engine looks stuck (20.10 can deadlock when containers exit at once, " +
	"moby/moby#46661); kill -USR1 dockerd for its goroutine dump, and restart it")

// Docker runs the docker CLI and returns what it printed on stdout. A failure
// carries its stderr, and a command that outlives DockerTimeout is killed and
// reported as the engine being stuck, with what to do about it, rather than
// hanging the test binary until go test's own timeout.
func Docker(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), DockerTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	switch {
	case ctx.Err() != nil:
		return stdout.Bytes(), fmt.Errorf("docker %s: no answer within %v: %w", strings.Join(args, " "), DockerTimeout, ErrDockerStuck)
	case err != nil:
		return stdout.Bytes(), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.Bytes(), nil
}

// RemoveContainers removes containers with docker rm -f, one at a time:
// each removal returns once the engine has cleaned the container's network
// up, so no two of them run that clean-up at once (see DockerTimeout). A
// container that is gone already is not an error.
func RemoveContainers(ids ...string) error {
	var errs []error
	for _, id := range ids {
		if _, err := Docker("rm", "-f", id); err != nil && !strings.Contains(err.Error(), "No such container") {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// RunContainer runs `docker run -d --label connectable.test=1 <args>` and
// returns the new container's full ID. The container is removed (docker rm
// -f) when the test ends, also when docker run itself fails after creating
// it: unless args name it (--name), it gets a random name to find it by.
func RunContainer(t testing.TB, args ...string) string {
	t.Helper()
	NeedDocker(t)
	name := containerName(args)
	full := []string{"run", "-d", "--label", TestLabel}
	if name == "" {
		name = RandomName("cnt-test-")
		full = append(full, "--name", name)
	}
	full = append(full, args...)
	t.Cleanup(func() {
		if err := RemoveContainers(name); err != nil {
			t.Error(err)
		}
	})
	out, err := Docker(full...)
	if err != nil {
		t.Fatal(err)
	}
	id := strings.TrimSpace(string(out))
	if id == "" {
		t.Fatalf("docker %s printed no container ID", strings.Join(full, " "))
	}
	return id
}

// containerName returns the name args give with --name, or "". It does not
// tell options from the command's own arguments: tests just avoid passing
// "--name" to the command.
func containerName(args []string) string {
	for i, a := range args {
		switch {
		case a == "--name" && i+1 < len(args):
			return args[i+1]
		case strings.HasPrefix(a, "--name="):
			return strings.TrimPrefix(a, "--name=")
		}
	}
	return ""
}
