package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/connectable/connectable/docker"
	"github.com/connectable/connectable/netns"
	"github.com/connectable/connectable/reconcile"
)

// hookServer serves `connectable hook` on a Unix socket only root may use:
// one request per connection, answered once every data path serves the
// container, or when the hook's time is up. Close stops it and waits for
// its goroutines.
type hookServer struct {
	ln  *net.UnixListener
	w   *docker.Watcher
	rec *reconcile.Reconciler
	log *slog.Logger
	// decided, if set, waits for the socket path's first decisions on a
	// namespace: its Apply records the routes and returns, and a
	// container whose endpoints only the socket path reaches is served
	// only once they are written.
	decided func(ctx context.Context, key string) error

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	slots  chan struct{} // bounds the requests in flight
	once   sync.Once
}

const (
	hookMaxInFlight = 256              // requests served at once; more are refused at once
	hookReadTimeout = time.Second      // to read a request
	hookMaxWait     = 30 * time.Second // however long a hook says it waits
	hookMargin      = 20 * time.Millisecond
)

// startHookServer listens on c.hookSocket, if set. A daemon that cannot
// serves no hooks, and says why, rather than not starting: hooks then let
// containers start as they would without them.
func startHookServer(c *config, log *slog.Logger, w *docker.Watcher, rec *reconcile.Reconciler, ports *docker.PortTable, sock *socketPath) *hookServer {
	if c.hookSocket == "" {
		return nil
	}
	log = log.With("component", "hook")
	if c.datapath != "relay" && ports != nil {
		// The socket path's first set-up waits for the first listing of
		// published ports, and Podman's listing waits for containers that
		// are starting: a hook would wait for itself. Listed now instead.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := ports.Refresh(ctx); err != nil {
			log.Warn("listing published ports before serving hooks", "err", err)
		}
		cancel()
	}
	s, err := listenHooks(c.hookSocket, log, w, rec)
	if err != nil {
		log.Warn("serving no OCI hooks", "err", err)
		return nil
	}
	if sock != nil {
		s.decided = sock.Decided
	}
	return s
}

func listenHooks(path string, log *slog.Logger, w *docker.Watcher, rec *reconcile.Reconciler) (*hookServer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("hook socket: %w", err)
	}
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return nil, fmt.Errorf("another daemon serves hooks on %s", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing the stale hook socket: %w", err)
	}
	// Created without any access for others from the start, not chmodded
	// after: no moment in which another user could connect.
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("hook socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	s := &hookServer{ln: ln, w: w, rec: rec, log: log, slots: make(chan struct{}, hookMaxInFlight)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(1)
	go s.acceptLoop()
	log.Info("serving OCI hooks", "socket", path)
	return s, nil
}

// Close stops accepting, cancels the requests in flight and waits for them.
func (s *hookServer) Close() {
	if s == nil {
		return
	}
	s.once.Do(func() {
		s.cancel()
		s.ln.Close()
		s.wg.Wait()
	})
}

func (s *hookServer) acceptLoop() {
	defer s.wg.Done()
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if s.ctx.Err() != nil {
				return
			}
			s.log.Warn("accepting a hook connection", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		select {
		case s.slots <- struct{}{}:
		default:
			// Whether it has labels is not known: a strict hook fails.
			s.reply(conn, hookReply{Labeled: true, Reason: "the daemon serves too many hooks at once"})
			conn.Close()
			continue
		}
		s.wg.Add(1)
		go s.serveHook(conn)
	}
}

// peerIsRoot reports whether the process at the other end runs as root: the
// socket's mode already keeps others out; this holds when a directory's
// mode was loosened.
func peerIsRoot(conn *net.UnixConn) bool {
	raw, err := conn.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return false
	}
	return cred.Uid == 0
}

func (s *hookServer) serveHook(conn *net.UnixConn) {
	defer s.wg.Done()
	defer func() { <-s.slots }()
	defer conn.Close()
	if !peerIsRoot(conn) {
		s.log.Warn("refusing a hook connection from a process not running as root")
		return
	}
	_ = conn.SetReadDeadline(time.Now().Add(hookReadTimeout))
	line, err := bufio.NewReader(io.LimitReader(conn, 1<<16)).ReadBytes('\n')
	if err != nil {
		s.log.Warn("reading a hook's request", "err", err)
		return
	}
	var req hookRequest
	if err := json.Unmarshal(line, &req); err != nil {
		s.reply(conn, hookReply{Reason: fmt.Sprintf("malformed request: %v", err)})
		return
	}
	wait := min(max(time.Duration(req.TimeoutMS)*time.Millisecond-hookMargin, 0), hookMaxWait)
	ctx, cancel := context.WithTimeout(s.ctx, wait)
	defer cancel()
	start := time.Now()
	rep := s.handle(ctx, req)
	if rep.Labeled {
		defer func() {
			ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
			defer cancel()
			s.w.PrestartDone(ctx, req.ID)
		}()
		took := time.Since(start)
		if rep.Served {
			s.log.Debug("container set up before its start", "id", short(req.ID), "key", short(rep.Key), "took", took)
		} else {
			s.log.Info("container not set up before its start; it is set up at its start event", "id", short(req.ID), "why", rep.Reason, "took", took)
		}
	}
	s.reply(conn, rep)
}

func (s *hookServer) handle(ctx context.Context, req hookRequest) hookReply {
	res, err := s.w.Prestart(ctx, docker.PrestartRequest{
		ID: req.ID, PID: req.PID, Joined: req.Joined,
		Prepare: func(h *netns.Handle) error { return applySysctls(h, req.Sysctl) },
	})
	if err != nil {
		return hookReply{Labeled: res.Labeled || ctx.Err() != nil, Reason: err.Error()}
	}
	if res.Key == "" {
		return hookReply{Labeled: res.Labeled, Skipped: true, Reason: res.Reason}
	}
	if err := s.rec.WaitApplied(ctx, res.Key, res.NetNS); err != nil {
		return hookReply{Labeled: true, Key: res.Key, Reason: err.Error()}
	}
	if s.decided != nil {
		if err := s.decided(ctx, res.Key); err != nil {
			return hookReply{Labeled: true, Key: res.Key, Reason: err.Error()}
		}
	}
	return hookReply{Served: true, Labeled: true, Key: res.Key}
}

func (s *hookServer) reply(conn net.Conn, rep hookReply) {
	b, _ := json.Marshal(rep)
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write(append(b, '\n')); err != nil {
		s.log.Debug("answering a hook", "err", err)
	}
}

// applySysctls writes, inside h, the IPv6 settings the hook found in the
// container's configuration (only the names in ipv6Sysctls, only "0"), as
// the runtime will a moment later: ::1 is then on the loopback when the
// relay opens its listeners.
func applySysctls(h *netns.Handle, sysctl map[string]string) error {
	var todo []string
	for _, k := range ipv6Sysctls {
		if sysctl[k] == "0" {
			todo = append(todo, "/proc/sys/"+strings.ReplaceAll(k, ".", "/"))
		}
	}
	if len(todo) == 0 {
		return nil
	}
	return h.Do(func() error {
		for _, p := range todo {
			// /proc/sys/net is the namespace of the thread that opens it.
			fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CLOEXEC, 0)
			if errors.Is(err, unix.ENOENT) {
				continue // no IPv6 in this kernel
			}
			if err != nil {
				return fmt.Errorf("opening %s: %w", p, err)
			}
			_, err = unix.Write(fd, []byte("0"))
			unix.Close(fd)
			if err != nil {
				return fmt.Errorf("writing %s: %w", p, err)
			}
		}
		return nil
	})
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
