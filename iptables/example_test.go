package iptables_test

import (
	"log"
	"net"

	"github.com/connectable/connectable/iptables"
	"github.com/connectable/connectable/netns"
)

// The proxy's set-up of one container's namespace: listeners first, then
// the rules that send the labelled ports to them. A restarted daemon asks
// Port first, so the rules of its previous run keep pointing at a listener.
func Example() {
	const path = "/proc/1234/ns/net"
	nat, err := iptables.New(iptables.Config{Backend: "auto"})
	if err != nil {
		log.Fatal(err)
	}
	port, err := nat.Port(path) // 0 on first set-up: the kernel picks one
	if err != nil {
		log.Fatal(err)
	}
	v4, v6, err := netns.Listen(path, port)
	if err != nil {
		log.Fatal(err)
	}
	defer v4.Close()
	if v6 != nil {
		defer v6.Close()
	}
	if err := nat.Apply(path, []uint16{6000, 8500}, uint16(v4.Addr().(*net.TCPAddr).Port)); err != nil {
		log.Fatal(err)
	}
	// ... accept on v4 and v6; on the container's death, nat.Clear(path).
}
