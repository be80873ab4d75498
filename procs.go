package main

import "runtime"

// setProcs gives the Go scheduler half the CPUs it would use by default, at
// least one, unless the GOMAXPROCS variable sets the number. It returns the
// number in effect.
//
// connectable only relays for containers on its own host: their clients, and
// often their backends, run on the same CPUs, and the kernel's TCP work for
// each relayed connection lands there too. A second P then mostly adds wake-ups
// of idle threads across CPUs. On the 2-CPU bench host (bench/README.md) under
// ab, one P instead of two cut the voluntary context switches per relayed
// connection from 1.1 to 0.15 and the kernel time from about 102 to 80 µs, and
// raised new connections per second by 13–15%, with keep-alive requests, bulk
// throughput and latency unchanged within the noise.
//
// Go's own default already follows a container's CPU limit; once set here, it
// no longer tracks later changes of that limit, which a daemon's rarely has.
func setProcs(getenv func(string) string) int {
	if getenv("GOMAXPROCS") != "" {
		return runtime.GOMAXPROCS(0)
	}
	n := max(1, runtime.GOMAXPROCS(0)/2)
	runtime.GOMAXPROCS(n)
	return n
}
