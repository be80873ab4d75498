package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/connectable/connectable/admin"
	"github.com/connectable/connectable/resolver"
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
