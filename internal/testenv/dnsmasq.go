package testenv

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// SRV is one SRV record that Dnsmasq serves.
type SRV struct {
	Name, Target           string
	Port, Priority, Weight uint16
}

// DNSServer is Debian's dnsmasq serving on a loopback port, UDP and TCP.
type DNSServer struct {
	Addr string // 127.0.0.1:Port
	Port int
	stop func()
}

// Stop stops dnsmasq (by PID) and waits for it to exit; it is also stopped
// when the test ends. Stopping twice is harmless.
func (d *DNSServer) Stop() { d.stop() }

// Records returns the dnsmasq arguments that serve srvs, and hosts (name →
// IPv4/IPv6 addresses, which dnsmasq also puts in the additional section of
// SRV answers).
func Records(srvs []SRV, hosts map[string][]string) []string {
	var args []string
	for _, s := range srvs {
		args = append(args, fmt.Sprintf("--srv-host=%s,%s,%d,%d,%d", s.Name, s.Target, s.Port, s.Priority, s.Weight))
	}
	for name, addrs := range hosts {
		args = append(args, "--host-record="+name+","+strings.Join(addrs, ","))
	}
	return args
}

// Dnsmasq starts dnsmasq on a free loopback port serving exactly the given
// records and returns its address.
func Dnsmasq(t testing.TB, srvs []SRV, hosts map[string][]string) string {
	t.Helper()
	return StartDnsmasq(t, 0, Records(srvs, hosts)...).Addr
}

// StartDnsmasq runs dnsmasq in the foreground on 127.0.0.1:port (a free
// port if 0; a fixed one lets a test start a server again where a stopped
// one was) with args added to a configuration that reads nothing from the
// machine. It returns once the server accepts connections.
func StartDnsmasq(t testing.TB, port int, args ...string) *DNSServer {
	t.Helper()
	NeedCommand(t, "dnsmasq")
	base := []string{"--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
		"--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", "--pid-file=", "--log-facility=-"}
	for attempt := 1; ; attempt++ {
		p := port
		if p == 0 {
			p = freePort(t)
		}
		d, out, err := runDnsmasq(t, p, append(base, args...))
		if err == nil {
			return d
		}
		// A free port can be taken by another process before dnsmasq
		// binds it; only then is another try worth it.
		if port == 0 && attempt < 5 && strings.Contains(out, "in use") {
			continue
		}
		t.Fatalf("dnsmasq on port %d: %v\n%s", p, err, out)
	}
}

func runDnsmasq(t testing.TB, port int, args []string) (*DNSServer, string, error) {
	cmd := exec.Command("dnsmasq", append(args, "--port="+strconv.Itoa(port))...)
	var out SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			<-exited
		})
	}
	t.Cleanup(stop)
	d := &DNSServer{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), Port: port, stop: stop}
	// dnsmasq binds TCP and UDP together once its configuration is loaded:
	// a TCP connection proves it serves.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		select {
		case <-exited:
			return nil, out.String(), fmt.Errorf("dnsmasq exited")
		default:
		}
		if c, err := net.DialTimeout("tcp", d.Addr, time.Second); err == nil {
			c.Close()
			return d, out.String(), nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	return nil, out.String(), fmt.Errorf("dnsmasq never answered on %s", d.Addr)
}

// freePort returns a loopback port that was free for both UDP and TCP a
// moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	for range 50 {
		u, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		port := u.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		u.Close()
		if err == nil {
			l.Close()
			return port
		}
	}
	t.Fatalf("no loopback port free for both UDP and TCP")
	return 0
}
