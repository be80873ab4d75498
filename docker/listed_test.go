package docker

import (
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
)

// TestListedAfterFullState: Listed is called once the first listing's
// containers are handed over (also when there are none), and the
// reconciler told Full then settles once they are set up.
func TestListedAfterFullState(t *testing.T) {
	testenv.CheckGoroutines(t)
	for _, n := range []int{0, 2} {
		f := newFakeEngine()
		sink := newRecordingSink()
		sink.keys = nil
		var ids []string
		for i := range n {
			ids = append(ids, f.add("c"+string(rune('a'+i)), "", map[string]string{"connect.6000": "a"}))
		}
		w, _ := newFakeWatcher(t, f, sink, never)
		listed := make(chan struct{}, 8)
		w.cfg.Listed = func() {
			if n > 0 && len(w.Namespaces()) != n {
				t.Errorf("Listed called with %d namespaces handed over; want %d", len(w.Namespaces()), n)
			}
			sink.rec.Full()
			listed <- struct{}{}
		}
		startWatcher(t, w)
		select {
		case <-listed:
		case <-time.After(30 * time.Second):
			t.Fatalf("%d containers: Listed not called", n)
		}
		select {
		case <-sink.rec.Settled():
		case <-time.After(30 * time.Second):
			t.Fatalf("%d containers: the reconciler did not settle", n)
		}
		for _, id := range ids {
			if _, ok := sink.current(id); !ok {
				t.Errorf("settled before %s was applied", id)
			}
		}
	}
}
