package netns

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A Handle is an open descriptor of one network namespace, so that every
// operation on that namespace enters the same one: a path such as
// /proc/<pid>/ns/net names whatever process holds the PID now, and after the
// container's process exits a reused PID would send listeners and rules into
// another tenant's namespace, or the host's.
//
// A Handle is reference-counted: Open and FromFD return it with one
// reference, Acquire adds one, Release drops one, and the descriptor is
// closed with the last. An operation in flight (Do) holds a reference of its
// own, so a Release during a set-up never closes the descriptor under it.
//
// A Handle is also named by a string (Name) that Do, Listen and Gone accept
// wherever they accept a path: the packages that run operations in a
// namespace (iptables, proxy) keep their string APIs, and the name, with a
// serial number drawn once per process, never names another namespace, even
// after the descriptor number is reused.
type Handle struct {
	name   string
	origin string // where it was opened, for logs
	ino    uint64
	fd     int

	mu   sync.Mutex
	refs int // 0: closed
}

// handlePrefix starts every Handle's name; no path starts with it.
const handlePrefix = "netns-handle:"

var (
	serial   atomic.Uint64
	handlesM sync.Mutex
	handles  = make(map[string]*Handle) // open handles by name
)

// ErrClosed is returned for a Handle, or a Handle's name, whose last
// reference was released: its namespace may not exist any more, and whatever
// it was is not entered. errors.Is(err, fs.ErrNotExist) holds for it too.
var ErrClosed = fmt.Errorf("network namespace handle closed: %w", fs.ErrNotExist)

// ErrForbidden is returned when the namespace to enter is the host's (that of
// PID 1 when this process started) or this process's own: rules or
// listeners there would capture the host's traffic.
var ErrForbidden = errors.New("network namespace is the host's or this daemon's own")

// forbidden holds the inodes of the host's and the daemon's own network
// namespace, as seen the first time a Handle is made.
var forbidden = sync.OnceValue(func() map[uint64]bool {
	m := make(map[uint64]bool, 2)
	for _, p := range []string{"/proc/1/ns/net", "/proc/self/ns/net"} {
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil {
			m[st.Ino] = true
		}
	}
	return m
})

// Open opens the network namespace at path (a namespace file such as
// /proc/<pid>/ns/net or a bind mount of one) and returns a Handle to it with
// one reference. It refuses the host's namespace and its own.
func Open(path string) (*Handle, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	h, err := FromFD(fd, path)
	if err != nil {
		return nil, err
	}
	return h, nil
}

// FromFD makes a Handle of fd, a descriptor of a network namespace, and takes
// ownership of it: fd is closed with the Handle's last reference, or at once
// if FromFD fails. origin says where it came from, for logs. It refuses the
// host's namespace and its own, and a descriptor of anything but a network
// namespace.
func FromFD(fd int, origin string) (*Handle, error) {
	ino, err := inodeOf(fd, origin)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	h := &Handle{
		name:   handlePrefix + strconv.FormatUint(serial.Add(1), 10),
		origin: origin,
		ino:    ino,
		fd:     fd,
		refs:   1,
	}
	handlesM.Lock()
	handles[h.name] = h
	handlesM.Unlock()
	return h, nil
}

// inodeOf checks that fd is a network namespace that may be entered and
// returns its inode.
func inodeOf(fd int, origin string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return 0, fmt.Errorf("network namespace %s: %w", origin, err)
	}
	if fs.Type != unix.NSFS_MAGIC {
		return 0, fmt.Errorf("network namespace %s: not a namespace file", origin)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("network namespace %s: %w", origin, err)
	}
	if forbidden()[st.Ino] {
		return 0, fmt.Errorf("network namespace %s (inode %d): %w", origin, st.Ino, ErrForbidden)
	}
	return st.Ino, nil
}

// Name returns the string that names h for Do, Listen and Gone.
func (h *Handle) Name() string { return h.name }

// Inode returns the inode of h's namespace: two handles with one inode name
// one namespace.
func (h *Handle) Inode() uint64 { return h.ino }

// Origin returns the path h was opened from, for logs.
func (h *Handle) Origin() string { return h.origin }

// String is h for logs.
func (h *Handle) String() string {
	return fmt.Sprintf("%s (inode %d, %s)", h.origin, h.ino, h.name)
}

// Acquire adds a reference to h and reports whether it could: false once
// the last reference was released.
func (h *Handle) Acquire() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.refs == 0 {
		return false
	}
	h.refs++
	return true
}

// Release drops a reference to h, closing its descriptor with the last.
// Releasing more references than were taken panics: it would close a
// descriptor that another owner still uses, or one that now names something
// else.
func (h *Handle) Release() {
	h.mu.Lock()
	if h.refs == 0 {
		h.mu.Unlock()
		panic("netns: Release of a closed Handle " + h.name)
	}
	h.refs--
	last := h.refs == 0
	h.mu.Unlock()
	if !last {
		return
	}
	handlesM.Lock()
	delete(handles, h.name)
	handlesM.Unlock()
	unix.Close(h.fd)
}

// Closed reports whether h's last reference was released.
func (h *Handle) Closed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.refs == 0
}

// Do runs fn inside h's namespace, as the package's Do does for a path.
// Right before entering it checks, on the descriptor, that the namespace is
// neither the host's nor this process's own; it fails with ErrClosed if h
// was released.
func (h *Handle) Do(fn func() error) error {
	if !h.Acquire() {
		return fmt.Errorf("entering network namespace %s: %w", h, ErrClosed)
	}
	defer h.Release()
	// The inode was checked when the Handle was made; checked again on the
	// descriptor itself, right before setns, so that no path from a
	// mistaken descriptor into the host's namespace exists.
	if _, err := inodeOf(h.fd, h.String()); err != nil {
		return fmt.Errorf("entering network namespace: %w", err)
	}
	return enter(h.fd, h.String(), fn)
}

// Listen opens connectable's listeners inside h's namespace; see the
// package's Listen.
func (h *Handle) Listen(port uint16) (v4, v6 *net.TCPListener, err error) {
	return Listen(h.name, port)
}

// Hold takes a reference to the Handle that name names and returns the
// function that drops it; for a path (not a Handle's name) it does nothing.
// A space that keeps using a namespace after the caller that handed it over
// let go (a listener's teardown, the rules' removal) holds it this way.
func Hold(name string) (release func(), err error) {
	if !IsHandle(name) {
		return func() {}, nil
	}
	h := lookup(name)
	if h == nil || !h.Acquire() {
		return nil, fmt.Errorf("network namespace %s: %w", name, ErrClosed)
	}
	var once sync.Once
	return func() { once.Do(h.Release) }, nil
}

// IsHandle reports whether name names a Handle rather than a path.
func IsHandle(name string) bool { return strings.HasPrefix(name, handlePrefix) }

// Gone reports whether the namespace that name names no longer exists as
// far as this process can tell: a Handle's name whose Handle was released,
// or a path that disappeared. Its rules went with it, or are not ours to
// touch any more: teardown of it is a no-op.
func Gone(name string) bool {
	if name == "" {
		return false
	}
	if IsHandle(name) {
		return lookup(name) == nil
	}
	var st unix.Stat_t
	return errors.Is(unix.Stat(name, &st), unix.ENOENT)
}

// Describe returns name for people: for a Handle's name, where the Handle
// was opened, its inode and the name; a path as it is.
func Describe(name string) string {
	if !IsHandle(name) {
		return name
	}
	if h := lookup(name); h != nil {
		return h.String()
	}
	return name + " (released)"
}

func lookup(name string) *Handle {
	handlesM.Lock()
	defer handlesM.Unlock()
	return handles[name]
}

// enter runs fn on a thread inside the namespace of the descriptor target
// (see Do).
func enter(target int, what string, fn func() error) error {
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
		return fmt.Errorf("entering network namespace %s: %w", what, err)
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
		return fmt.Errorf("returning from network namespace %s: %w", what, err)
	}
	runtime.UnlockOSThread()
	return fnErr
}
