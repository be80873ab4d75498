package main

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/connectable/connectable/internal/testenv"
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
