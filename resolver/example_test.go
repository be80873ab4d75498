package resolver_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/connectable/connectable/resolver"
)

func Example() {
	// As main does with --dns or CONNECTABLE_DNS; "" would mean /etc/resolv.conf.
	servers, err := resolver.ParseServers("127.0.0.1:8600")
	if err != nil {
		fmt.Println(err)
		return
	}
	r, err := resolver.New(resolver.Config{Servers: servers})
	if err != nil {
		fmt.Println(err)
		return
	}
	// An ip:port value needs no DNS; a name such as redis.service.consul
	// would be looked up as SRV.
	eps, err := r.Lookup(context.Background(), "192.0.2.10:6379")
	if errors.Is(err, resolver.ErrNoSuchName) {
		fmt.Println("no such service")
		return
	}
	for _, ep := range eps {
		fmt.Println("dial", ep)
	}
	// Output: dial 192.0.2.10:6379
}

func ExampleParseServers() {
	servers, err := resolver.ParseServers("10.0.0.2,10.0.0.3:8600,fd00::53,[fd00::54]:8600")
	fmt.Println(servers, err)
	_, err = resolver.ParseServers("10.0.0.2,consul:8600")
	fmt.Println(err)
	// Output:
	// [10.0.0.2:53 10.0.0.3:8600 [fd00::53]:53 [fd00::54]:8600] <nil>
	// dns server "consul:8600": "consul" is not an IP address
}

func ExampleValidate() {
	for _, v := range []string{"redis.service.consul", "db.example.com:5432", "[fd00::1]:80", "redis..consul", "10.0.0.1"} {
		fmt.Println(resolver.Validate(v))
	}
	// Output:
	// <nil>
	// <nil>
	// <nil>
	// invalid value "redis..consul": empty label
	// invalid value "10.0.0.1": an IP address needs a port (ip:port)
}
