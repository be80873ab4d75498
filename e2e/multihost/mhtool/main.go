// Command mhtool is the multi-host test bed's backend and load generator,
// one static binary that the test bind-mounts into its backend containers
// and runs inside the application container's network namespace.
//
//	mhtool serve -name b1@B -port 80
//	mhtool load -addr 127.0.0.1:6000 -rate 200 -long 8
//
// serve answers every connection with its name and a newline, then echoes
// what it reads, so a connection is both a request (the name) and, held
// open, a long-lived conversation.
//
// load opens -rate new connections a second, each a request: connect, read
// the name line, close. It also holds -long connections open, each writing
// a line every 500 ms and reading it back; one that ends is reported and
// replaced. It prints one line per event on standard output and stops when
// its standard input closes:
//
//	R <start ns> <duration ns> ok <name>      a request and who answered
//	R <start ns> <duration ns> err <error>
//	L <id> <at ns> <name>                     long-lived connection open
//	E <id> <at ns> <name> <error>             long-lived connection ended
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: mhtool serve|load [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mhtool:", err)
		os.Exit(1)
	}
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	name := fs.String("name", "", "the name each connection is answered with")
	port := fs.Int("port", 80, "port to listen on")
	_ = fs.Parse(args)
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", *port))
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accepting: %w", err)
		}
		go func() {
			defer c.Close()
			if _, err := io.WriteString(c, *name+"\n"); err != nil {
				return
			}
			_, _ = io.Copy(c, c)
		}()
	}
}

// out serialises event lines onto standard output.
type out struct {
	mu sync.Mutex
	w  *bufio.Writer
}

func (o *out) printf(format string, args ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintf(o.w, format, args...)
	o.w.WriteByte('\n')
	o.w.Flush()
}

func load(args []string) error {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:6000", "address to connect to")
	rate := fs.Int("rate", 200, "new connections a second")
	long := fs.Int("long", 8, "long-lived connections held open")
	timeout := fs.Duration("timeout", 30*time.Second, "bound on one request, connect included")
	longTimeout := fs.Duration("long-timeout", 5*time.Minute, "bound on one echo of a long-lived connection: the daemon's bound is what is measured, this only stops a test from hanging")
	_ = fs.Parse(args)

	ctx, cancel := context.WithCancel(context.Background())
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
	o := &out{w: bufio.NewWriter(os.Stdout)}
	var wg sync.WaitGroup
	for i := 0; i < *long; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); longLived(ctx, o, i, *addr, *longTimeout) }()
	}
	tick := time.NewTicker(time.Second / time.Duration(*rate))
	defer tick.Stop()
	// At most this many requests in flight: a blackholed service must not
	// grow the generator without bound.
	slots := make(chan struct{}, 20**rate)
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			return nil
		case <-tick.C:
		}
		select {
		case slots <- struct{}{}:
		default:
			o.printf("R %d 0 err generator-saturated", time.Now().UnixNano())
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			start := time.Now()
			name, err := request(ctx, *addr, *timeout)
			d := time.Since(start)
			if err != nil {
				o.printf("R %d %d err %s", start.UnixNano(), d.Nanoseconds(), oneWord(err))
				return
			}
			o.printf("R %d %d ok %s", start.UnixNano(), d.Nanoseconds(), name)
		}()
	}
}

func request(ctx context.Context, addr string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading the answer: %w", err)
	}
	return strings.TrimSpace(line), nil
}

// longLived holds one connection open at a time, echoing a line every
// 500 ms, and reports each one's start and end.
func longLived(ctx context.Context, o *out, id int, addr string, timeout time.Duration) {
	for ctx.Err() == nil {
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		c, err := d.DialContext(dctx, "tcp", addr)
		cancel()
		if err != nil {
			o.printf("E %d %d - %s", id, time.Now().UnixNano(), oneWord(err))
			sleep(ctx, 100*time.Millisecond)
			continue
		}
		stop := context.AfterFunc(ctx, func() { c.Close() })
		r := bufio.NewReader(c)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		name, err := r.ReadString('\n')
		name = strings.TrimSpace(name)
		if err == nil {
			o.printf("L %d %d %s", id, time.Now().UnixNano(), name)
			for ctx.Err() == nil {
				sleep(ctx, 500*time.Millisecond)
				_ = c.SetDeadline(time.Now().Add(timeout))
				if _, err = io.WriteString(c, "ping\n"); err != nil {
					break
				}
				if _, err = r.ReadString('\n'); err != nil {
					break
				}
			}
		}
		stop()
		c.Close()
		if ctx.Err() != nil {
			return
		}
		if name == "" {
			name = "-"
		}
		o.printf("E %d %d %s %s", id, time.Now().UnixNano(), name, oneWord(err))
		sleep(ctx, 100*time.Millisecond)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// oneWord keeps an error on its line's last field.
func oneWord(err error) string {
	if errors.Is(err, io.EOF) {
		return "EOF"
	}
	return strings.ReplaceAll(strings.ReplaceAll(err.Error(), " ", "_"), "\n", "_")
}
