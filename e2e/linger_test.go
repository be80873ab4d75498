package e2e

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestLingerAfterLastLabel: the labelled member of a container: group
// leaves while the unlabelled owner lives on, with a relayed connection
// open. The connection is not reset: the namespace keeps its rules and
// listener until it ends, and they go then.
func TestLingerAfterLastLabel(t *testing.T) {
	prerequisites(t)
	echoBe := testenv.StartBackend(t, testenv.Echo)
	srvs, hosts := srvRecord("echo.service.test", "echo.node.test", echoBe.Port())
	d := startDaemon(t, testenv.Dnsmasq(t, srvs, hosts))
	owner := container(t)
	member := container(t, "--network", "container:"+owner, "-l", "connect.7000=echo.service.test")
	ns := netnsOf(t, owner)
	var (
		conn net.Conn
		r    *bufio.Reader
	)
	echo := func(line string) error {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := fmt.Fprintln(conn, line); err != nil {
			return err
		}
		got, err := r.ReadString('\n')
		if err == nil && got != line+"\n" {
			err = fmt.Errorf("echoed %q", got)
		}
		return err
	}
	eventually(t, 30*time.Second, "the echo service relayed", func() error {
		c, err := dialIn(ns, "127.0.0.1:7000", 5*time.Second)
		if err != nil {
			return err
		}
		conn, r = c, bufio.NewReader(c)
		if err := echo("before"); err != nil {
			c.Close()
			return err
		}
		return nil
	})
	defer conn.Close()

	if err := testenv.RemoveContainers(member); err != nil {
		t.Fatal(err)
	}
	if !d.waitLog("namespace no longer labelled; its rules and listener stay", 30*time.Second) {
		t.Fatal("the daemon did not keep the namespace of the live connection")
	}
	for i := range 5 {
		if err := echo(fmt.Sprintf("after %d", i)); err != nil {
			t.Fatalf("the relayed connection after its namespace lost its last label: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(rulesIn(t, owner, "iptables", "nft")+rulesIn(t, owner, "iptables", "legacy"), "REDIRECT") {
		t.Errorf("the rules left while the connection lives")
	}

	conn.Close()
	if !d.waitLog("namespace removed after its last relayed connection ended", 30*time.Second) {
		t.Fatal("the namespace was not removed once its connection ended")
	}
	eventually(t, 10*time.Second, "the rules gone", func() error {
		if out := rulesIn(t, owner, "iptables", "nft") + rulesIn(t, owner, "iptables", "legacy"); strings.Contains(out, "REDIRECT") {
			return fmt.Errorf("rules left:\n%s", out)
		}
		return nil
	})
}
