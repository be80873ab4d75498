// Command register puts the published ports of a Docker host's containers
// into Consul the way Registrator does, so that the workflow connectable was
// made for (Consul + Registrator + containers started with -P) runs and is
// tested where Registrator itself cannot be had: the Go module proxy refuses
// its module. It is a test and example helper, not part of the daemon; the
// README's Compose example (e2e/testdata/compose) runs it, and
// e2e/compose_test.go runs that file.
//
// What it registers follows Registrator's consul backend with its defaults
// (-internal=false, -deregister=always):
//
//   - Each published port of a running container is one Consul service:
//     ID HOSTNAME:CONTAINER:PORT (":udp" appended for UDP), address the host
//     address the port is published on (-ip where that is 0.0.0.0, ::, or
//     empty), port the published host port.
//   - Its name is SERVICE_<port>_NAME, else SERVICE_NAME, else the image's base
//     name; the last two get "-<port>" appended when the container publishes
//     several ports. SERVICE_[<port>_]IGNORE skips the port and
//     SERVICE_[<port>_]TAGS (comma-separated) become tags. They are read from
//     the container's labels and environment, the environment winning.
//   - A container's services are deregistered when it dies or is removed.
//
// One difference: on a user-defined network Registrator registers the
// container's own address on that network with the host port, a pair that
// reaches nothing; register always uses the address the port is published on.
//
// It follows the engine's events and, every -resync, reconciles the
// registrations with the running containers, so a Consul agent that starts
// later or restarts, or a missed event, is caught up.
//
// Typical usage (the Docker socket mounted, Consul's HTTP API reachable):
//
//	register -consul http://198.18.150.2:8500
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"
)

func main() {
	consul := flag.String("consul", "http://127.0.0.1:8500", "Consul agent's HTTP API")
	hostIP := flag.String("ip", "", "address to register for ports published on every host address (0.0.0.0 or ::)")
	resync := flag.Duration("resync", 5*time.Second, "interval of the full reconciliation with the running containers")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if flag.NArg() > 0 {
		log.Error("unexpected arguments", "args", flag.Args())
		os.Exit(2)
	}
	if *resync <= 0 {
		log.Error("-resync must be positive", "resync", *resync)
		os.Exit(2)
	}
	hostname, err := os.Hostname()
	if err != nil {
		log.Error("reading the host name", "err", err)
		os.Exit(1)
	}
	client, err := dockerapi.NewClientFromEnv()
	if err != nil {
		log.Error("connecting to the Docker Engine", "err", err)
		os.Exit(1)
	}
	r := &registrar{
		docker:   client,
		consul:   &consulAgent{url: *consul, http: &http.Client{Timeout: 5 * time.Second}},
		hostname: hostname,
		hostIP:   *hostIP,
		resync:   *resync,
		log:      log,
		known:    map[string][]service{},
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log.Info("register starting", "consul", *consul, "hostname", hostname, "ip", *hostIP)
	if err := r.run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("register stopped", "err", err)
		os.Exit(1)
	}
}

// registrar owns the registrations of one Docker host's containers.
type registrar struct {
	docker   *dockerapi.Client
	consul   *consulAgent
	hostname string
	hostIP   string
	resync   time.Duration
	log      *slog.Logger

	// known maps a container ID to the services last registered for it;
	// only run's goroutine touches it.
	known map[string][]service
}

// run follows the engine until ctx ends. It subscribes to events before the
// first full sync, so that nothing that happens during the listing is lost.
func (r *registrar) run(ctx context.Context) error {
	for {
		events := make(chan *dockerapi.APIEvents, 256)
		opts := dockerapi.EventsOptions{Filters: map[string][]string{
			"type": {"container"}, "event": {"start", "die", "destroy"},
		}}
		if err := r.docker.AddEventListenerWithOptions(opts, events); err != nil {
			r.log.Warn("subscribing to Docker events", "err", err)
		} else {
			r.follow(ctx, events)
			_ = r.docker.RemoveEventListener(events)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// follow handles events until ctx ends or the client gives up on the
// stream (it closes the channel), resyncing every r.resync.
func (r *registrar) follow(ctx context.Context, events chan *dockerapi.APIEvents) {
	r.sync(ctx)
	tick := time.NewTicker(r.resync)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			r.sync(ctx)
		case ev, ok := <-events:
			if !ok {
				r.log.Warn("Docker event stream ended; subscribing again")
				return
			}
			switch ev.Action {
			case "start":
				r.add(ctx, ev.Actor.ID)
			case "die", "destroy":
				r.remove(ctx, ev.Actor.ID)
			}
		}
	}
}

// sync registers every running container's services and deregisters those
// of containers that no longer run. Registering again what Consul holds
// already changes nothing there.
func (r *registrar) sync(ctx context.Context) {
	list, err := r.docker.ListContainers(dockerapi.ListContainersOptions{Context: ctx})
	if err != nil {
		r.log.Warn("listing containers", "err", err)
		return
	}
	running := map[string]bool{}
	for _, c := range list {
		running[c.ID] = true
		r.add(ctx, c.ID)
	}
	for id := range r.known {
		if !running[id] {
			r.remove(ctx, id)
		}
	}
}

// add registers the services of one container, if it runs.
func (r *registrar) add(ctx context.Context, id string) {
	c, err := r.docker.InspectContainerWithOptions(dockerapi.InspectContainerOptions{ID: id, Context: ctx})
	var gone *dockerapi.NoSuchContainer
	switch {
	case errors.As(err, &gone):
		r.remove(ctx, id)
		return
	case err != nil:
		r.log.Warn("inspecting container", "container", short(id), "err", err)
		return
	case !c.State.Running:
		r.remove(ctx, id)
		return
	}
	want := services(c, r.hostname, r.hostIP)
	// A port that stopped being published (it cannot, but a renamed
	// service can be) leaves with its old registration.
	for _, old := range r.known[id] {
		if !contains(want, old.ID) {
			r.deregister(ctx, id, old)
		}
	}
	var kept []service
	for _, s := range want {
		if err := r.consul.register(ctx, s); err != nil {
			r.log.Warn("registering service", "container", short(id), "service", s.ID, "err", err)
			continue
		}
		if !contains(r.known[id], s.ID) {
			r.log.Info("added", "container", short(id), "service", s.ID, "name", s.Name, "address", fmt.Sprintf("%s:%d", s.Address, s.Port))
		}
		kept = append(kept, s)
	}
	if len(kept) == 0 {
		delete(r.known, id)
		return
	}
	r.known[id] = kept
}

// remove deregisters what was registered for one container.
func (r *registrar) remove(ctx context.Context, id string) {
	var failed []service
	for _, s := range r.known[id] {
		if !r.deregister(ctx, id, s) {
			failed = append(failed, s)
		}
	}
	if len(failed) > 0 {
		// Tried again at the next sync, since the container is not running.
		r.known[id] = failed
		return
	}
	delete(r.known, id)
}

func (r *registrar) deregister(ctx context.Context, id string, s service) bool {
	if err := r.consul.deregister(ctx, s.ID); err != nil {
		r.log.Warn("deregistering service", "container", short(id), "service", s.ID, "err", err)
		return false
	}
	r.log.Info("removed", "container", short(id), "service", s.ID)
	return true
}

func contains(ss []service, id string) bool {
	for _, s := range ss {
		if s.ID == id {
			return true
		}
	}
	return false
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
