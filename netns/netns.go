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
// Typical usage:
//
//	err := netns.Do("/proc/1234/ns/net", func() error {
//		ln, err = net.Listen("tcp", "127.0.0.1:0")
//		return err
//	})
//
//	v4, v6, err := netns.Listen("/proc/1234/ns/net", 0) // v6 is nil without ::1
package netns

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn on a thread that is inside the network namespace at path, then
// returns the thread to the namespace it came from. An empty path runs fn
// where the caller already is. If the thread cannot be switched back it stays
// locked, so the Go runtime destroys it when the goroutine ends rather than
// reusing a thread in the wrong namespace. The same holds when fn panics: the
// thread is switched back first, then the panic goes on.
func Do(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	// Raw descriptors: os.Open would also try to register them with the
	// poller, a wasted system call on a path that runs for every namespace.
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer unix.Close(target)

	runtime.LockOSThread()
	// The thread's own namespace, not the process's: /proc/self names the
	// thread group leader, which may be elsewhere.
	origin, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("opening current network namespace: %w", err)
	}
	defer unix.Close(origin)

	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering network namespace %s: %w", path, err)
	}
	back := false
	defer func() {
		// Runs on a panic in fn too; on the normal path back is already set.
		if !back {
			if unix.Setns(origin, unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			}
		}
	}()
	fnErr := fn()
	back = true
	if err := unix.Setns(origin, unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: the runtime kills it with the goroutine.
		return fmt.Errorf("returning from network namespace %s: %w", path, err)
	}
	runtime.UnlockOSThread()
	return fnErr
}
