package testenv

import (
	"archive/tar"
	"bytes"
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
	path, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	bin, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading busybox: %w", err)
	}
	out, err := exec.Command(path, "--list").Output()
	if err != nil {
		return fmt.Errorf("listing busybox applets: %w", err)
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
			return err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755, Size: int64(len(bin)), ModTime: now}); err != nil {
		return err
	}
	if _, err := tw.Write(bin); err != nil {
		return err
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + applet, Linkname: "busybox", Mode: 0o777, ModTime: now}); err != nil {
			return err
		}
	}
	passwd := []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
	group := []byte("root:x:0:\nnogroup:x:65534:\n")
	for name, data := range map[string][]byte{"etc/passwd": passwd, "etc/group": group} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: now}); err != nil {
			return err
		}
		if _, err := tw.Write(data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}

	cmd := exec.Command("docker", "import", "--change", `CMD ["/bin/sh"]`, "-", BusyboxImageName)
	cmd.Stdin = &rootfs
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("docker import: %w: %s", err, bytes.TrimSpace(out))
	}
	return nil
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
		if out, err := exec.Command("docker", "rm", "-f", name).CombinedOutput(); err != nil &&
			!bytes.Contains(out, []byte("No such container")) {
			t.Errorf("docker rm -f %s: %v: %s", name, err, bytes.TrimSpace(out))
		}
	})
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("docker", full...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("docker %s: %v: %s", strings.Join(full, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	id := strings.TrimSpace(stdout.String())
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
