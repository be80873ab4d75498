package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/resolver"
	"github.com/connectable/connectable/sockpath"
)

// resolveCmd prints the endpoints one new connection to args[0] would try.
func resolveCmd(ctx context.Context, c *config, args []string, stdout, stderr io.Writer) int {
	if len(args) != 1 {
		fmt.Fprintln(stderr, "connectable: usage: connectable resolve NAME [--dns ADDR[,ADDR...]]")
		return 2
	}
	if err := resolver.Validate(args[0]); err != nil {
		fmt.Fprintf(stderr, "connectable: %v\n", err)
		return 2
	}
	r, err := newResolver(c, newLogger(c, stderr))
	if err != nil {
		fmt.Fprintf(stderr, "connectable: %v\n", err)
		return 1
	}
	eps, err := r.Lookup(ctx, args[0])
	if err != nil {
		fmt.Fprintf(stderr, "connectable: %v\n", err)
		return 1
	}
	for _, ep := range eps {
		fmt.Fprintln(stdout, ep)
	}
	return 0
}

// statusCmd prints a running daemon's /status as a table.
func statusCmd(ctx context.Context, c *config, args []string, stdout, stderr io.Writer) int {
	if len(args) != 0 || c.admin == "" {
		fmt.Fprintln(stderr, "connectable: usage: connectable status [--admin HOST:PORT]")
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.admin+"/status", nil)
	if err != nil {
		fmt.Fprintf(stderr, "connectable: %v\n", err)
		return 2
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "connectable: is the daemon running with --admin %s? %v\n", c.admin, err)
		return 1
	}
	defer resp.Body.Close()
	var st admin.Status
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "connectable: %s/status answered %s\n", c.admin, resp.Status)
		return 1
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		fmt.Fprintf(stderr, "connectable: reading %s/status: %v\n", c.admin, err)
		return 1
	}
	if err := admin.WriteTable(stdout, st); err != nil {
		return 1
	}
	return 0
}

// cleanupCmd removes what the socket path leaves in the kernel when the
// daemon stops: the links under --bpf-dir (so its programs are detached
// from the cgroup2 root) and the maps. It refuses while a daemon holds
// --bpf-dir.
func cleanupCmd(c *config, args []string, stdout, stderr io.Writer) int {
	if len(args) != 0 {
		fmt.Fprintln(stderr, "connectable: usage: connectable cleanup [--bpf-dir DIR]")
		return 2
	}
	removed, err := sockpath.Cleanup(c.bpfDir)
	if errors.Is(err, sockpath.ErrLocked) {
		fmt.Fprintf(stderr, "connectable: %v; stop the daemon first (SIGTERM), then run cleanup\n", err)
		return 1
	}
	if err != nil {
		fmt.Fprintf(stderr, "connectable: cleaning up %s: %v\n", c.bpfDir, err)
		return 1
	}
	if len(removed) == 0 {
		fmt.Fprintf(stdout, "nothing pinned at %s\n", c.bpfDir)
		return 0
	}
	fmt.Fprintf(stdout, "removed %d pins from %s (the socket path's programs are detached): %s\n", len(removed), c.bpfDir, strings.Join(removed, " "))
	return 0
}
