package docker_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"

	"github.com/connectable/connectable/docker"
)

// printSink shows the desired state a real Sink (the reconciler) is handed.
type printSink struct{}

func (printSink) Desire(namespaces []docker.Namespace) {
	for _, ns := range namespaces {
		fmt.Println(ns.Key[:12], ns.Path, ns.Routes, ns.Containers)
	}
}

func ExampleNewWatcher() {
	client, err := docker.NewClient("") // DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	w := docker.NewWatcher(docker.Config{
		Client: client,
		Sink:   printSink{},
		SelfID: docker.SelfContainerID(), // "" on the host
		Logger: slog.Default(),
	})
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := w.Run(ctx); err != nil { // returns nil when ctx ends
		fmt.Fprintln(os.Stderr, err)
	}
}

func ExampleParseRoutes() {
	routes, errs := docker.ParseRoutes(map[string]string{
		"connect.6000":     "redis.service.consul",
		"connect.70000":    "too-big",
		"connect.abc":      "x",
		"connectable.test": "1", // not ours: ignored
	}, nil)
	fmt.Println(routes)
	for _, err := range errs {
		fmt.Println(err)
	}
	// Output:
	// map[6000:redis.service.consul]
	// label connect.70000="too-big": port "70000": out of range 1-65535 (a port is a decimal number from 1 to 65535, no sign, no leading zero)
	// label connect.abc="x": port "abc": not a decimal number (a port is a decimal number from 1 to 65535, no sign, no leading zero)
}
