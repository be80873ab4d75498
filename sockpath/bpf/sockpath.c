// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// The socket data path of connectable. Attached to the cgroup2 root, these
// programs see every connect() of the machine; they act only on TCP
// connects to a loopback address whose (network namespace cookie, family,
// port) is in the routes map, which the daemon fills for the namespaces it
// set up. Everything else returns untouched.
//
// A routed connect picks an endpoint from its table at random (the table's
// slots are apportioned by SRV weight, so a uniform draw is a weighted
// choice), skips endpoints that failed for the same network namespace,
// rewrites the destination and remembers the original one in socket
// storage, so that getpeername() answers with the address the application
// connected to. If no endpoint is drawn, the connect is not rewritten and
// the REDIRECT rule beneath sends it to the relay, which fails over itself.
//
// A sockops program watches those sockets only. Once one is established,
// it bounds how long its peer may stay silent, as the relay bounds its
// backend sockets (--backend-timeout), so that a connection to a host that
// vanished without a reset ends rather than hanging. As evidence against
// an endpoint it counts only what the remote side caused: a reset or an ICMP
// error in answer to the SYN, or a SYN left unanswered past its
// retransmission timeout. A socket its application closed, aborted or gave
// up on while connecting is no evidence. The evidence marks the endpoint
// dead for that namespace alone, at once, and is reported to the daemon
// (within a per-namespace budget), which probes the endpoint from its own
// namespace before taking it out of any other namespace's table.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SHUTDOWN_MASK 3	  // RCV_SHUTDOWN | SEND_SHUTDOWN, set by tcp_close()
#define ECONNABORTED 103 // set by tcp_abort(): the host destroyed the socket
#define SOL_SOCKET 1
#define SO_KEEPALIVE 9
#define TCP_KEEPIDLE 4
#define TCP_KEEPINTVL 5
#define TCP_KEEPCNT 6
#define TCP_USER_TIMEOUT 18

// The constants the daemon shares, generated into Go by bpf2go (-type).
enum sockpath_const {
	MAX_ENDPOINTS = 64,
	NSLOTS = 1024, // a power of two: a draw is a mask, without modulo bias
	DRAWS = 4,     // weighted draws before a scan for any live endpoint
	// A dead mark older than this is ignored, so that endpoints come back
	// on their own while no daemon is there to probe them.
	DEAD_HOLD_SECONDS = 30,
	// The reports one namespace may send: a burst, refilled at a rate per
	// second. Beyond it the evidence is dropped (and counted), so that one
	// namespace cannot fill the ring buffer or the dead map.
	EVENT_BURST = 16,
	EVENT_RATE = 4,
};

#define DEAD_HOLD_NS ((__u64)DEAD_HOLD_SECONDS * 1000 * 1000 * 1000)

enum event_kind {
	EVENT_FAILED = 1,    // the connect was refused or unreachable
	EVENT_SYN_RETRY = 2, // the SYN timed out once and is retransmitted
};

// The kernel's counts of what it did not do or could not keep: each is an
// index into the stats map.
enum stat {
	STAT_EVIDENCE = 0,	 // evidence against an endpoint, reported
	STAT_LOCAL_CLOSE = 1,	 // connects the application ended itself: no evidence
	STAT_OVER_BUDGET = 2,	 // evidence dropped: its namespace was over its budget
	STAT_RINGBUF_FULL = 3,	 // reports lost: the ring buffer was full
	STAT_DEAD_FULL = 4,	 // marks lost: the dead map was full
	STAT_COUNTERS_FULL = 5,	 // endpoint counters lost: the counters map was full
	STAT_STORAGE_FAILED = 6, // connects not rewritten: no socket storage
	STAT_PASSIVE_CAP = 7,	 // picks that ignored marks on more than half a table
	STAT_V6ONLY = 8,	 // connects to ::1 not sent to an IPv4 endpoint
	STAT_CLEARED = 9,	 // socket state dropped on a connect not rewritten
	STAT_UNBOUNDED = 10,	 // established sockets the bound could not be read or set on
	NSTATS = 11,
};

// Just the fields read from the kernel's struct sock, relocated by CO-RE
// to wherever this kernel keeps them.
struct sock___sp {
	int sk_err;
	__u8 sk_shutdown;
} __attribute__((preserve_access_index));

struct route_key {
	__u64 cookie; // bpf_get_netns_cookie of the client's namespace
	__u16 port;   // the port connected to, host byte order
	__u8 family;  // AF_INET: 127.0.0.0/8 or ::ffff:127.0.0.0/104; AF_INET6: ::1
	__u8 pad[5];
};

// An endpoint in IPv6 form: an IPv4 address is v4-mapped (::ffff:a.b.c.d).
struct endpoint {
	__u32 addr[4]; // network byte order
	__u16 port;    // network byte order
	__u16 pad;
};

struct table {
	__u32 service;    // the daemon's number for the service, for counters
	__u32 nslots;     // 0 (serve nothing) or NSLOTS
	__u32 nendpoints; // entries of ep in use
	__u8 slot[NSLOTS]; // index into ep
	struct endpoint ep[MAX_ENDPOINTS];
};

struct counter_key {
	__u32 service;
	struct endpoint ep;
};

struct endpoint_counters {
	__u64 connects; // rewritten to this endpoint
	__u64 failures; // failed or timed out, as seen by sockops
};

// An endpoint as one network namespace sees it.
struct dead_key {
	__u64 cookie;
	struct endpoint ep;
	__u32 pad;
};

struct budget {
	__u64 at;     // bpf_ktime_get_ns of the last refill
	__u64 tokens; // reports left
};

struct sock_state {
	__u64 cookie; // the namespace that connected
	__u32 service;
	struct endpoint ep; // where the connect went
	__u32 orig_addr[4]; // what the application asked for
	__u16 orig_port;
	__u8 v4; // the socket is AF_INET: orig_addr[3] is the address
	__u8 reported; // an event was sent for this socket
};

// How long the peer of an established rewritten socket may stay silent,
// as the daemon derives it from --backend-timeout; all zero (the map's
// value until a daemon writes it, or a negative --backend-timeout) leaves
// sockets alone.
struct silence_bound {
	__u32 user_timeout_ms; // TCP_USER_TIMEOUT: sent data unacknowledged
	__u32 keepidle;	       // seconds idle before the first keepalive probe
	__u32 keepintvl;       // seconds between probes
	__u32 keepcnt;	       // probes unanswered before the end
};

struct event {
	__u64 cookie; // the namespace whose connect failed
	__u32 service;
	enum event_kind kind;
	struct endpoint ep;
	__u32 pad;
};

// Sized for many namespaces: 256 ports of two families for each of 512
// namespaces. Entries are allocated as they are used.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct route_key);
	__type(value, __u32); // table id
} routes SEC(".maps");

// Never used by the programs: clang emits a struct's BTF only for the top
// level of a map definition, and bpf2go needs struct table's to generate
// its Go type. The daemon checks the inner maps against this one.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct table);
} table_layout SEC(".maps");

// Never used either: it gives BTF, and so Go types and constants, to what
// the programs use only on the stack.
struct shared_types {
	struct event event;
	struct dead_key dead_key;
	enum sockpath_const consts;
	enum event_kind kind;
	enum stat stat;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct shared_types);
} types_layout SEC(".maps");

// A table is replaced by swapping in a new inner map: a connect sees the old
// table or the new one, never a mixture.
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 16384);
	__type(key, __u32); // table id
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_ARRAY);
		__uint(max_entries, 1);
		__uint(key_size, sizeof(__u32));
		__uint(value_size, sizeof(struct table));
	});
} tables SEC(".maps");

// Endpoints that failed for a namespace. Only that namespace's picks skip
// them; the daemon confirms before it takes one out of other tables.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct dead_key);
	__type(value, __u64); // bpf_ktime_get_ns when marked
} dead SEC(".maps");

// Each namespace's report budget. An evicted entry starts over with a full
// budget: that costs one burst, and only when more namespaces report than
// the map holds.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); // netns cookie
	__type(value, struct budget);
} budgets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct counter_key);
	__type(value, struct endpoint_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NSTATS);
	__type(key, __u32); // enum stat
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct silence_bound);
} silence SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline void count(enum stat s)
{
	__u32 k = s;
	__u64 *v = bpf_map_lookup_elem(&stats, &k);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline struct endpoint_counters *counters_of(__u32 service, struct endpoint *ep)
{
	struct counter_key k = {.service = service};
	__builtin_memcpy(&k.ep, ep, sizeof(k.ep));
	struct endpoint_counters *c = bpf_map_lookup_elem(&counters, &k);
	if (c)
		return c;
	// The daemon creates the entries of the endpoints it writes; this is
	// for a table swapped in before them.
	struct endpoint_counters zero = {};
	if (bpf_map_update_elem(&counters, &k, &zero, BPF_NOEXIST) == -7 /* E2BIG */)
		count(STAT_COUNTERS_FULL);
	return bpf_map_lookup_elem(&counters, &k);
}

static __always_inline int is_dead(__u64 cookie, struct endpoint *ep, __u64 now)
{
	struct dead_key k = {.cookie = cookie};
	__builtin_memcpy(&k.ep, ep, sizeof(k.ep));
	__u64 *t = bpf_map_lookup_elem(&dead, &k);
	return t && now - *t < DEAD_HOLD_NS;
}

// scan is the state of pick's scan of a table, one endpoint per call of
// scan_one (bpf_loop keeps the verifier from walking every path of it).
struct scan {
	struct table *t;
	__u64 cookie;
	__u64 now;
	__u32 n;
	__u32 start;
	__u32 out;  // endpoints marked dead for the namespace
	__s32 live; // the first one not marked, or -1
};

static long scan_one(__u32 i, void *data)
{
	struct scan *sc = data;
	__u32 j = sc->start + i;
	if (j >= sc->n)
		j -= sc->n;
	struct endpoint *ep = &sc->t->ep[j & (MAX_ENDPOINTS - 1)];
	if (is_dead(sc->cookie, ep, sc->now))
		sc->out++;
	else if (sc->live < 0)
		sc->live = j & (MAX_ENDPOINTS - 1);
	return 0;
}

// pick returns the table and endpoint for a connect routed by k, or NULL.
static __always_inline struct endpoint *pick(struct route_key *k, struct table **tp)
{
	__u32 *id = bpf_map_lookup_elem(&routes, k);
	if (!id)
		return 0;
	void *inner = bpf_map_lookup_elem(&tables, id);
	if (!inner)
		return 0;
	__u32 zero = 0;
	struct table *t = bpf_map_lookup_elem(inner, &zero);
	if (!t || t->nslots != NSLOTS)
		return 0;
	*tp = t;
	__u64 now = bpf_ktime_get_ns();
	struct endpoint *drawn = 0;
#pragma unroll
	for (int i = 0; i < DRAWS; i++) {
		__u32 s = bpf_get_prandom_u32() & (NSLOTS - 1);
		drawn = &t->ep[t->slot[s] & (MAX_ENDPOINTS - 1)];
		if (!is_dead(k->cookie, drawn, now))
			return drawn;
	}
	// The draws found only endpoints that failed for this namespace: take
	// any live one, unless this namespace's evidence alone would leave
	// less than half of the table, which it is not trusted to do (Envoy's
	// panic threshold); then the marks are ignored until the daemon's
	// probes confirm them and it rewrites the table.
	__u32 n = t->nendpoints;
	if (n == 0 || n > MAX_ENDPOINTS)
		return 0;
	__u32 start = bpf_get_prandom_u32() % n;
	struct scan sc = {.t = t, .cookie = k->cookie, .now = now, .n = n, .start = start, .live = -1};
	bpf_loop(n, scan_one, &sc, 0);
	if (sc.live >= 0 && 2 * sc.out <= n)
		return &t->ep[sc.live & (MAX_ENDPOINTS - 1)];
	count(STAT_PASSIVE_CAP);
	return drawn;
}

// remember stores where a socket really went and where it asked to go.
static __always_inline int remember(struct bpf_sock_addr *ctx, __u64 cookie, struct table *t,
				    struct endpoint *ep, __u32 orig[4], __u8 v4)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	struct sock_state *st = bpf_sk_storage_get(&socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(STAT_STORAGE_FAILED);
		return 0;
	}
	st->cookie = cookie;
	st->service = t->service;
	__builtin_memcpy(&st->ep, ep, sizeof(st->ep));
	st->orig_addr[0] = orig[0];
	st->orig_addr[1] = orig[1];
	st->orig_addr[2] = orig[2];
	st->orig_addr[3] = orig[3];
	st->orig_port = (__u16)ctx->user_port;
	st->v4 = v4;
	st->reported = 0;
	struct endpoint_counters *c = counters_of(t->service, ep);
	if (c)
		__sync_fetch_and_add(&c->connects, 1);
	return 1;
}

// forget drops what an earlier rewritten connect of the socket left: a
// connect that is not rewritten must not answer getpeername with the
// earlier address, nor be watched by sockops.
static __always_inline void forget(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (sk && bpf_sk_storage_delete(&socks, sk) == 0)
		count(STAT_CLEARED);
}

static __always_inline int is_tcp(struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
}

static __always_inline int is_v4_mapped(struct endpoint *ep)
{
	return ep->addr[0] == 0 && ep->addr[1] == 0 && ep->addr[2] == bpf_htonl(0xffff);
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	if (!is_tcp(ctx))
		return 1;
	__u32 dst = ctx->user_ip4;
	if ((bpf_ntohl(dst) >> 24) != 127) {
		forget(ctx);
		return 1;
	}
	struct route_key k = {
		.cookie = bpf_get_netns_cookie(ctx),
		.port = bpf_ntohs((__u16)ctx->user_port),
		.family = AF_INET,
	};
	struct table *t = 0;
	struct endpoint *ep = pick(&k, &t);
	// An AF_INET socket can only go to an IPv4 endpoint; the daemon puts
	// only those in an AF_INET table, this guards against anything else.
	__u32 orig[4] = {0, 0, bpf_htonl(0xffff), dst};
	if (!ep || !t || !is_v4_mapped(ep) || !remember(ctx, k.cookie, t, ep, orig, 1)) {
		forget(ctx);
		return 1;
	}
	ctx->user_ip4 = ep->addr[3];
	ctx->user_port = ep->port;
	return 1;
}

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	if (!is_tcp(ctx))
		return 1;
	__u32 orig[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	struct route_key k = {
		.cookie = 0,
		.port = bpf_ntohs((__u16)ctx->user_port),
	};
	if (orig[0] == 0 && orig[1] == 0 && orig[2] == 0 && orig[3] == bpf_htonl(1))
		k.family = AF_INET6; // ::1
	else if (orig[0] == 0 && orig[1] == 0 && orig[2] == bpf_htonl(0xffff) &&
		 (bpf_ntohl(orig[3]) >> 24) == 127)
		k.family = AF_INET; // ::ffff:127.x.y.z is IPv4 loopback traffic
	else {
		forget(ctx);
		return 1;
	}
	k.cookie = bpf_get_netns_cookie(ctx);
	struct table *t = 0;
	struct endpoint *ep = pick(&k, &t);
	if (!ep || !t) {
		forget(ctx);
		return 1;
	}
	// A connect to ::1 may come from an IPV6_V6ONLY socket, which cannot
	// reach a v4-mapped address: such a table is a daemon's mistake, and
	// the relay serves the connect rather than the kernel failing it.
	if (k.family == AF_INET6 && is_v4_mapped(ep)) {
		count(STAT_V6ONLY);
		forget(ctx);
		return 1;
	}
	if (!remember(ctx, k.cookie, t, ep, orig, 0)) {
		forget(ctx);
		return 1;
	}
	ctx->user_ip6[0] = ep->addr[0];
	ctx->user_ip6[1] = ep->addr[1];
	ctx->user_ip6[2] = ep->addr[2];
	ctx->user_ip6[3] = ep->addr[3];
	ctx->user_port = ep->port;
	return 1;
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sock_state *st = bpf_sk_storage_get(&socks, sk, 0, 0);
	if (!st || !st->v4)
		return 1;
	ctx->user_ip4 = st->orig_addr[3];
	ctx->user_port = st->orig_port;
	return 1;
}

SEC("cgroup/getpeername6")
int sock_getpeername6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sock_state *st = bpf_sk_storage_get(&socks, sk, 0, 0);
	if (!st || st->v4)
		return 1;
	ctx->user_ip6[0] = st->orig_addr[0];
	ctx->user_ip6[1] = st->orig_addr[1];
	ctx->user_ip6[2] = st->orig_addr[2];
	ctx->user_ip6[3] = st->orig_addr[3];
	ctx->user_port = st->orig_port;
	return 1;
}

// spend takes one report from the namespace's budget.
static __always_inline int spend(__u64 cookie, __u64 now)
{
	struct budget *b = bpf_map_lookup_elem(&budgets, &cookie);
	if (!b) {
		struct budget full = {.at = now, .tokens = EVENT_BURST - 1};
		bpf_map_update_elem(&budgets, &cookie, &full, BPF_ANY);
		return 1;
	}
	// Racy between CPUs, which can only make the budget a little larger.
	__u64 refill = (now - b->at) * EVENT_RATE / (1000ULL * 1000 * 1000);
	if (refill > 0) {
		__u64 tokens = b->tokens + refill;
		b->tokens = tokens > EVENT_BURST ? EVENT_BURST : tokens;
		b->at = now;
	}
	if (b->tokens == 0)
		return 0;
	b->tokens--;
	return 1;
}

// report marks the socket's endpoint dead for its namespace, counts the
// failure once per socket and tells the daemon.
static __always_inline void report(struct sock_state *st, enum event_kind kind)
{
	if (st->reported)
		return;
	st->reported = 1;
	__u64 now = bpf_ktime_get_ns();
	if (!spend(st->cookie, now)) {
		count(STAT_OVER_BUDGET);
		return;
	}
	struct dead_key k = {.cookie = st->cookie};
	__builtin_memcpy(&k.ep, &st->ep, sizeof(k.ep));
	if (bpf_map_update_elem(&dead, &k, &now, BPF_ANY) != 0)
		count(STAT_DEAD_FULL);
	struct endpoint_counters *c = counters_of(st->service, &st->ep);
	if (c)
		__sync_fetch_and_add(&c->failures, 1);
	struct event ev = {.cookie = st->cookie, .service = st->service, .kind = kind};
	__builtin_memcpy(&ev.ep, &st->ep, sizeof(ev.ep));
	if (bpf_ringbuf_output(&events, &ev, sizeof(ev), 0) != 0)
		count(STAT_RINGBUF_FULL);
	else
		count(STAT_EVIDENCE);
}

// remote_failure tells whether a socket going from SYN_SENT to CLOSE was
// ended by the other side. tcp_reset(), tcp_v4_err()/tcp_v6_err() and
// tcp_write_err() set sk_err before tcp_done() closes the socket; the
// application's close() or abort (SO_LINGER 0, a killed process) goes
// through tcp_close(), which sets sk_shutdown to SHUTDOWN_MASK and leaves
// sk_err at 0; connect(AF_UNSPEC) sets sk_err only after the state change;
// a socket destroyed by the host (sock_diag, ss -K) has ECONNABORTED.
static __always_inline int remote_failure(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	struct sock___sp *s = (struct sock___sp *)bpf_skc_to_tcp_sock(sk);
	if (!s)
		return 0;
	int err = BPF_CORE_READ(s, sk_err);
	__u8 shutdown = BPF_CORE_READ(s, sk_shutdown);
	return err != 0 && err != ECONNABORTED && shutdown != SHUTDOWN_MASK;
}

// bound_silence applies the daemon's silence bound to an established
// socket, as the relay does to its backend sockets: TCP_USER_TIMEOUT ends
// it when sent data stays unacknowledged, keepalive probes when it is idle
// (with a user timeout set, the kernel ends an idle one once the peer has
// been silent that long with a probe out). What the application set itself
// before the connect completed is kept: a TCP_USER_TIMEOUT other than 0,
// or SO_KEEPALIVE on (then its keepalive settings are its own). An
// application that sets them later overrides these.
static __always_inline void bound_silence(struct bpf_sock_ops *skops)
{
	__u32 zero = 0;
	struct silence_bound *b = bpf_map_lookup_elem(&silence, &zero);
	if (!b || b->user_timeout_ms == 0)
		return;
	// Kernels before 6.1 read neither option through bpf_getsockopt:
	// their sockets are left alone, and counted.
	int v = 0;
	int err = bpf_getsockopt(skops, IPPROTO_TCP, TCP_USER_TIMEOUT, &v, sizeof(v));
	if (err == 0 && v == 0) {
		v = b->user_timeout_ms;
		err |= bpf_setsockopt(skops, IPPROTO_TCP, TCP_USER_TIMEOUT, &v, sizeof(v));
	}
	v = 1;
	int kerr = bpf_getsockopt(skops, SOL_SOCKET, SO_KEEPALIVE, &v, sizeof(v));
	err |= kerr;
	if (kerr == 0 && v == 0) {
		// The timings first: turning keepalive on arms its timer with
		// the idle time set at that moment.
		v = b->keepidle;
		err |= bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPIDLE, &v, sizeof(v));
		v = b->keepintvl;
		err |= bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPINTVL, &v, sizeof(v));
		v = b->keepcnt;
		err |= bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPCNT, &v, sizeof(v));
		v = 1;
		err |= bpf_setsockopt(skops, SOL_SOCKET, SO_KEEPALIVE, &v, sizeof(v));
	}
	if (err)
		count(STAT_UNBOUNDED);
}

SEC("sockops")
int sock_ops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	struct sock_state *st = bpf_sk_storage_get(&socks, sk, 0, 0);
	if (!st)
		return 1; // not a socket the connect programs rewrote
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		bound_silence(skops);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG);
		break;
	case BPF_SOCK_OPS_RTO_CB:
		if (skops->state == BPF_TCP_SYN_SENT)
			report(st, EVENT_SYN_RETRY);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[0] != BPF_TCP_SYN_SENT)
			break;
		if (skops->args[1] == BPF_TCP_CLOSE) {
			if (remote_failure(skops))
				report(st, EVENT_FAILED);
			else if (!st->reported)
				count(STAT_LOCAL_CLOSE);
		} else { // established: nothing more to watch
			bpf_sock_ops_cb_flags_set(skops, 0);
		}
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
