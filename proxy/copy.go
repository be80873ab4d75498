package proxy

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// copyBufSize is the buffer of the small-message mode of a relay direction.
// A read that fills it means the peer sends faster than one buffer per
// wake-up: bulk, which the direction then splices.
const copyBufSize = 8 << 10

// copyBufs is a free list of small-message buffers. A direction takes one
// only while it has bytes in hand, so an idle relayed connection holds none.
// Unlike a sync.Pool, which every garbage collection empties (and a storm of
// short connections collects often), it keeps its working set; its capacity
// bounds what a burst can leave pinned (2 MiB).
var copyBufs = make(chan *[copyBufSize]byte, 256)

func getBuf() *[copyBufSize]byte {
	select {
	case b := <-copyBufs:
		return b
	default:
		return new([copyBufSize]byte)
	}
}

func putBuf(b *[copyBufSize]byte) {
	select {
	case copyBufs <- b:
	default:
	}
}

// errBulk tells halfCopy to switch a direction to splice.
var errBulk = errors.New("bulk transfer")

// copyResult is what one direction of a relay reports when it ends.
type copyResult struct {
	n   int64
	err error
}

// relay is one relayed connection: client and backend, copied both ways by
// copyUp and copyDown until both have ended. A direction that ends cleanly
// (EOF) passes the half-close on and lets the other go on; a direction that
// fails (a reset, or Close cutting the connection) aborts both at once.
// Whichever goroutine ends last closes both connections and reports.
//
// Each direction starts by moving bytes with read and write through a pooled
// buffer, and switches to splice(2) for good once a read fills the buffer.
// Request/response traffic (HTTP, Redis, SQL) thus costs the same syscalls
// as a plain read/write loop, and no pipe; bulk transfers never enter user
// space after their first buffer. Nothing here logs.
type relay struct {
	s               *Server
	sp              *space
	sc              *serviceCounters
	client, backend *net.TCPConn
	ep              netip.AddrPort
	start           time.Time
	// up counts bytes from client to backend, down the other way. Each is
	// written by its goroutine before it decrements running, and read by
	// the one that brings running to zero.
	up, down copyResult
	running  atomic.Int32
}

// Close cuts both connections; Server.Close uses it after the drain.
func (r *relay) Close() error {
	r.client.Close()
	r.backend.Close()
	return nil
}

var _ io.Closer = (*relay)(nil)

// copyUp copies the client's bytes to the backend. Each direction has its
// own named function so that stack dumps say which one is stuck.
func copyUp(r *relay) {
	defer r.s.handlers.Done()
	r.up.n, r.up.err = r.halfCopy(r.backend, r.client)
	r.directionDone(r.up.err, r.backend)
}

// copyDown copies the backend's bytes to the client.
func copyDown(r *relay) {
	defer r.s.handlers.Done()
	r.down.n, r.down.err = r.halfCopy(r.client, r.backend)
	r.directionDone(r.down.err, r.client)
}

// directionDone ends one direction, whose error is err and whose
// destination, the other direction's source, is other.
func (r *relay) directionDone(err error, other *net.TCPConn) {
	if r.running.Add(-1) > 0 {
		if err == nil {
			// A clean end (FIN): the other direction now has to keep
			// moving bytes to stay open; see Server.HalfCloseTimeout.
			other.SetReadDeadline(time.Now().Add(r.s.halfCloseTimeout()))
		}
		return
	}
	r.client.Close()
	r.backend.Close()
	r.s.finish(r)
}

// halfCopy copies src to dst until EOF, then half-closes dst, passing the
// EOF on while the other direction goes on. On an error it aborts both
// connections, so the other direction stops too and each peer sees a reset
// rather than a clean end that would pass a truncated stream off as
// complete. A read deadline (set once the other direction has ended) is
// re-armed as long as bytes moved since the last one was set.
func (r *relay) halfCopy(dst, src *net.TCPConn) (int64, error) {
	var (
		total int64
		bulk  bool
	)
	for {
		var (
			n   int64
			err error
		)
		if bulk {
			// The concrete types reach TCPConn.ReadFrom's splice path.
			n, err = dst.ReadFrom(src)
		} else if n, err = copySmall(dst, src); err == errBulk {
			total += n
			bulk = true
			continue
		}
		total += n
		if n > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
			src.SetReadDeadline(time.Now().Add(r.s.halfCloseTimeout()))
			continue
		}
		if err != nil {
			abort(dst)
			abort(src)
			return total, err
		}
		// src has said EOF, so reading from it is over: only dst needs
		// the half-close. When the other direction has ended already,
		// both connections are closed next, and the close sends the same
		// FIN: dst has no unread bytes, its own direction read to EOF.
		if r.running.Load() > 1 {
			dst.CloseWrite()
		}
		return total, nil
	}
}

// smallCopy is the small-message mode of one relay direction: it reads
// from src and writes to dst with plain syscalls from inside one long
// RawConn.Read on src, so a message costs a read, a write and the read that
// finds the socket empty, and no trip through the net package's locks and
// readiness resets. The buffer is taken only while bytes are in hand, so an
// idle direction holds none.
type smallCopy struct {
	dst     syscall.RawConn
	pending []byte // read but not yet written
	written int64
	err     error // the read or write error that ended the copy
	eof     bool  // src said EOF
	bulk    bool  // a read filled the buffer
	// read and write are the method values handed to the raw conns, made
	// once per direction rather than once per call.
	read, write func(fd uintptr) bool
}

func (c *smallCopy) readFn(fd uintptr) bool {
	buf := getBuf()
	defer putBuf(buf)
	for {
		n, err := unix.Read(int(fd), buf[:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false // park until readable, then call again
		case err != nil:
			c.err = os.NewSyscallError("read", err)
			return true
		case n == 0:
			c.eof = true
			return true
		}
		c.pending = buf[:n]
		if err := c.dst.Write(c.write); err != nil && c.err == nil {
			c.err = err // dst closed under us
		}
		c.pending = nil
		if c.err != nil {
			return true
		}
		if n == copyBufSize {
			c.bulk = true
			return true
		}
		// Read again even after a short read: a FIN (or reset) that came
		// in with the bytes raised no readiness edge of its own, and only
		// the next read reports it. TCP_INQ cannot stand in for this read:
		// its hint covers a queued FIN but not a queued reset (checked on
		// Linux 6.18), and Go's poller drops the EPOLLERR that would.
	}
}

func (c *smallCopy) writeFn(fd uintptr) bool {
	for len(c.pending) > 0 {
		n, err := unix.Write(int(fd), c.pending)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false // park until writable, then call again
		case err != nil:
			c.err = os.NewSyscallError("write", err)
			return true
		}
		c.written += int64(n)
		c.pending = c.pending[n:]
	}
	return true
}

// copySmall relays src to dst with read and write until EOF (nil), an error,
// or a read that fills the whole buffer (errBulk, after writing it).
func copySmall(dst, src *net.TCPConn) (int64, error) {
	rsrc, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	rdst, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	c := &smallCopy{dst: rdst}
	c.read, c.write = c.readFn, c.writeFn
	if err := rsrc.Read(c.read); err != nil {
		return c.written, err // closed under us, or a deadline
	}
	switch {
	case c.err != nil:
		return c.written, &net.OpError{Op: "relay", Net: "tcp", Source: src.LocalAddr(), Addr: src.RemoteAddr(), Err: c.err}
	case c.bulk:
		return c.written, errBulk
	}
	return c.written, nil // EOF
}

// abort closes c with a reset.
func abort(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// firstCause picks the error that ended a relay: the other direction then
// only reports that its connection was closed under it.
func firstCause(errs ...error) error {
	var closed error
	for _, err := range errs {
		switch {
		case err == nil:
		case errors.Is(err, net.ErrClosed):
			closed = err
		default:
			return err
		}
	}
	return closed
}
