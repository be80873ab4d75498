package proxy

import (
	"errors"
	"net"
	"os"
	"time"
)

// The relay of a conn: copyUp and copyDown copy its two directions until
// both have ended. A direction that ends cleanly (EOF) passes the
// half-close on and lets the other go on; a direction that fails (a reset,
// the half-close timeout, or Close aborting the connection) aborts both at
// once, so each peer sees a reset rather than a clean end that would pass a
// truncated stream off as complete. Whichever direction ends last finishes
// the conn.
//
// Each direction starts by moving bytes with read and write through a pooled
// buffer (small.go), and switches to splice(2) for good once a read fills the
// buffer. Request/response traffic (HTTP, Redis, SQL) thus costs the same
// syscalls as a plain read/write loop, and no pipe; bulk transfers never
// enter user space after their first buffer. Nothing here logs.

// copyResult is what one direction of a relay reports when it ends.
type copyResult struct {
	n   int64
	err error
}

// copyUp copies the client's bytes to the backend. Each direction has its
// own named function so that stack dumps say which one is stuck.
func copyUp(c *conn) {
	c.up.n, c.up.err = c.halfCopy(c.backend, c.client)
	c.directionDone(c.up.err, c.backend)
}

// copyDown copies the backend's bytes to the client.
func copyDown(c *conn) {
	c.down.n, c.down.err = c.halfCopy(c.client, c.backend)
	c.directionDone(c.down.err, c.client)
}

// directionDone ends one direction, whose error is err and whose
// destination, the other direction's source, is other. The second
// direction to end finishes the conn.
func (c *conn) directionDone(err error, other *net.TCPConn) {
	if c.running.Add(-1) > 0 {
		if err == nil {
			// A clean end (FIN): the other direction now has to keep
			// moving bytes to stay open; see Server.HalfCloseTimeout.
			other.SetReadDeadline(time.Now().Add(c.srv.halfCloseTimeout()))
		}
		return
	}
	c.finish()
}

// halfCopy copies src to dst until EOF, then half-closes dst, passing the
// EOF on while the other direction goes on. On an error it aborts both
// connections, so the other direction stops too and each peer sees a reset
// rather than a clean end that would pass a truncated stream off as
// complete. A read deadline (set once the other direction has ended) is
// re-armed as long as bytes moved since the last one was set.
func (c *conn) halfCopy(dst, src *net.TCPConn) (int64, error) {
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
			src.SetReadDeadline(time.Now().Add(c.srv.halfCloseTimeout()))
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
		if c.running.Load() > 1 {
			dst.CloseWrite()
		}
		return total, nil
	}
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
