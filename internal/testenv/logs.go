package testenv

import (
	"bytes"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// SyncBuffer is a bytes.Buffer that several goroutines may write: the logs
// of a component under test, or the output of a process a test started.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Count returns how often substr occurs.
func (s *SyncBuffer) Count(substr string) int { return strings.Count(s.String(), substr) }

// Lines returns the lines that contain every one of subs.
func (s *SyncBuffer) Lines(subs ...string) []string {
	var out []string
	for _, line := range strings.Split(s.String(), "\n") {
		ok := line != ""
		for _, sub := range subs {
			ok = ok && strings.Contains(line, sub)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// Logger returns a debug-level text logger that writes to the test's log
// and, if buf is not nil, to buf for assertions.
func Logger(t testing.TB, buf *SyncBuffer) *slog.Logger {
	var w io.Writer = testWriter{t}
	if buf != nil {
		w = io.MultiWriter(w, buf)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
