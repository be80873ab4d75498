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
// choice), skips endpoints the kernel saw fail, rewrites the destination and
// remembers the original one in socket storage, so that getpeername()
// answers with the address the application connected to. A sockops program
// watches those sockets only: a connect that fails or retransmits its SYN
// marks the endpoint dead at once and tells the daemon through a ring
// buffer. If no live endpoint is drawn, the connect is not rewritten and the
// REDIRECT rule beneath sends it to the relay, which fails over itself.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

// Keep in step with sockpath/kernel.go.
#define MAX_ENDPOINTS 64
#define NSLOTS 1024 // a power of two: a draw is a mask, without modulo bias
#define DRAWS 4 // weighted draws before a scan for any live endpoint
// A dead mark older than this is ignored, so that endpoints come back on
// their own while no daemon is there to probe them.
#define DEAD_HOLD_NS (30ULL * 1000 * 1000 * 1000)

#define EVENT_FAILED 1	 // the connect failed (reset, unreachable)
#define EVENT_SYN_RETRY 2 // the SYN timed out once and is retransmitted

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

struct sock_state {
	__u32 service;
	struct endpoint ep; // where the connect went
	__u32 orig_addr[4]; // what the application asked for
	__u16 orig_port;
	__u8 v4; // the socket is AF_INET: orig_addr[3] is the address
	__u8 reported; // an event was sent for this socket
};

struct event {
	__u32 service;
	__u32 kind; // EVENT_*
	struct endpoint ep;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct endpoint);
	__type(value, __u64); // bpf_ktime_get_ns when marked
} dead SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct counter_key);
	__type(value, struct endpoint_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

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
	bpf_map_update_elem(&counters, &k, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&counters, &k);
}

static __always_inline int is_dead(struct endpoint *ep, __u64 now)
{
	__u64 *t = bpf_map_lookup_elem(&dead, ep);
	return t && now - *t < DEAD_HOLD_NS;
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
	__u64 now = bpf_ktime_get_ns();
#pragma unroll
	for (int i = 0; i < DRAWS; i++) {
		__u32 s = bpf_get_prandom_u32() & (NSLOTS - 1);
		struct endpoint *ep = &t->ep[t->slot[s] & (MAX_ENDPOINTS - 1)];
		if (!is_dead(ep, now)) {
			*tp = t;
			return ep;
		}
	}
	// The draws found only endpoints that failed since the daemon last
	// wrote the table: take any live one, until the daemon rewrites it.
	__u32 n = t->nendpoints;
	if (n == 0 || n > MAX_ENDPOINTS)
		return 0;
	__u32 start = bpf_get_prandom_u32() % n;
	for (__u32 i = 0; i < MAX_ENDPOINTS && i < n; i++) {
		__u32 j = start + i;
		if (j >= n)
			j -= n;
		struct endpoint *ep = &t->ep[j & (MAX_ENDPOINTS - 1)];
		if (!is_dead(ep, now)) {
			*tp = t;
			return ep;
		}
	}
	return 0;
}

// remember stores where a socket really went and where it asked to go.
static __always_inline int remember(struct bpf_sock_addr *ctx, struct table *t, struct endpoint *ep,
				    __u32 orig[4], __u8 v4)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	struct sock_state *st = bpf_sk_storage_get(&socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return 0;
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

static __always_inline int is_tcp(struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	if (!is_tcp(ctx))
		return 1;
	__u32 dst = ctx->user_ip4;
	if ((bpf_ntohl(dst) >> 24) != 127)
		return 1;
	struct route_key k = {
		.cookie = bpf_get_netns_cookie(ctx),
		.port = bpf_ntohs((__u16)ctx->user_port),
		.family = AF_INET,
	};
	struct table *t = 0;
	struct endpoint *ep = pick(&k, &t);
	// An AF_INET socket can only go to an IPv4 endpoint; the daemon puts
	// only those in an AF_INET table, this guards against anything else.
	if (!ep || !t || ep->addr[0] != 0 || ep->addr[1] != 0 || ep->addr[2] != bpf_htonl(0xffff))
		return 1;
	__u32 orig[4] = {0, 0, bpf_htonl(0xffff), dst};
	if (!remember(ctx, t, ep, orig, 1))
		return 1;
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
	if (orig[0] != 0 || orig[1] != 0)
		return 1;
	if (orig[2] == 0 && orig[3] == bpf_htonl(1))
		k.family = AF_INET6; // ::1
	else if (orig[2] == bpf_htonl(0xffff) && (bpf_ntohl(orig[3]) >> 24) == 127)
		k.family = AF_INET; // ::ffff:127.x.y.z is IPv4 loopback traffic
	else
		return 1;
	k.cookie = bpf_get_netns_cookie(ctx);
	struct table *t = 0;
	struct endpoint *ep = pick(&k, &t);
	if (!ep || !t)
		return 1;
	if (!remember(ctx, t, ep, orig, 0))
		return 1;
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

// report marks the socket's endpoint dead, counts the failure once per
// socket and tells the daemon.
static __always_inline void report(struct sock_state *st, __u32 kind)
{
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&dead, &st->ep, &now, BPF_ANY);
	if (st->reported)
		return;
	st->reported = 1;
	struct endpoint_counters *c = counters_of(st->service, &st->ep);
	if (c)
		__sync_fetch_and_add(&c->failures, 1);
	struct event ev = {.service = st->service, .kind = kind};
	__builtin_memcpy(&ev.ep, &st->ep, sizeof(ev.ep));
	bpf_ringbuf_output(&events, &ev, sizeof(ev), 0);
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
		if (skops->args[1] == BPF_TCP_CLOSE)
			report(st, EVENT_FAILED);
		else // established: nothing more to watch
			bpf_sock_ops_cb_flags_set(skops, 0);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
