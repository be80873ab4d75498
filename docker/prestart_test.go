package docker

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	dockerapi "github.com/fsouza/go-dockerclient"
)

// emitCreate sends a create event carrying the container's labels and
// name, as Docker and Podman do.
func (f *fakeEngine) emitCreate(id, name string, labels map[string]string) {
	attrs := map[string]string{"name": name, "image": "busybox"}
	for k, v := range labels {
		attrs[k] = v
	}
	ev := &dockerapi.APIEvents{Type: "container", Action: "create", Status: "create", ID: id,
		Actor: dockerapi.APIActor{ID: id, Attributes: attrs}, TimeNano: time.Now().UnixNano()}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, l := range f.listeners {
		l <- ev
	}
}

// Prestart learns a container from its create event alone (the engine is
// never asked about it), answers an unlabelled one at once, waits for the
// event of one it does not know yet, and refuses a PID that is not the
// container's.
func TestPrestart(t *testing.T) {
	f := newFakeEngine()
	sink := newRecordingSink()
	w, logs := newFakeWatcher(t, f, sink, time.Hour)
	startWatcher(t, w)
	waitFor(t, "following events", w.Healthy, logs)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	plain := strings.Repeat("1", 64)
	f.emitCreate(plain, "plain", map[string]string{"other": "x"})
	res, err := w.Prestart(ctx, PrestartRequest{ID: plain, PID: os.Getpid()})
	if err != nil || res.Labeled || res.Key != "" {
		t.Fatalf("unlabelled: %+v, %v; want nothing to do", res, err)
	}

	// The hook before the create event: Prestart waits for it.
	late := strings.Repeat("2", 64)
	done := make(chan error, 1)
	go func() {
		res, err := w.Prestart(ctx, PrestartRequest{ID: late, PID: os.Getpid()})
		if err == nil && res.Labeled {
			err = errors.New("labelled")
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("returned %v before the create event", err)
	case <-time.After(50 * time.Millisecond):
	}
	f.emitCreate(late, "late", nil)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// A labelled container whose PID is not in its cgroup: not set up.
	labelled := strings.Repeat("3", 64)
	f.emitCreate(labelled, "labelled", map[string]string{"connect.6000": "web.service.test"})
	res, err = w.Prestart(ctx, PrestartRequest{ID: labelled, PID: os.Getpid()})
	if err == nil || !errors.Is(err, errNotContainers) || !res.Labeled {
		t.Fatalf("a PID not the container's: %+v, %v; want errNotContainers", res, err)
	}
	f.mu.Lock()
	n := f.inspects[labelled]
	f.mu.Unlock()
	if n != 0 {
		t.Errorf("the engine was asked about the container %d times; want never", n)
	}

	// Never known: Prestart gives up with its context.
	short, cancelShort := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancelShort()
	if _, err := w.Prestart(short, PrestartRequest{ID: strings.Repeat("4", 64), PID: os.Getpid()}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unknown container: %v; want the deadline", err)
	}
}

// A hook is answered while the session's first listing waits: Podman's
// listing waits for the containers that are starting, whose hooks wait
// for the watcher, so a hook served only once events are followed would
// wait out its bound whenever the stream is re-subscribed.
func TestPrestartDuringFirstListing(t *testing.T) {
	f := newFakeEngine()
	listing := make(chan struct{})
	release := make(chan struct{})
	f.onList = func() {
		close(listing)
		<-release
	}
	sink := newRecordingSink()
	w, logs := newFakeWatcher(t, f, sink, time.Hour)
	startWatcher(t, w)
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()
	<-listing

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	plain := strings.Repeat("5", 64)
	f.emitCreate(plain, "plain", map[string]string{"other": "x"})
	res, err := w.Prestart(ctx, PrestartRequest{ID: plain, PID: os.Getpid()})
	if err != nil || res.Labeled || res.Key != "" {
		t.Fatalf("during the first listing: %+v, %v; want an answer, nothing to do", res, err)
	}
	if w.Healthy() {
		t.Fatal("the watcher follows events already; the test proves nothing")
	}
	close(release)
	waitFor(t, "following events", w.Healthy, logs)
}
