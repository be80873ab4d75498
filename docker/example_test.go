package docker_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"

	"github.com/connectable/connectable/docker"
)

// printSink shows what a real Sink (the proxy server) would be asked to do.
type printSink struct{}

func (printSink) Apply(_ context.Context, key, netns string, routes map[uint16]string) error {
	fmt.Println("apply", key[:12], netns, routes)
	return nil
}

func (printSink) Remove(_ context.Context, key string) error {
	fmt.Println("remove", key[:12])
	return nil
}

func ExampleNewWatcher() {
	client, err := docker.NewClient() // DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH
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
	// label connect.70000="too-big": port is not a decimal number from 1 to 65535
	// label connect.abc="x": port is not a decimal number from 1 to 65535
}
