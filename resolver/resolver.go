// Package resolver owns service discovery for connectable: it turns the
// value of a connect.<port> label into the endpoints (ip:port) that one new
// connection should try, in order.
//
// A value is a DNS name (an SRV lookup of exactly that name, as Consul
// answers for redis.service.consul and _redis._tcp.service.consul alike),
// host:port (A and AAAA of host) or ip:port. SRV target addresses come from
// the additional section, matched by owner name, or else from their own A
// and AAAA queries. Answers are cached for the smallest TTL of the records
// used, clamped between a floor and a ceiling; concurrent lookups of one
// value share one query; when every server fails, an expired answer is
// served for a bounded time, and a value without one has its failure
// cached as briefly as a negative answer, so a failing server sees one
// query per value and interval, not one per connection. The cache holds a
// bounded number of values (see cache for the eviction policy). Every call
// returns a fresh copy in a fresh random order: SRV priority groups lowest
// first, weighted random order inside a group (RFC 2782). Answer returns
// the same cached answer's structure instead (priority groups, weights,
// expiry), for a data path that spreads connections by weight itself.
//
// Every use of github.com/miekg/dns stays inside this package.
//
// Typical usage:
//
//	servers, err := resolver.ParseServers(os.Getenv("CONNECTABLE_DNS")) // "" → /etc/resolv.conf
//	if err != nil { ... }
//	r, err := resolver.New(resolver.Config{Servers: servers, Logger: logger})
//	if err != nil { ... }
//	eps, err := r.Lookup(ctx, "redis.service.consul")
//	if errors.Is(err, resolver.ErrNoSuchName) { ... }
//	for _, ep := range eps { // dial ep.String() until one connects
//	}
package resolver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
)

// Defaults for the zero values of Config's fields.
const (
	DefaultTimeout     = 2 * time.Second
	DefaultMinTTL      = time.Second // Consul answers with TTL 0
	DefaultMaxTTL      = 5 * time.Minute
	DefaultNegativeTTL = time.Second
	DefaultStaleFor    = time.Minute
)

// Config configures a Resolver. The zero value works: servers from
// /etc/resolv.conf and the defaults above.
type Config struct {
	// Servers optionally lists the DNS servers as "ip:port" ("[ip6]:port"),
	// tried in turn; if empty, the nameservers of /etc/resolv.conf (port 53).
	Servers []string
	// Timeout optionally bounds one query to one server (each of UDP and,
	// after truncation, TCP); if 0, DefaultTimeout.
	Timeout time.Duration
	// MinTTL optionally sets the shortest time an answer is cached; if 0,
	// DefaultMinTTL. It is what spares the DNS server a query per connection.
	MinTTL time.Duration
	// MaxTTL optionally sets the longest time an answer is cached; if 0,
	// DefaultMaxTTL.
	MaxTTL time.Duration
	// NegativeTTL optionally sets how long "no such name" and "no endpoints"
	// are cached, and failures (timeout, SERVFAIL, REFUSED, malformed reply)
	// of a value that has no answer to serve stale; if 0, DefaultNegativeTTL.
	NegativeTTL time.Duration
	// StaleFor optionally sets how long after its expiry an answer may stand
	// in when every server fails; if 0, DefaultStaleFor; if negative, never.
	StaleFor time.Duration
	// CacheSize optionally bounds the number of label values cached; if 0,
	// DefaultCacheSize. When it is reached, a new value evicts a spent
	// entry, or else one not looked up recently (see cache).
	CacheSize int
	// Logger optionally receives the resolver's log lines; if nil,
	// slog.Default().
	Logger *slog.Logger

	now        func() time.Time // if nil, time.Now; tests control expiry
	resolvConf string           // if "", /etc/resolv.conf
}

// Resolver looks up label values, caching the answers. Its methods are safe
// for concurrent use. It starts no goroutines that outlive a call, so it
// needs no Close.
type Resolver struct {
	servers  []string
	timeout  time.Duration
	minTTL   time.Duration
	maxTTL   time.Duration
	negTTL   time.Duration
	staleFor time.Duration // < 0: never serve stale
	log      *slog.Logger
	now      func() time.Time
	udp, tcp *dns.Client

	preferred atomic.Uint32 // index of the server that answered last

	cache cache

	stats counters
}

// entry is the cache slot of one label value.
type entry struct {
	key   string // the label value
	value parsedValue
	ans   atomic.Pointer[answer] // latest answer, nil before the first
	used  atomic.Bool            // looked up since the cache's clock hand last passed

	mu   sync.Mutex
	call *call // the query in flight, if any; guarded by mu

	// Only the goroutine running the entry's call touches these; mu's
	// hand-over of call orders one caller's writes before the next's reads.
	outage bool // a stale answer has been logged and no fresh one came since
}

// call is one refresh of an entry that concurrent lookups wait for.
type call struct {
	done chan struct{} // closed when ans and err are set
	ans  *answer
	err  error
}

// New returns a Resolver for cfg. It fails if a server address is invalid,
// if /etc/resolv.conf names no server, or if a duration is negative (except
// StaleFor) or MinTTL exceeds MaxTTL.
func New(cfg Config) (*Resolver, error) {
	r := &Resolver{
		timeout:  orDefault(cfg.Timeout, DefaultTimeout),
		minTTL:   orDefault(cfg.MinTTL, DefaultMinTTL),
		maxTTL:   orDefault(cfg.MaxTTL, DefaultMaxTTL),
		negTTL:   orDefault(cfg.NegativeTTL, DefaultNegativeTTL),
		staleFor: orDefault(cfg.StaleFor, DefaultStaleFor),
		log:      cfg.Logger,
		now:      cfg.now,
	}
	for name, d := range map[string]time.Duration{"timeout": cfg.Timeout, "min TTL": cfg.MinTTL, "max TTL": cfg.MaxTTL, "negative TTL": cfg.NegativeTTL} {
		if d < 0 {
			return nil, fmt.Errorf("creating resolver: negative %s %v", name, d)
		}
	}
	if cfg.CacheSize < 0 {
		return nil, fmt.Errorf("creating resolver: negative cache size %d", cfg.CacheSize)
	}
	r.cache.max = cfg.CacheSize
	if r.cache.max == 0 {
		r.cache.max = DefaultCacheSize
	}
	if r.minTTL > r.maxTTL {
		return nil, fmt.Errorf("creating resolver: min TTL %v exceeds max TTL %v", r.minTTL, r.maxTTL)
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	if r.now == nil {
		r.now = time.Now
	}
	servers := cfg.Servers
	if len(servers) == 0 {
		path := cfg.resolvConf
		if path == "" {
			path = "/etc/resolv.conf"
		}
		var err error
		if servers, err = resolvConfServers(path); err != nil {
			return nil, fmt.Errorf("creating resolver: %w", err)
		}
	}
	for _, s := range servers {
		ap, err := netip.ParseAddrPort(s)
		if err != nil || ap.Port() == 0 || !ap.Addr().IsValid() {
			return nil, fmt.Errorf("creating resolver: dns server %q is not ip:port ([ip6]:port for IPv6)", s)
		}
		r.servers = append(r.servers, ap.String())
	}
	r.udp = &dns.Client{Net: "udp", UDPSize: ednsSize, Timeout: r.timeout}
	r.tcp = &dns.Client{Net: "tcp", Timeout: r.timeout}
	return r, nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// resolvConfServers returns the nameservers of a resolv.conf file as ip:port.
func resolvConfServers(path string) ([]string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading dns servers: %w", err)
	}
	var out []string
	for _, s := range cc.Servers {
		ap, err := parseServer(s) // resolv.conf's port is always 53
		if err != nil {
			return nil, fmt.Errorf("reading dns servers from %s: %q: %w", path, s, err)
		}
		out = append(out, ap.String())
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("reading dns servers: no nameserver in %s", path)
	}
	return out, nil
}

// Servers returns the DNS servers in use, as "ip:port".
func (r *Resolver) Servers() []string { return slices.Clone(r.servers) }

// Lookup returns the endpoints to try, in order, for one new connection to
// value: for a DNS name, the SRV priority groups in ascending order, a
// weighted random order inside each group (weight-0 targets last), freshly
// shuffled on every call; for host:port, the addresses of host in random
// order; for ip:port, itself. The slice is the caller's to keep or modify.
//
// A cached answer is returned without any query. Otherwise one caller
// queries while concurrent callers for the same value wait for its result.
// Errors are *Error values (possibly wrapped) of the kinds ErrInvalidValue,
// ErrNoSuchName, ErrNoEndpoints, ErrTimeout, ErrRefused, ErrServerFailure
// and ErrMalformed, or the context's error.
func (r *Resolver) Lookup(ctx context.Context, value string) ([]netip.AddrPort, error) {
	a, err := r.current(ctx, value)
	if err != nil {
		return nil, err
	}
	return a.endpoints(), nil
}

// Answer returns value's current answer: its SRV priority groups (lowest
// first), each target's weight and endpoints, and when the answer expires,
// that is, when a caller should ask again. A host:port or ip:port value
// gives each address a Target of its own, of weight 1, in one group of
// priority 0. The Answer is the caller's: nothing in it is shared with the
// cache.
//
// Caching, sharing of queries, stale answers and errors are those of
// Lookup: a cached answer costs no query. A stale answer (Stale set) has an
// Expires shortly ahead, MinTTL from now at most, so a caller that follows
// Expires keeps retrying the servers at the rate Lookup does.
func (r *Resolver) Answer(ctx context.Context, value string) (Answer, error) {
	a, err := r.current(ctx, value)
	if err != nil {
		return Answer{}, err
	}
	return a.export(r.now(), r.minTTL), nil
}

// current returns the answer to serve for value, from the cache or from a
// query (its own or one in flight). On success the answer has endpoints
// (its err is nil); a cached negative answer or failure comes back as the
// error.
func (r *Resolver) current(ctx context.Context, value string) (*answer, error) {
	if e := r.cache.get(value); e != nil {
		e.markUsed()
		if a := e.ans.Load(); a != nil && r.now().Before(a.expires) {
			r.stats.hits.Add(1)
			return r.result(a)
		}
		return r.lookupSlow(ctx, e)
	}
	e, err := r.entry(value)
	if err != nil {
		return nil, err
	}
	return r.lookupSlow(ctx, e)
}

// result returns a if it can be served, counting stale answers, or the
// error it caches.
func (r *Resolver) result(a *answer) (*answer, error) {
	if a.err != nil {
		return nil, a.err
	}
	if a.stale {
		r.stats.stale.Add(1)
	}
	return a, nil
}

// entry returns the cache entry of value, creating it if needed.
func (r *Resolver) entry(value string) (*entry, error) {
	v, err := parseValue(value)
	if err != nil {
		return nil, err
	}
	e, evicted := r.cache.add(&entry{key: value, value: v}, r.now())
	if evicted > 0 {
		r.stats.evictions.Add(uint64(evicted))
	}
	return e, nil
}

// lookupSlow answers from a query: its own, or the one in flight.
func (r *Resolver) lookupSlow(ctx context.Context, e *entry) (*answer, error) {
	for {
		e.mu.Lock()
		a := e.ans.Load()
		now := r.now()
		if a != nil && now.Before(a.expires) { // filled meanwhile
			e.mu.Unlock()
			r.stats.hits.Add(1)
			return r.result(a)
		}
		if c := e.call; c != nil {
			e.mu.Unlock()
			if a != nil && a.stale && now.Before(a.staleUntil) {
				// Servers are failing: don't make every connection wait
				// for the next round of timeouts.
				r.stats.hits.Add(1)
				return r.result(a)
			}
			r.stats.shared.Add(1)
			select {
			case <-c.done:
			case <-ctx.Done():
				return nil, fmt.Errorf("resolving %s: %w", e.key, context.Cause(ctx))
			}
			if c.err != nil && isContextError(c.err) && ctx.Err() == nil {
				continue // the querying caller gave up; query for ourselves
			}
			if c.err != nil {
				return nil, c.err
			}
			return r.result(c.ans)
		}
		c := &call{done: make(chan struct{})}
		e.call = c
		e.mu.Unlock()

		r.stats.misses.Add(1)
		c.ans, c.err = r.refresh(ctx, e)
		e.mu.Lock()
		e.call = nil
		e.mu.Unlock()
		close(c.done)
		if c.err != nil {
			return nil, c.err
		}
		return r.result(c.ans)
	}
}

func isContextError(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// refresh queries for e and stores the new answer. Run by one caller at a
// time per entry.
func (r *Resolver) refresh(ctx context.Context, e *entry) (*answer, error) {
	a, ttl, err := r.resolve(ctx, e.value)
	now := r.now()
	prev := e.ans.Load()
	switch {
	case err == nil:
		a.expires = now.Add(min(max(ttl, r.minTTL), r.maxTTL))
		if r.staleFor > 0 {
			a.staleUntil = a.expires.Add(r.staleFor)
		}
		e.ans.Store(a)
		if e.outage {
			e.outage = false
			r.log.Info("dns answering again", "name", e.key)
		}
		return a, nil
	case isAnswer(err):
		e.ans.Store(&answer{err: err, expires: now.Add(r.negTTL)})
		e.outage = false
		return nil, err
	case isContextError(err) && ctx.Err() != nil:
		return nil, err // the caller gave up; that says nothing about the servers
	}
	if prev != nil && prev.err == nil && now.Before(prev.staleUntil) {
		s := *prev // the groups are immutable and shared
		s.stale = true
		// Ask again once the floor has passed; meanwhile serve this.
		s.expires = now.Add(r.minTTL)
		if s.expires.After(prev.staleUntil) {
			s.expires = prev.staleUntil
		}
		e.ans.Store(&s)
		if !e.outage {
			e.outage = true
			r.log.Warn("dns servers failing, serving stale answer", "name", e.key,
				"until", prev.staleUntil.Format(time.RFC3339), "err", err)
		}
		return &s, nil
	}
	if e.outage {
		e.outage = false
		r.log.Warn("dns servers still failing, stale answer too old", "name", e.key, "err", err)
	}
	// Cached like a negative answer: without it, every new connection
	// would send the failing servers a query of its own (and, on timeouts,
	// wait for it).
	e.ans.Store(&answer{err: err, expires: now.Add(r.negTTL)})
	return nil, err
}

// Stats is a snapshot of a Resolver's counters since New.
type Stats struct {
	CacheHits   uint64        // lookups answered from the cache (fresh, negative, failure or stale)
	CacheMisses uint64        // lookups that queried the servers themselves
	Shared      uint64        // lookups that waited for another lookup's queries
	StaleServed uint64        // lookups answered with an expired answer because every server failed
	Queries     uint64        // DNS exchanges: one per server tried, UDP and TCP counted apart
	QueryErrors uint64        // exchanges that failed: timeout, network, SERVFAIL, REFUSED, malformed (not NXDOMAIN)
	Truncated   uint64        // UDP replies with the TC bit, retried over TCP
	QueryTime   time.Duration // total duration of all exchanges: QueryTime/Queries is the mean latency
	Evictions   uint64        // cache entries dropped to make room for another value
	Entries     int           // label values in the cache now (at most Config.CacheSize)
}

type counters struct {
	hits, misses, shared, stale atomic.Uint64
	queries, queryErrors        atomic.Uint64
	truncated, queryNanos       atomic.Uint64
	evictions                   atomic.Uint64
}

// Stats returns the current counters.
func (r *Resolver) Stats() Stats {
	c := &r.stats
	return Stats{
		CacheHits:   c.hits.Load(),
		CacheMisses: c.misses.Load(),
		Shared:      c.shared.Load(),
		StaleServed: c.stale.Load(),
		Queries:     c.queries.Load(),
		QueryErrors: c.queryErrors.Load(),
		Truncated:   c.truncated.Load(),
		QueryTime:   time.Duration(c.queryNanos.Load()),
		Evictions:   c.evictions.Load(),
		Entries:     r.cache.len(),
	}
}
