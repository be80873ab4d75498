package proxy_test

import (
	"context"
	"log"
	"net/netip"

	"github.com/connectable/connectable/proxy"
)

// static is a Resolver with fixed answers; connectable's resolver/ asks DNS.
type static map[string][]netip.AddrPort

func (s static) Lookup(ctx context.Context, service string) ([]netip.AddrPort, error) {
	return s[service], nil
}

// A container whose label says connect.6379=redis.service.consul: once
// Apply returns, software in its namespace that connects to localhost:6379
// reaches one of the redis endpoints. Without a Redirector nothing sends
// the container's connections to the proxy port; in connectable the
// iptables package does.
func ExampleServer() {
	srv := &proxy.Server{
		Resolver: static{"redis.service.consul": {
			netip.MustParseAddrPort("198.18.0.10:6379"),
			netip.MustParseAddrPort("198.18.0.11:6379"),
		}},
	}
	defer srv.Close()

	ctx := context.Background()
	routes := map[uint16]string{6379: "redis.service.consul"}
	if err := srv.Apply(ctx, "container-id", "/proc/1234/ns/net", routes); err != nil {
		log.Print(err)
		return
	}
	for _, ns := range srv.Namespaces() {
		log.Printf("%s: proxy port %d, IPv6 %v", ns.Key, ns.Port, ns.IPv6)
	}
	// The container died.
	if err := srv.Remove(ctx, "container-id"); err != nil {
		log.Print(err)
	}
}
