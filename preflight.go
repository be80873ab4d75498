package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Capability bits, from linux/capability.h.
const (
	capNetAdmin = 12 // iptables rules inside a container's namespace
	capSysAdmin = 21 // setns(2) into a container's network namespace
)

// containerInits are the init processes a container runtime puts in front
// of the entrypoint (docker run --init, tini, dumb-init).
var containerInits = []string{"docker-init", "tini", "dumb-init"}

// preflight checks, before the daemon touches anything, that the process
// holds what it needs: CAP_NET_ADMIN and CAP_SYS_ADMIN, and a view of the
// host's processes, which is where Docker's container PIDs (and so their
// namespaces under /proc) live. Without them every set-up would fail, one
// container at a time, long after start; failing at once with what is
// missing is what an operator can act on.
func preflight() error {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return fmt.Errorf("preflight: reading capabilities: %w", err)
	}
	var problems []string
	missing, err := missingCaps(string(status))
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	if len(missing) > 0 {
		problems = append(problems, fmt.Sprintf("missing capabilities %s (as a container: --cap-add NET_ADMIN --cap-add SYS_ADMIN, or run as root on the host)",
			strings.Join(missing, ", ")))
	}
	if !hostPIDs(os.Getpid(), os.Getppid(), readComm) {
		problems = append(problems, "the host's processes are not visible, so container namespaces cannot be found under /proc (as a container: --pid=host)")
	}
	if len(problems) > 0 {
		return errors.New("preflight: " + strings.Join(problems, "; "))
	}
	return nil
}

// missingCaps names the capabilities the daemon needs that the CapEff line
// of a /proc/<pid>/status text lacks.
func missingCaps(status string) ([]string, error) {
	for _, line := range strings.Split(status, "\n") {
		hex, ok := strings.CutPrefix(line, "CapEff:")
		if !ok {
			continue
		}
		eff, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
		if err != nil {
			return nil, fmt.Errorf("parsing CapEff %q: %w", strings.TrimSpace(hex), err)
		}
		var missing []string
		for _, c := range []struct {
			bit  uint
			name string
		}{{capNetAdmin, "CAP_NET_ADMIN"}, {capSysAdmin, "CAP_SYS_ADMIN"}} {
			if eff&(1<<c.bit) == 0 {
				missing = append(missing, c.name)
			}
		}
		return missing, nil
	}
	return nil, errors.New("no CapEff line in /proc/self/status")
}

// hostPIDs reports whether the process plausibly sees the host's process
// table. Certain yes: kthreadd is PID 2, which only the initial PID
// namespace shows. Certain no: we are PID 1 of our own namespace, or the
// child of a container runtime's init that is. Anything else (nested
// engines, sandboxes) is given the benefit of the doubt: a wrong guess
// shows up as set-up errors naming the missing /proc path.
func hostPIDs(pid, ppid int, comm func(pid int) string) bool {
	if comm(2) == "kthreadd" {
		return true
	}
	if pid == 1 {
		return false
	}
	if ppid == 1 {
		for _, name := range containerInits {
			if comm(1) == name {
				return false
			}
		}
	}
	return true
}

// readComm returns the command name of a process, or "" if unreadable.
func readComm(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
