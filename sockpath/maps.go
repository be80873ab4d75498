package sockpath

import (
	"errors"
	"net/netip"
)

// Maps is what a Path needs of the kernel: *Kernel, which Load returns, or
// an in-memory fake in this package's tests, so that decisions and health
// are tested without root.
type Maps interface {
	setRoute(key routeKey, table uint32) error
	deleteRoute(key routeKey) error
	routes() (map[routeKey]uint32, error)
	putTable(id uint32, t *kernTable) error
	deleteTable(id uint32) error
	tableIDs() ([]uint32, error)
	// tableEndpoints returns the endpoints table id holds (adoption checks
	// them against the target policy).
	tableEndpoints(id uint32) ([]netip.AddrPort, error)
	ensureCounter(service uint32, ap netip.AddrPort) error
	deleteCounter(service uint32, ap netip.AddrPort) error
	counters() ([]Counter, error)
	clearCounters() error
	// deadEndpoints lists the endpoints some namespace marked dead, and
	// revive clears every namespace's mark on one.
	deadEndpoints() ([]netip.AddrPort, error)
	revive(ap netip.AddrPort) error
	// pruneDead deletes the marks too old for the kernel to heed.
	pruneDead() (int, error)
	// stats returns the kernel's counts, indexed by kernStat.
	stats() ([]uint64, error)
	events() (eventReader, error)
	// Remove takes everything out of the kernel; Close lets go of it,
	// leaving it serving.
	Remove() error
	Close() error
}

var _ Maps = (*Kernel)(nil)

// eventReader gives the kernel's failure reports one at a time. Closing it
// ends a blocked read, which returns errEventsClosed.
type eventReader interface {
	read() (kernEvent, error)
	Close() error
}

var errEventsClosed = errors.New("the failure reports are closed")

// KernelStats is what the kernel counted of what it did not do, could not
// keep or chose to ignore, and the daemon of what it dropped; the fields
// are counts since the maps were created (they survive a restart that
// adopts them). None of them should grow in normal use except LocalClose,
// Evidence and Cleared.
type KernelStats struct {
	Evidence      uint64 // remote failures reported by the kernel
	LocalClose    uint64 // connects the application ended itself, not counted as evidence
	OverBudget    uint64 // evidence dropped in the kernel: its namespace was over its report budget
	RingbufFull   uint64 // reports lost: the ring buffer was full
	DeadMapFull   uint64 // dead marks lost: the map was full
	CountersFull  uint64 // endpoint counters lost: the map was full
	NoStorage     uint64 // connects not rewritten: no socket storage could be had
	PassiveCap    uint64 // picks that ignored a namespace's marks on more than half a table
	V6OnlyRefused uint64 // connects to ::1 not sent to an IPv4 endpoint
	Cleared       uint64 // socket states dropped on a later connect not rewritten
	Unbounded     uint64 // established sockets left without the silence bound: the kernel could not read the application's own options (before Linux 6.1)
	OverMarks     uint64 // reports the daemon dropped: the namespace held too many suspects
	BadReports    uint64 // reports the daemon could not read
}

func kernelStats(v []uint64) KernelStats {
	at := func(s kernStat) uint64 {
		if int(s) < len(v) {
			return v[s]
		}
		return 0
	}
	return KernelStats{
		Evidence:      at(kernStatSTAT_EVIDENCE),
		LocalClose:    at(kernStatSTAT_LOCAL_CLOSE),
		OverBudget:    at(kernStatSTAT_OVER_BUDGET),
		RingbufFull:   at(kernStatSTAT_RINGBUF_FULL),
		DeadMapFull:   at(kernStatSTAT_DEAD_FULL),
		CountersFull:  at(kernStatSTAT_COUNTERS_FULL),
		NoStorage:     at(kernStatSTAT_STORAGE_FAILED),
		PassiveCap:    at(kernStatSTAT_PASSIVE_CAP),
		V6OnlyRefused: at(kernStatSTAT_V6ONLY),
		Cleared:       at(kernStatSTAT_CLEARED),
		Unbounded:     at(kernStatSTAT_UNBOUNDED),
	}
}

// KernelStats reads the kernel's counts and the daemon's own drops.
func (p *Path) KernelStats() (KernelStats, error) {
	v, err := p.k.stats()
	if err != nil {
		return KernelStats{}, err
	}
	s := kernelStats(v)
	s.OverMarks = p.health.Dropped()
	s.BadReports = p.badReports.Load()
	return s, nil
}
