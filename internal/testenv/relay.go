package testenv

import (
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
)

// Relay is a Unix socket that forwards to the real engine's socket and can
// be cut, as a dockerd restart cuts clients: every connection ends and new
// ones are refused until it is back. It lets the real go-dockerclient
// lose its event stream on demand.
type Relay struct {
	t testing.TB
	// Path is the relay's socket, to use as unix://<Path>.
	Path   string
	target string

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

// NewRelay starts a relay to the Unix socket at target; it is cut for good
// when the test ends.
func NewRelay(t testing.TB, target string) *Relay {
	r := &Relay{t: t, Path: filepath.Join(t.TempDir(), "docker.sock"), target: target, conns: make(map[net.Conn]bool)}
	r.Up()
	t.Cleanup(r.Down)
	return r
}

// Up opens the socket again.
func (r *Relay) Up() {
	ln, err := net.Listen("unix", r.Path)
	if err != nil {
		r.t.Fatalf("relay listen: %v", err)
	}
	r.mu.Lock()
	r.ln = ln
	r.mu.Unlock()
	r.wg.Add(1)
	go r.acceptLoop(ln)
}

// Down closes the socket and every connection, and waits for the relay's
// goroutines.
func (r *Relay) Down() {
	r.mu.Lock()
	ln := r.ln
	r.ln = nil
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	if ln != nil {
		ln.Close()
	}
	r.wg.Wait()
}

func (r *Relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ln == nil {
		c.Close()
		return false
	}
	r.conns[c] = true
	return true
}

func (r *Relay) untrack(c net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, c)
	c.Close()
}

func (r *Relay) acceptLoop(ln net.Listener) {
	defer r.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go r.serve(c)
	}
}

func (r *Relay) serve(client net.Conn) {
	defer r.wg.Done()
	engine, err := net.Dial("unix", r.target)
	if err != nil {
		client.Close()
		return
	}
	if !r.track(client) || !r.track(engine) {
		client.Close()
		engine.Close()
		return
	}
	defer r.untrack(client)
	defer r.untrack(engine)
	done := make(chan struct{}, 2)
	go relayCopy(engine, client, done)
	go relayCopy(client, engine, done)
	<-done
	client.Close()
	engine.Close()
	<-done
}

func relayCopy(dst, src net.Conn, done chan<- struct{}) {
	_, _ = io.Copy(dst, src)
	done <- struct{}{}
}
