package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/syslog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The OCI hook (README "No start race"). The container runtime runs
// `connectable hook` after the engine has set up the container's network
// namespace and before the container's process starts, with the OCI state
// on standard input. The hook asks the daemon, over a Unix socket only root
// may use, to set that namespace up now, and returns once every data path
// serves the container's labelled ports, or once --hook-timeout has passed:
// the container then starts without, as it would with no hook, and the
// daemon sets it up at its start event as usual; with --hook-strict=true its
// start fails instead.

// defaultHookSocket is where the daemon serves hooks unless told otherwise.
const defaultHookSocket = "/run/connectable/hook.sock"

// hookRequest is what the hook sends the daemon: one JSON line.
type hookRequest struct {
	ID  string `json:"id"`
	PID int    `json:"pid"`
	// Joined says the runtime joins an existing network namespace.
	Joined bool `json:"joined,omitempty"`
	// Sysctl holds the IPv6 settings of the configuration that the
	// runtime applies only after the hooks (see ipv6Sysctls).
	Sysctl map[string]string `json:"sysctl,omitempty"`
	// TimeoutMS is how long the hook waits for the answer.
	TimeoutMS int64 `json:"timeout_ms"`
}

// hookReply is the daemon's answer: one JSON line.
type hookReply struct {
	// Served: every data path serves the container's labelled ports.
	Served  bool `json:"served"`
	Labeled bool `json:"labeled"`
	// Skipped: the daemon decided there is nothing to set up (labels
	// malformed or refused, host network mode, ...); Reason says why.
	Skipped bool   `json:"skipped,omitempty"`
	Reason  string `json:"reason,omitempty"` // why not served
	Key     string `json:"key,omitempty"`
}

// ociState is the part of the OCI runtime state the hook reads.
type ociState struct {
	ID     string `json:"id"`
	PID    int    `json:"pid"`
	Bundle string `json:"bundle"`
}

// ociConfig is the part of a bundle's config.json the hook reads.
type ociConfig struct {
	Linux *struct {
		Namespaces []struct {
			Type string `json:"type"`
			Path string `json:"path"`
		} `json:"namespaces"`
		Sysctl map[string]string `json:"sysctl"`
	} `json:"linux"`
}

// ipv6Sysctls are the settings the daemon may apply ahead of the runtime,
// and only to "0": a container asking for IPv6 (Docker 20.10's --sysctl
// net.ipv6.conf.all.disable_ipv6=0) gets ::1 on its loopback from the
// runtime after the hooks have run, too late for the relay's [::1]
// listener. Applying the same value earlier leaves the container as the
// runtime would.
var ipv6Sysctls = []string{"net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6", "net.ipv6.conf.lo.disable_ipv6"}

// hookCmd is `connectable hook`: it returns the exit code the runtime
// sees, 0 unless strict mode forbids the start.
func hookCmd(ctx context.Context, c *config, stdin io.Reader, stderr io.Writer) int {
	log := newHookLog(c.hookLog, stderr)
	defer log.close()
	fail := func(format string, args ...any) int {
		msg := fmt.Sprintf(format, args...)
		if c.hookStrict {
			log.printf("%s; failing the start (--hook-strict)", msg)
			return 1
		}
		log.printf("%s; the container starts without it, and the daemon sets it up at its start as usual", msg)
		return 0
	}
	ctx, cancel := context.WithTimeout(ctx, c.hookTimeout)
	defer cancel()
	var st ociState
	if err := json.NewDecoder(io.LimitReader(stdin, 1<<20)).Decode(&st); err != nil {
		return fail("connectable hook: reading the OCI state on standard input: %v", err)
	}
	if st.ID == "" || st.PID <= 0 {
		return fail("connectable hook: the OCI state names no container or process (id %q, pid %d)", st.ID, st.PID)
	}
	req := hookRequest{ID: st.ID, PID: st.PID, TimeoutMS: c.hookTimeout.Milliseconds()}
	if st.Bundle != "" {
		host, joined, sysctl, err := readBundle(st.Bundle)
		if err != nil {
			return fail("connectable hook: container %.12s: %v", st.ID, err)
		}
		if host {
			return 0 // the host's namespace is never set up
		}
		req.Joined, req.Sysctl = joined, sysctl
	}
	if c.hookSocket == "" {
		return fail("connectable hook: container %.12s: no --hook-socket", st.ID)
	}
	rep, err := askDaemon(ctx, c.hookSocket, req)
	switch {
	case err != nil:
		return fail("connectable hook: container %.12s not set up before its start: %v", st.ID, err)
	case rep.Served || !rep.Labeled:
		return 0
	case rep.Skipped:
		// The daemon's answer, logged there; strict mode is for a
		// daemon that could not answer.
		return 0
	default:
		return fail("connectable hook: container %.12s not set up before its start: %s", st.ID, rep.Reason)
	}
}

// readBundle reads what the hook needs of the bundle's configuration: whether
// the container is in the host's network namespace (no network namespace
// of its own) or joins an existing one, and its IPv6 settings.
func readBundle(bundle string) (host, joined bool, sysctl map[string]string, err error) {
	f, err := os.Open(filepath.Join(bundle, "config.json"))
	if err != nil {
		return false, false, nil, fmt.Errorf("reading the bundle's configuration: %w", err)
	}
	defer f.Close()
	var cfg ociConfig
	if err := json.NewDecoder(f).Decode(&cfg); err != nil {
		return false, false, nil, fmt.Errorf("reading %s: %w", f.Name(), err)
	}
	if cfg.Linux == nil {
		return true, false, nil, nil
	}
	host = true
	for _, ns := range cfg.Linux.Namespaces {
		if ns.Type == "network" {
			host, joined = false, ns.Path != ""
		}
	}
	for _, k := range ipv6Sysctls {
		if cfg.Linux.Sysctl[k] == "0" {
			if sysctl == nil {
				sysctl = make(map[string]string)
			}
			sysctl[k] = "0"
		}
	}
	return host, joined, sysctl, nil
}

// askDaemon sends req to the daemon at socket and reads its reply, within
// ctx.
func askDaemon(ctx context.Context, socket string, req hookRequest) (hookReply, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		var hint string
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			hint = " (is the daemon running?)"
		}
		return hookReply{}, fmt.Errorf("asking the daemon%s: %w", hint, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if dl, ok := ctx.Deadline(); ok {
		req.TimeoutMS = time.Until(dl).Milliseconds()
	}
	b, _ := json.Marshal(req)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return hookReply{}, fmt.Errorf("asking the daemon: %w", err)
	}
	line, err := bufio.NewReader(io.LimitReader(conn, 1<<16)).ReadBytes('\n')
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
			return hookReply{}, fmt.Errorf("no answer from the daemon within --hook-timeout %v", time.Duration(req.TimeoutMS)*time.Millisecond)
		}
		return hookReply{}, fmt.Errorf("reading the daemon's answer: %w", err)
	}
	var rep hookReply
	if err := json.Unmarshal(line, &rep); err != nil {
		return hookReply{}, fmt.Errorf("reading the daemon's answer: %w", err)
	}
	return rep, nil
}

// hookLog is where the hook says why a container started without its
// set-up: the runtime shows a hook's output only when the hook fails.
type hookLog struct {
	w      io.Writer
	closer io.Closer
	stderr io.Writer
}

func newHookLog(where string, stderr io.Writer) *hookLog {
	l := &hookLog{stderr: stderr}
	switch where {
	case "", "stderr", "-":
	case "syslog":
		if s, err := syslog.New(syslog.LOG_WARNING|syslog.LOG_DAEMON, "connectable-hook"); err == nil {
			l.w, l.closer = s, s
		}
	default:
		if f, err := os.OpenFile(where, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
			l.w, l.closer = f, f
		} else {
			fmt.Fprintf(stderr, "connectable hook: opening --hook-log %s: %v\n", where, err)
		}
	}
	return l
}

func (l *hookLog) printf(format string, args ...any) {
	msg := strings.TrimSuffix(fmt.Sprintf(format, args...), "\n")
	fmt.Fprintln(l.stderr, msg)
	if l.w != nil {
		if _, ok := l.w.(*os.File); ok {
			msg = time.Now().UTC().Format(time.RFC3339Nano) + " " + msg
		}
		fmt.Fprintln(l.w, msg)
	}
}

func (l *hookLog) close() {
	if l.closer != nil {
		l.closer.Close()
	}
}
