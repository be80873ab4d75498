// Package netns runs small pieces of work inside another network namespace
// and opens connectable's listeners there.
//
// A Linux thread, not a process, belongs to a network namespace. Do locks the
// calling goroutine to its OS thread, switches that thread into the target
// namespace, runs the work and switches back. Sockets created inside keep the
// namespace they were created in, and a child process started from the thread
// inherits it, so one socket call or one exec is all a closure should hold.
// Never start goroutines inside: they may run on other threads.
//
// A namespace the daemon sets up is entered through a Handle (handle.go): a
// descriptor opened once, when its container is seen, and used for every
// later operation, never the /proc/<pid> path again, which a reused PID
// would point elsewhere. A Handle's Name stands wherever a path is taken;
// a released Handle's name is never entered (ErrClosed), and no Handle
// enters the host's namespace or the daemon's own, checked on the
// descriptor right before setns.
//
// Typical usage:
//
//	h, err := netns.Open("/proc/1234/ns/net") // once; h.Release() after the last use
//	err = netns.Do(h.Name(), func() error {
//		ln, err = net.Listen("tcp", "127.0.0.1:0")
//		return err
//	})
//
//	v4, v6, err := netns.Listen(h.Name(), 0) // v6 is nil without ::1
package netns

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Do runs fn on a thread that is inside the network namespace at path (or
// named by a Handle's Name: then as Handle.Do), then
// returns the thread to the namespace it came from. An empty path runs fn
// where the caller already is. If the thread cannot be switched back it stays
// locked, so the Go runtime destroys it when the goroutine ends rather than
// reusing a thread in the wrong namespace. The same holds when fn panics: the
// thread is switched back first, then the panic goes on.
func Do(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	if IsHandle(path) {
		h := lookup(path)
		if h == nil {
			return fmt.Errorf("entering network namespace %s: %w", path, ErrClosed)
		}
		return h.Do(fn)
	}
	// Raw descriptors: os.Open would also try to register them with the
	// poller, a wasted system call on a path that runs for every namespace.
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer unix.Close(target)
	return enter(target, path, fn)
}
