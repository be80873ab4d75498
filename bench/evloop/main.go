// Command evloop is a measurement prototype, not part of connectable: a TCP
// relay built the way HAProxy is, written in Go, to learn how close Go can
// come to HAProxy's CPU per connection on this machine before anyone
// rewrites connectable's relay around an event loop (issue 7).
//
// One epoll loop per GOMAXPROCS, each with its own SO_REUSEPORT listener;
// raw non-blocking sockets; accept, connect, relay of small messages and
// close all inside the loop. A short read ends a turn unless epoll reported
// EPOLLRDHUP, HUP or ERR with it, so a drained socket costs no second read;
// EPOLLOUT is asked for only while a write is pending. It leaves out what
// makes connectable a product: SO_ORIGINAL_DST routing (one getsockopt per
// connection stands in for it), failover, splice, timeouts, accounting.
//
// With -nested, each loop parks its goroutine in Go's own netpoller on the
// epoll descriptor (no thread blocked in a syscall); without it, each loop
// blocks its locked OS thread in epoll_wait.
//
//	go build -o /tmp/evloop ./bench/evloop
//	nsenter --net=/proc/<client pid>/ns/net /tmp/evloop -nested -listen 127.0.0.1:23080 -backend 198.19.77.6:80
package main

import (
	"flag"
	"log"
	"net/netip"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

const (
	bufSize = 16 << 10
	evIn    = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET
	evOut   = evIn | unix.EPOLLOUT
)

// end is one socket of a relayed connection and what was read from it.
type end struct {
	fd       int
	pending  []byte // read from this end, not yet written to the other
	eof      bool
	shut     bool // the other end's write side is shut
	writable bool
}

type pair struct {
	ends      [2]end // client, backend
	connected bool
	finished  int // directions that reached EOF
}

type loop struct {
	ep, ln  int
	backend unix.SockaddrInet4
	pairs   map[int32]*pair
	rbuf    []byte
}

func (l *loop) ctl(op, fd int, events uint32) {
	ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
	if err := unix.EpollCtl(l.ep, op, fd, &ev); err != nil {
		log.Fatalf("epoll_ctl: %v", err)
	}
}

func (l *loop) accept() {
	for {
		cfd, _, err := unix.Accept4(l.ln, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			return
		}
		unix.SetsockoptInt(cfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		unix.GetsockoptIPv6Mreq(cfd, unix.SOL_IP, 80) // the cost of SO_ORIGINAL_DST
		bfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			unix.Close(cfd)
			continue
		}
		unix.SetsockoptInt(bfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		if err := unix.Connect(bfd, &l.backend); err != nil && err != unix.EINPROGRESS {
			unix.Close(cfd)
			unix.Close(bfd)
			continue
		}
		p := &pair{ends: [2]end{{fd: cfd, writable: true}, {fd: bfd}}}
		l.pairs[int32(cfd)], l.pairs[int32(bfd)] = p, p
		l.ctl(unix.EPOLL_CTL_ADD, cfd, evIn)
		l.ctl(unix.EPOLL_CTL_ADD, bfd, evOut) // EPOLLOUT: the connect completed
	}
}

func (l *loop) close(p *pair) {
	for _, e := range p.ends {
		delete(l.pairs, int32(e.fd))
		unix.Close(e.fd)
	}
}

// write sends what was read from src to dst; false means dst failed.
func (l *loop) write(p *pair, src, dst *end) bool {
	for len(src.pending) > 0 && dst.writable && p.connected {
		n, err := unix.Write(dst.fd, src.pending)
		if err == unix.EAGAIN {
			dst.writable = false
			l.ctl(unix.EPOLL_CTL_MOD, dst.fd, evOut)
			return true
		}
		if err != nil {
			return false
		}
		src.pending = src.pending[n:]
	}
	return true
}

// pump relays end i to the other end until a read comes up short (and
// hup is false), the other end cannot take more, or EOF. It reports
// whether the pair is finished or broken.
func (l *loop) pump(p *pair, i int, hup bool) (done bool) {
	src, dst := &p.ends[i], &p.ends[1-i]
	for {
		if !l.write(p, src, dst) {
			return true
		}
		if len(src.pending) > 0 {
			return false // wait for dst to drain
		}
		if src.eof {
			if !src.shut {
				src.shut = true
				unix.Shutdown(dst.fd, unix.SHUT_WR)
				p.finished++
			}
			return p.finished == 2
		}
		n, err := unix.Read(src.fd, l.rbuf)
		switch {
		case err == unix.EAGAIN:
			return false
		case err != nil:
			return true
		case n == 0:
			src.eof = true
			continue
		}
		src.pending = append(src.pending[:0], l.rbuf[:n]...)
		if n < len(l.rbuf) && !hup {
			return !l.write(p, src, dst) // drained: the next bytes raise an edge
		}
	}
}

func (l *loop) handle(evs []unix.EpollEvent) {
	for _, ev := range evs {
		if int(ev.Fd) == l.ln {
			l.accept()
			continue
		}
		p := l.pairs[ev.Fd]
		if p == nil {
			continue
		}
		i := 0
		if p.ends[1].fd == int(ev.Fd) {
			i = 1
		}
		e := &p.ends[i]
		resume := false // the other direction waited for e to be writable
		if ev.Events&unix.EPOLLOUT != 0 {
			if i == 1 && !p.connected {
				if soErr, _ := unix.GetsockoptInt(e.fd, unix.SOL_SOCKET, unix.SO_ERROR); soErr != 0 {
					l.close(p)
					continue
				}
				p.connected = true
			}
			if !e.writable {
				e.writable = true
				l.ctl(unix.EPOLL_CTL_MOD, e.fd, evIn)
			}
			resume = len(p.ends[1-i].pending) > 0
		}
		done := false
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			done = l.pump(p, i, ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0)
		}
		if !done && resume {
			done = l.pump(p, 1-i, false)
		}
		if done {
			l.close(p)
		}
	}
}

func (l *loop) run(nested bool) {
	evs := make([]unix.EpollEvent, 256)
	if nested {
		if err := unix.SetNonblock(l.ep, true); err != nil {
			log.Fatal(err)
		}
		rc, err := os.NewFile(uintptr(l.ep), "epoll").SyscallConn()
		if err != nil {
			log.Fatal(err)
		}
		log.Fatal(rc.Read(func(uintptr) bool {
			for {
				n, err := unix.EpollWait(l.ep, evs, 0)
				if err == unix.EINTR {
					continue
				}
				if n <= 0 {
					return false // park until the epoll descriptor is readable
				}
				l.handle(evs[:n])
			}
		}))
	}
	runtime.LockOSThread()
	for {
		n, err := unix.EpollWait(l.ep, evs, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			log.Fatal(err)
		}
		l.handle(evs[:n])
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:23080", "IPv4 address to listen on")
	backend := flag.String("backend", "198.19.77.6:80", "IPv4 backend address")
	nested := flag.Bool("nested", false, "park in Go's netpoller on the epoll descriptor instead of blocking a thread in epoll_wait")
	flag.Parse()
	la, err := netip.ParseAddrPort(*listen)
	if err != nil {
		log.Fatal(err)
	}
	ba, err := netip.ParseAddrPort(*backend)
	if err != nil {
		log.Fatal(err)
	}
	for range runtime.GOMAXPROCS(0) {
		ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			log.Fatal(err)
		}
		unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		if err := unix.Bind(ln, &unix.SockaddrInet4{Port: int(la.Port()), Addr: la.Addr().As4()}); err != nil {
			log.Fatal(err)
		}
		if err := unix.Listen(ln, 4096); err != nil {
			log.Fatal(err)
		}
		ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			log.Fatal(err)
		}
		l := &loop{ep: ep, ln: ln, pairs: map[int32]*pair{}, rbuf: make([]byte, bufSize),
			backend: unix.SockaddrInet4{Port: int(ba.Port()), Addr: ba.Addr().As4()}}
		l.ctl(unix.EPOLL_CTL_ADD, ln, unix.EPOLLIN)
		go l.run(*nested)
	}
	select {} // the loops run until the process is killed
}
