package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"

	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/iptables"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/sockpath"
)

// cleanupCmd removes what a stopped daemon leaves for the next start: the
// socket path's links under --bpf-dir (so its programs are detached from
// the cgroup2 root) and its maps, and the relay's rules in the running
// containers of the engine at --docker-host. It refuses while a daemon
// runs: one that holds --bpf-dir, or answers on --admin.
func cleanupCmd(c *config, args []string, stdout, stderr io.Writer) int {
	if len(args) != 0 {
		fmt.Fprintln(stderr, "connectable: usage: connectable cleanup [--bpf-dir DIR] [--docker-host URL] [--admin ADDR] [--iptables BACKEND]")
		return 2
	}
	if c.admin != "" {
		if conn, err := net.DialTimeout("tcp", c.admin, time.Second); err == nil {
			conn.Close()
			fmt.Fprintf(stderr, "connectable: a daemon answers on --admin %s; stop the daemon first (SIGTERM), then run cleanup\n", c.admin)
			return 1
		}
	}
	code := 0
	removed, err := sockpath.Cleanup(c.bpfDir)
	switch {
	case errors.Is(err, sockpath.ErrLocked):
		fmt.Fprintf(stderr, "connectable: %v; stop the daemon first (SIGTERM), then run cleanup\n", err)
		return 1
	case err != nil:
		fmt.Fprintf(stderr, "connectable: cleaning up %s: %v\n", c.bpfDir, err)
		code = 1
	case len(removed) == 0:
		fmt.Fprintf(stdout, "nothing pinned at %s\n", c.bpfDir)
	default:
		fmt.Fprintf(stdout, "removed %d pins from %s (the socket path's programs are detached): %s\n", len(removed), c.bpfDir, strings.Join(removed, " "))
	}
	nat, err := iptables.New(iptables.Config{Backend: c.iptables, Logger: newLogger(c, stderr)})
	if err != nil {
		fmt.Fprintf(stderr, "connectable: the relay's rules stay: setting up iptables: %v\n", err)
		return 1
	}
	cleared, err := clearRelayRules(nat, c.dockerHost)
	if err != nil {
		fmt.Fprintf(stderr, "connectable: removing the relay's rules: %v\n", err)
		code = 1
	}
	if len(cleared) == 0 {
		fmt.Fprintln(stdout, "no relay rules in any running container")
	} else {
		fmt.Fprintf(stdout, "removed the relay's rules from the network namespaces of %d containers: %s\n", len(cleared), strings.Join(cleared, " "))
	}
	return code
}

// clearRelayRules removes the relay's rules from the network namespace of
// every running container of the engine at host, and returns the
// containers whose namespace it cleared. A container that stops meanwhile
// took its rules with it.
func clearRelayRules(nat *iptables.NAT, host string) ([]string, error) {
	client, err := docker.NewClient(host)
	if err != nil {
		return nil, fmt.Errorf("connecting to Docker: %w", err)
	}
	list, err := client.ListContainers(dockerapi.ListContainersOptions{})
	if err != nil {
		return nil, fmt.Errorf("listing the containers of %s: %w", client.Endpoint(), err)
	}
	// The daemon never sets up its own namespace (the host's, with
	// --network=host): containers in it are not looked at.
	seen := map[uint64]bool{}
	var self syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &self); err == nil {
		seen[self.Ino] = true
	}
	var cleared []string
	var errs []error
	for _, lc := range list {
		c, err := client.InspectContainerWithOptions(dockerapi.InspectContainerOptions{ID: lc.ID})
		if err != nil || c.State.Pid == 0 {
			continue // gone, or not running any more
		}
		path := fmt.Sprintf("/proc/%d/ns/net", c.State.Pid)
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil || seen[st.Ino] {
			continue
		}
		seen[st.Ino] = true
		// Cleared whatever Port finds: a crash can leave a guard without
		// its redirect rules.
		port, err := nat.Port(path)
		if err == nil {
			err = nat.Clear(path)
		}
		if err == nil && port != 0 {
			cleared = append(cleared, lc.ID[:min(12, len(lc.ID))])
		}
		if err != nil && !netns.Gone(path) {
			errs = append(errs, fmt.Errorf("container %.12s: %w", lc.ID, err))
		}
	}
	return cleared, errors.Join(errs...)
}
