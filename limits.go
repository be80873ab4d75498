package main

import (
	"log/slog"
	"syscall"
)

// fdReserve is the part of the file limit kept out of the connection caps:
// DNS queries, the Docker API, admin connections, listeners of namespaces
// still to come and the dials in flight.
func fdReserve(nofile uint64) uint64 { return max(256, nofile/10) }

// raiseFileLimit raises the soft RLIMIT_NOFILE to the hard limit (Go's
// runtime already does so at start; this makes it explicit and logged) and
// returns the limit the daemon runs with.
func raiseFileLimit(log *slog.Logger) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("reading the file limit", "err", err)
		return 1024
	}
	if lim.Cur < lim.Max {
		raised := lim
		raised.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			log.Warn("raising the file limit", "soft", lim.Cur, "hard", lim.Max, "err", err)
		} else {
			lim = raised
		}
	}
	return lim.Cur
}

// connCaps returns the connection caps per namespace and over all
// namespaces: the flags' values, or what the file limit allows, each
// relayed connection holding two descriptors. A namespace gets an eighth of
// the total by default, so one container at its cap leaves the others room.
func connCaps(c *config, nofile uint64) (perNS, global int) {
	avail := uint64(0)
	if nofile > fdReserve(nofile) {
		avail = (nofile - fdReserve(nofile)) / 2
	}
	global = c.maxConns
	if global == 0 {
		global = int(max(avail, 1))
	}
	perNS = c.maxConnsPerNS
	if perNS == 0 {
		perNS = int(max(nofile/2/8, 1))
	}
	return min(perNS, global), global
}
