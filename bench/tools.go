package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// tool is one program the benchmark runs and the Debian package holding it.
type tool struct{ cmd, pkg string }

var tools = []tool{
	{"haproxy", "haproxy"},
	{"nginx", "nginx"},
	{"ab", "apache2-utils"},
	{"wrk", "wrk"},
	{"iperf3", "iperf3"},
	{"dnsmasq", "dnsmasq-base"},
	{"busybox", "busybox-static"},
	{"nsenter", "util-linux"},
	{"ip", "iproute2"},
	{"iptables-nft", "iptables"},
	{"docker", "docker.io"},
}

// streamModule is where Debian's libnginx-mod-stream puts nginx's stream
// module.
const streamModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

// missingTools names every tool that is not installed.
func missingTools() []string {
	var missing []string
	for _, t := range tools {
		if _, err := exec.LookPath(t.cmd); err != nil {
			missing = append(missing, t.cmd)
		}
	}
	if _, err := exec.LookPath("nginx"); err == nil && streamLoadModule() == "" && !nginxHasStaticStream() {
		missing = append(missing, "nginx stream module")
	}
	return missing
}

// packagesFor maps missing tools to the Debian packages that hold them.
func packagesFor(missing []string) []string {
	var pkgs []string
	for _, m := range missing {
		if m == "nginx stream module" {
			pkgs = append(pkgs, "libnginx-mod-stream")
			continue
		}
		for _, t := range tools {
			if t.cmd == m {
				pkgs = append(pkgs, t.pkg)
			}
		}
	}
	return pkgs
}

// streamLoadModule returns the load_module line nginx needs for the stream
// module, or "" when there is no dynamic module to load.
func streamLoadModule() string {
	if _, err := os.Stat(streamModule); err == nil {
		return "load_module " + streamModule + ";"
	}
	return ""
}

func nginxHasStaticStream() bool {
	out, _ := exec.Command("nginx", "-V").CombinedOutput()
	return bytes.Contains(out, []byte("--with-stream ")) || bytes.HasSuffix(bytes.TrimSpace(out), []byte("--with-stream"))
}

// install apt-get installs every package the benchmark uses. Debian's
// nginx and haproxy packages start services of their own on systemd hosts;
// the benchmark uses neither (it runs its own instances with its own
// configuration inside its namespaces).
func install() error {
	pkgs := []string{"haproxy", "nginx", "libnginx-mod-stream", "apache2-utils", "wrk", "iperf3",
		"dnsmasq-base", "busybox-static", "util-linux", "iproute2", "iptables"}
	logf("apt-get update && apt-get install %s", strings.Join(pkgs, " "))
	for _, argv := range [][]string{
		{"apt-get", "update", "-q"},
		append([]string{"apt-get", "install", "-y", "-q", "--no-install-recommends"}, pkgs...),
	} {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s: %w", strings.Join(argv, " "), err)
		}
	}
	return nil
}

// command runs argv to completion and returns its combined output; the
// error quotes the output's start.
func command(ctx context.Context, argv ...string) (string, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := bytes.TrimSpace(out)
		if len(msg) > 600 {
			msg = append(msg[:600:600], "..."...)
		}
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, msg)
	}
	return string(out), nil
}

// commandTimeout is command bounded by d.
func commandTimeout(ctx context.Context, d time.Duration, argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return command(ctx, argv...)
}

// firstLine returns the first non-empty line of the output of argv, whatever
// its exit status (wrk -v exits 1).
func firstLine(argv ...string) string {
	out, _ := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	for _, l := range strings.Split(string(out), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			return l
		}
	}
	return "?"
}

// collectVersions records the version of every contender and tool.
func (b *bench) collectVersions(ctx context.Context) error {
	if _, err := os.Stat(b.cfg.connectable); err != nil {
		return fmt.Errorf("connectable binary: %w (run make build)", err)
	}
	b.versions = [][2]string{
		{"connectable", firstLine(b.cfg.connectable, "version")},
		{"HAProxy", firstLine("haproxy", "-v")},
		{"nginx", firstLine("nginx", "-v")},
		{"ab", firstLine("ab", "-V")},
		{"wrk", firstLine("wrk", "-v")},
		{"iperf3", firstLine("iperf3", "-v")},
		{"dnsmasq", firstLine("dnsmasq", "--version")},
		{"Docker Engine", firstLine("docker", "version", "--format", "{{.Server.Version}}")},
		{"kernel", strings.TrimSpace(readFile("/proc/sys/kernel/osrelease"))},
	}
	return ctx.Err()
}

func readFile(path string) string {
	data, _ := os.ReadFile(path)
	return string(data)
}

func loadAvg() string {
	f := strings.Fields(readFile("/proc/loadavg"))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func cpuModel() string {
	for _, l := range strings.Split(readFile("/proc/cpuinfo"), "\n") {
		if strings.HasPrefix(l, "model name") {
			if i := strings.Index(l, ":"); i >= 0 {
				return strings.TrimSpace(l[i+1:])
			}
		}
	}
	return "?"
}
