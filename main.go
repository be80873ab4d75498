// Command connectable lets software inside a Docker container reach a service
// at localhost:<port>, as the container's connect.<port>=<service> labels say.
// See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run is main without the process: it returns the exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	sub := ""
	if len(args) > 0 && args[0] == "runtime" { // runc's arguments follow: not ours to parse
		return runtimeCmd(args[1:], getenv, stderr)
	}
	if len(args) > 0 && args[0] == "hook-config" {
		return hookConfigCmd(args[1:], stdout, stderr)
	}
	if len(args) > 0 && (args[0] == "resolve" || args[0] == "status" || args[0] == "cleanup" || args[0] == "version" || args[0] == "hook") {
		sub, args = args[0], args[1:]
	}
	if sub == "version" {
		fmt.Fprintln(stdout, "connectable", version)
		return 0
	}
	c, positional, err := parseConfig("connectable", args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "connectable: %v\n", err)
		return 2
	}
	switch {
	case sub == "resolve":
		return resolveCmd(ctx, c, positional, stdout, stderr)
	case sub == "status":
		return statusCmd(ctx, c, positional, stdout, stderr)
	case sub == "cleanup":
		return cleanupCmd(c, positional, stdout, stderr)
	case sub == "hook":
		return hookCmd(ctx, c, os.Stdin, stderr)
	case len(positional) > 0:
		fmt.Fprintf(stderr, "connectable: unknown command %q (see --help)\n", positional[0])
		return 2
	}
	if err := daemon(ctx, c, setProcs(getenv), stderr); err != nil {
		fmt.Fprintf(stderr, "connectable: %v\n", err)
		return 1
	}
	return 0
}
