package docker

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"

	dockerapi "github.com/fsouza/go-dockerclient"
)

// engine lists the only client methods the watcher calls. *dockerapi.Client
// satisfies it; the tests put a fake here to inject what a real engine
// cannot be made to do on demand (dropped events, a stream that ends).
type engine interface {
	AddEventListenerWithOptions(opts dockerapi.EventsOptions, listener chan<- *dockerapi.APIEvents) error
	RemoveEventListener(listener chan *dockerapi.APIEvents) error
	ListContainers(opts dockerapi.ListContainersOptions) ([]dockerapi.APIContainers, error)
	InspectContainerWithOptions(opts dockerapi.InspectContainerOptions) (*dockerapi.Container, error)
}

// engineClient gives every event subscription a client of its own, dialing
// through a connection it can close.
//
// go-dockerclient's RemoveEventListener leaves the goroutine that reads the
// event stream blocked until the engine sends one more event, and that
// goroutine panics if the stream then fails with anything but EOF (it sends
// on a channel the removal closed). Closing our own connection makes its
// read return EOF at once, so the goroutine exits cleanly, and a fresh client
// per subscription keeps one subscription's teardown from racing the next.
//
// With TLS the library insists on dialing with a bare *net.Dialer itself;
// there the subscription still works, but its reader lingers until the next
// event after removal.
type engineClient struct {
	*dockerapi.Client

	mu   sync.Mutex
	subs map[chan<- *dockerapi.APIEvents]*subscription
}

type subscription struct {
	client *dockerapi.Client
	dialer *closingDialer // nil with TLS
}

func newEngineClient(c *dockerapi.Client) *engineClient {
	return &engineClient{Client: c, subs: make(map[chan<- *dockerapi.APIEvents]*subscription)}
}

func (e *engineClient) AddEventListenerWithOptions(opts dockerapi.EventsOptions, listener chan<- *dockerapi.APIEvents) error {
	c, err := dockerapi.NewVersionedClient(e.Endpoint(), "")
	if err != nil {
		return fmt.Errorf("creating event client for %s: %w", e.Endpoint(), err)
	}
	sub := &subscription{client: c}
	if e.TLSConfig != nil {
		c.TLSConfig = e.TLSConfig
		if d, ok := e.Dialer.(*net.Dialer); ok {
			c.Dialer = d
		}
	} else {
		sub.dialer = &closingDialer{inner: e.Dialer}
		c.Dialer = sub.dialer
	}
	if err := c.AddEventListenerWithOptions(opts, listener); err != nil {
		return err
	}
	e.mu.Lock()
	e.subs[listener] = sub
	e.mu.Unlock()
	return nil
}

func (e *engineClient) RemoveEventListener(listener chan *dockerapi.APIEvents) error {
	e.mu.Lock()
	sub := e.subs[listener]
	delete(e.subs, listener)
	e.mu.Unlock()
	if sub == nil {
		return nil
	}
	// Remove first: once the library has stopped listening, the EOF our
	// close produces is ignored instead of turned into a reconnection.
	err := sub.client.RemoveEventListener(listener)
	if sub.dialer != nil {
		sub.dialer.closeAll()
	}
	return err
}

// closingDialer remembers the connections it dials so closeAll can end them.
type closingDialer struct {
	inner dockerapi.Dialer

	mu     sync.Mutex
	closed bool
	conns  []*eofConn
}

var errDialerClosed = errors.New("event subscription removed")

func (d *closingDialer) Dial(network, address string) (net.Conn, error) {
	c, err := d.inner.Dial(network, address)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		c.Close()
		return nil, errDialerClosed
	}
	ec := &eofConn{Conn: c}
	d.conns = append(d.conns, ec)
	return ec, nil
}

func (d *closingDialer) closeAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	for _, c := range d.conns {
		c.Close()
	}
	d.conns = nil
}

// eofConn reports every read failure as io.EOF. The library ends a
// subscription cleanly on EOF (it closes the listener channel, which the
// watcher answers by subscribing again) but mishandles other read errors.
type eofConn struct {
	net.Conn
	closed atomic.Bool
}

func (c *eofConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil {
		err = io.EOF
	}
	return n, err
}

func (c *eofConn) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	return c.Conn.Close()
}
