package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/connectable/connectable/internal/testenv"
	"github.com/connectable/connectable/reconcile"
)

// Without what the socket path needs, auto falls back to the relay with one
// line naming the cause, and socket refuses to start with that cause.
func TestSocketPathPreflight(t *testing.T) {
	notCgroup2 := t.TempDir()
	for _, mode := range []string{"auto", "socket"} {
		t.Run(mode, func(t *testing.T) {
			var logs testenv.SyncBuffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			c := &config{datapath: mode, cgroup2: notCgroup2, bpfDir: t.TempDir() + "/bpf/connectable"}
			p, err := startSocketPath(c, log, nil, nil, nil)
			if p != nil {
				t.Fatalf("a socket path started on %s, which is no cgroup2 mount", notCgroup2)
			}
			want := notCgroup2 + " is not a cgroup2 mount"
			switch mode {
			case "auto":
				if err != nil {
					t.Fatalf("auto: %v; want the relay alone", err)
				}
				if got := logs.String(); strings.Count(got, "\n") > 1 || !strings.Contains(got, "the socket data path is off") || !strings.Contains(got, want) {
					t.Errorf("auto logged %q; want one line saying the socket path is off because %s", got, want)
				}
			case "socket":
				if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "--datapath socket") {
					t.Errorf("socket: error %v; want one naming --datapath socket and %q", err, want)
				}
			}
		})
	}
	c := &config{datapath: "relay"}
	if p, err := startSocketPath(c, slog.Default(), nil, nil, nil); p != nil || err != nil {
		t.Errorf("relay: (%v, %v); want no socket path and no error", p, err)
	}
}

// blockPath is a reconcile.Path whose Apply of a key waits for its channel.
type blockPath struct{ wait map[string]chan struct{} }

func (p blockPath) Apply(ctx context.Context, key, _ string, _ map[uint16]string) error {
	select {
	case <-p.wait[key]:
	case <-ctx.Done():
	}
	return ctx.Err()
}

func (p blockPath) Remove(context.Context, string) error { return nil }

// The first sweep waits for the engine's list and for the reconciler to
// settle, or, with a namespace stuck, for the deadline after the list.
func TestSweepWhenSettled(t *testing.T) {
	for _, stuck := range []bool{false, true} {
		done, never := make(chan struct{}), make(chan struct{})
		close(done)
		wait := map[string]chan struct{}{"a": done, "b": done}
		if stuck {
			wait["b"] = never
		}
		rec := reconcile.New(reconcile.Config{Paths: []reconcile.Path{blockPath{wait}}})
		var logs testenv.SyncBuffer
		log := slog.New(slog.NewTextHandler(&logs, nil))
		listed := make(chan struct{})
		swept := make(chan time.Time, 1)
		ctx, cancel := context.WithCancel(context.Background())
		go sweepWhenSettled(ctx, func() { swept <- time.Now() }, listed, rec, 300*time.Millisecond, log)
		rec.Desire([]reconcile.Namespace{{Key: "a", Path: "/a", Routes: map[uint16]string{1: "x"}}, {Key: "b", Path: "/b", Routes: map[uint16]string{1: "x"}}})
		select {
		case <-swept:
			t.Fatalf("stuck %v: swept before the engine's list", stuck)
		case <-time.After(100 * time.Millisecond):
		}
		rec.Full()
		at := time.Now()
		close(listed)
		select {
		case when := <-swept:
			waited := when.Sub(at)
			warned := strings.Contains(logs.String(), "before every namespace is set up")
			if stuck && (waited < 300*time.Millisecond || !warned) {
				t.Errorf("with a namespace stuck, swept %v after the list (warned %v); want at the 300ms deadline, with a warning", waited, warned)
			}
			if !stuck && warned {
				t.Errorf("settled: warned of the deadline: %s", logs.String())
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("stuck %v: not swept", stuck)
		}
		cancel()
		rec.Close()
	}
}
