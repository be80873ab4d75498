package health

import (
	"net/netip"
	"sync"
	"time"

	"github.com/connectable/connectable/internal/backoff"
)

// Bounds of a Service's table.
const (
	// Forget drops what is known about an endpoint that has not failed for
	// this long: it has recovered or left DNS. It is far longer than any
	// back-off, so forgetting never lifts a live penalty.
	Forget = 10 * time.Minute
	// MaxEntries bounds one service's table whatever the churn of its
	// endpoints. Tables are per service, so one tenant's service with
	// thousands of dead endpoints cannot evict another service's state.
	MaxEntries = 1024
)

// Service is one service's endpoints as the daemon's own dials found them
// (the relay's): it orders the next dials, failed endpoints after the
// others for a doubling back-off. Only endpoints that failed are held, so
// a healthy fleet costs nothing. When a Tracker is given, every dial's
// outcome is also the Tracker's confirmation, and endpoints the Tracker
// holds dead are dialled last too: one truth for both paths.
type Service struct {
	mu        sync.Mutex
	now       func() time.Time
	b         backoff.Backoff
	tracker   *Tracker
	eps       map[netip.AddrPort]*dialState
	lastPrune time.Time
}

type dialState struct {
	streak       int       // failures in a row
	until        time.Time // tried after the healthy ones until then
	lastFail     time.Time
	lastErr      string
	dialFailures uint64
}

// NewService returns an empty table. now is the clock (time.Now if nil);
// b the back-off after failures; tracker, if not nil, shares the outcomes.
func NewService(now func() time.Time, b backoff.Backoff, tracker *Tracker) *Service {
	if now == nil {
		now = time.Now
	}
	return &Service{now: now, b: b, tracker: tracker, eps: map[netip.AddrPort]*dialState{}}
}

// Order returns eps with the endpoints in back-off (or held dead by the
// Tracker) moved, in their order, after the others. All of them stay: when
// every endpoint failed lately, the next connection still tries them all
// rather than giving up.
func (s *Service) Order(eps []netip.AddrPort) []netip.AddrPort {
	s.mu.Lock()
	now := s.now()
	penalized := make([]bool, len(eps))
	n := 0
	for i, ep := range eps {
		e := s.eps[ep]
		if e != nil && now.Before(e.until) {
			penalized[i] = true
			n++
		}
	}
	s.mu.Unlock()
	if s.tracker != nil {
		for i, ep := range eps {
			if !penalized[i] && s.tracker.Dead(ep) {
				penalized[i] = true
				n++
			}
		}
	}
	if n == 0 || n == len(eps) {
		return eps
	}
	out := make([]netip.AddrPort, 0, len(eps))
	for i, ep := range eps {
		if !penalized[i] {
			out = append(out, ep)
		}
	}
	for i, ep := range eps {
		if penalized[i] {
			out = append(out, ep)
		}
	}
	return out
}

// Failed records a failed dial of ep and extends its back-off.
func (s *Service) Failed(ep netip.AddrPort, err error) {
	s.mu.Lock()
	now := s.now()
	s.prune(now)
	e := s.eps[ep]
	if e == nil {
		e = &dialState{}
		s.eps[ep] = e
	}
	e.streak++
	e.dialFailures++
	e.lastFail = now
	e.lastErr = err.Error()
	e.until = now.Add(s.b.Streak(e.streak))
	s.mu.Unlock()
	if s.tracker != nil {
		s.tracker.Failed(ep, err)
	}
}

// Succeeded records a successful dial of ep, which ends its back-off.
func (s *Service) Succeeded(ep netip.AddrPort) {
	s.mu.Lock()
	if e := s.eps[ep]; e != nil {
		e.streak = 0
		e.until = time.Time{}
	}
	s.mu.Unlock()
	if s.tracker != nil {
		s.tracker.Succeeded(ep)
	}
}

// Len returns how many endpoints the table holds.
func (s *Service) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.eps)
}

// prune forgets endpoints that have not failed for Forget, at most once a
// minute, and keeps the table within MaxEntries. Called with s.mu.
func (s *Service) prune(now time.Time) {
	if now.Sub(s.lastPrune) < time.Minute && len(s.eps) < MaxEntries {
		return
	}
	s.lastPrune = now
	for ep, e := range s.eps {
		if now.Sub(e.lastFail) > Forget {
			delete(s.eps, ep)
		}
	}
	// Still full: an endpoint storm. Make room for a quarter more at once,
	// so pruning stays rare: first endpoints out of back-off, then any.
	target := MaxEntries * 3 / 4
	for ep, e := range s.eps {
		if len(s.eps) <= target {
			return
		}
		if !now.Before(e.until) {
			delete(s.eps, ep)
		}
	}
	for ep := range s.eps {
		if len(s.eps) <= target {
			return
		}
		delete(s.eps, ep)
	}
}

// DialStatus is what the table knows about one endpoint.
type DialStatus struct {
	Addr      netip.AddrPort
	Healthy   bool // false while in back-off, tried after the others until RetryAt
	Failures  int  // failed dials in a row; 0 once one succeeded
	RetryAt   time.Time
	LastError string
	// DialFailures counts failed dials since the endpoint last entered the
	// table (it is forgotten after Forget without failures).
	DialFailures uint64
}

// Status returns the state of each of eps.
func (s *Service) Status(eps []netip.AddrPort) []DialStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	out := make([]DialStatus, 0, len(eps))
	for _, ep := range eps {
		st := DialStatus{Addr: ep, Healthy: true}
		if e := s.eps[ep]; e != nil {
			st.Healthy = !now.Before(e.until)
			st.Failures = e.streak
			st.LastError = e.lastErr
			st.DialFailures = e.dialFailures
			if !st.Healthy {
				st.RetryAt = e.until
			}
		}
		out = append(out, st)
	}
	return out
}

// AddDialFailures adds the table's failure counts to out: an endpoint
// shared by several services counts the failures of all of them.
func (s *Service) AddDialFailures(out map[netip.AddrPort]uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ep, e := range s.eps {
		out[ep] += e.dialFailures
	}
}
