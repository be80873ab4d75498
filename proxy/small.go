package proxy

import (
	"errors"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The small-message mode of a relay direction, and the buffer pool it
// draws from. BenchmarkRequestResponse, in small_test.go, measures it.

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
