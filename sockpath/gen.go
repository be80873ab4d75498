package sockpath

// The programs are C (bpf/sockpath.c), compiled by clang through bpf2go; the
// compiled objects are committed, so a build needs neither clang nor
// kernel headers. Run `go generate ./sockpath` after changing the C
// (scripts/setup.sh installs clang and libbpf-dev). The enums give the Go
// side its constants, so they are written once, in the C.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type route_key -type endpoint -type table -type counter_key -type endpoint_counters -type sock_state -type dead_key -type event -type sockpath_const -type event_kind -type stat -type silence_bound kern bpf/sockpath.c -- -I/usr/include/x86_64-linux-gnu
