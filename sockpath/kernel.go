package sockpath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// The layout of bpf/sockpath.c, as bpf2go generated it from there.
const (
	maxEndpoints = len(kernTable{}.Ep)
	nslots       = len(kernTable{}.Slot)

	eventFailed   = kernEventKindEVENT_FAILED
	eventSYNRetry = kernEventKindEVENT_SYN_RETRY
)

// Kernel is connectable's programs and maps in the kernel: loaded or
// adopted from the pins of a previous run, attached to a cgroup2 root.
// Its methods are safe for concurrent use (each is one or a few bpf()
// calls); what to write is the Path's business.
type Kernel struct {
	dir   string
	objs  kernObjects
	inner *ebpf.MapSpec // the tables' inner map
	links []link.Link
	// Adopted is true when the maps were a previous run's, with its entries.
	Adopted bool
}

// programs lists the programs with the attach type and pin name of each.
func (k *Kernel) programs() []struct {
	prog   *ebpf.Program
	attach ebpf.AttachType
	name   string
} {
	return []struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
		name   string
	}{
		{k.objs.SockConnect4, ebpf.AttachCGroupInet4Connect, "connect4"},
		{k.objs.SockConnect6, ebpf.AttachCGroupInet6Connect, "connect6"},
		{k.objs.SockGetpeername4, ebpf.AttachCgroupInet4GetPeername, "getpeername4"},
		{k.objs.SockGetpeername6, ebpf.AttachCgroupInet6GetPeername, "getpeername6"},
		{k.objs.SockOps, ebpf.AttachCGroupSockOps, "sockops"},
	}
}

// bpffsMagic is BPF_FS_MAGIC: the file system a pin must live on.
const bpffsMagic = 0xcafe4a11

// layoutOnly names the maps that only carry types for bpf2go: they are
// neither used nor pinned.
var layoutOnly = map[string]bool{"table_layout": true, "types_layout": true}

// Load loads the programs, adopting the maps and links pinned in dir by a
// previous run (their entries keep serving while no daemon runs), and
// attaches the programs to the cgroup2 hierarchy at cgroup, replacing the
// previous run's programs in its links. dir is created; it must be on a
// bpffs. Maps of an incompatible earlier layout are replaced by empty ones.
func Load(dir, cgroup string) (*Kernel, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating the pin directory: %w", err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return nil, fmt.Errorf("checking the pin directory %s: %w", dir, err)
	}
	if fs.Type != bpffsMagic {
		return nil, fmt.Errorf("the pin directory %s is not on a bpffs (mount -t bpf bpf %s)", dir, filepath.Dir(dir))
	}
	if err := CheckCgroup2(cgroup); err != nil {
		return nil, err
	}
	spec, err := loadKern()
	if err != nil {
		return nil, fmt.Errorf("reading the programs: %w", err)
	}
	for name, m := range spec.Maps {
		if !layoutOnly[name] {
			m.Pinning = ebpf.PinByName
		}
	}
	k := &Kernel{dir: dir, inner: spec.Maps["tables"].InnerMap.Copy()}
	k.Adopted = pinned(filepath.Join(dir, "routes"))
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}
	err = spec.LoadAndAssign(&k.objs, opts)
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		// A layout from another version: start over rather than fail.
		for name := range spec.Maps {
			os.Remove(filepath.Join(dir, name))
		}
		k.Adopted = false
		err = spec.LoadAndAssign(&k.objs, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("loading the programs: %w", explainVerifier(err))
	}
	for _, p := range k.programs() {
		l, err := attach(dir, cgroup, p.name, p.attach, p.prog)
		if err != nil {
			k.Close()
			return nil, err
		}
		k.links = append(k.links, l)
	}
	return k, nil
}

// CheckCgroup2 returns an error unless dir is a cgroup2 mount.
func CheckCgroup2(dir string) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return fmt.Errorf("checking the cgroup2 root %s: %w", dir, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not a cgroup2 mount", dir)
	}
	return nil
}

func pinned(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// attach returns the pinned link of name updated to prog, or a new link
// pinned as name.
func attach(dir, cgroup, name string, typ ebpf.AttachType, prog *ebpf.Program) (link.Link, error) {
	pin := filepath.Join(dir, "link-"+name)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		if err := l.Update(prog); err == nil {
			return l, nil
		}
		// Not updatable (another kind of link under our name): replace it.
		l.Unpin()
		l.Close()
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: typ, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attaching %s to %s: %w", name, cgroup, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pinning %s: %w", name, err)
	}
	return l, nil
}

// explainVerifier keeps the verifier's last lines, which say what it
// refused, rather than its whole log.
func explainVerifier(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%w (verifier: %+.5v)", err, ve)
	}
	return err
}

// pinnedMaps lists the maps pinned in the directory.
func (k *Kernel) pinnedMaps() []*ebpf.Map {
	return []*ebpf.Map{k.objs.Routes, k.objs.Tables, k.objs.Dead, k.objs.Budgets, k.objs.Counters, k.objs.Stats, k.objs.Socks, k.objs.Events, k.objs.Silence}
}

// Close lets go of the programs and maps, leaving them attached and pinned:
// what a crashed daemon leaves, and what the next Load adopts.
func (k *Kernel) Close() error {
	var errs []error
	for _, l := range k.links {
		errs = append(errs, l.Close())
	}
	k.links = nil
	errs = append(errs, k.objs.Close())
	return errors.Join(errs...)
}

// Remove detaches the programs and deletes the pins and maps: nothing of
// connectable stays in the kernel once the last socket using its storage
// is closed.
func (k *Kernel) Remove() error {
	var errs []error
	for _, l := range k.links {
		errs = append(errs, l.Unpin(), l.Close())
	}
	k.links = nil
	for _, m := range k.pinnedMaps() {
		errs = append(errs, m.Unpin())
	}
	errs = append(errs, k.objs.Close())
	if err := os.Remove(k.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// SetSilenceBound makes the kernel bound how long the peer of a rewritten
// connection may stay silent once established, as the relay bounds its
// backend sockets (proxy.Server.BackendTimeout, --backend-timeout), so that
// a connection to a host that vanished without a reset ends within d
// rather than after 15 minutes of retransmissions, or never when idle:
// TCP_USER_TIMEOUT d, and keepalive idle for half of d, then probes every
// sixth of d (the relay's settings). If d is 0 or negative, sockets are
// left with the kernel's defaults: the caller resolves the relay's default. Connections
// established before the call keep what they had. What an application set
// itself is kept (see bound_silence in bpf/sockpath.c).
func (k *Kernel) SetSilenceBound(d time.Duration) error {
	if err := k.objs.Silence.Put(uint32(0), silenceBound(d)); err != nil {
		return fmt.Errorf("setting the silence bound: %w", err)
	}
	return nil
}

func silenceBound(d time.Duration) kernSilenceBound {
	if d <= 0 {
		return kernSilenceBound{}
	}
	// The kernel refuses more than MAX_TCP_KEEPIDLE (32767 s) and a
	// negative int.
	secs := func(d time.Duration) uint32 { return uint32(min(max(d, time.Second)/time.Second, 32767)) }
	return kernSilenceBound{
		UserTimeoutMs: uint32(min(max(d.Milliseconds(), 1), math.MaxInt32)),
		Keepidle:      secs(d / 2),
		Keepintvl:     secs(d / 6),
		Keepcnt:       3,
	}
}

// routeKey is the key of one namespace's port, for one family.
type routeKey = kernRouteKey

func newRouteKey(cookie uint64, port uint16, v6 bool) routeKey {
	k := routeKey{Cookie: cookie, Port: port, Family: unix.AF_INET}
	if v6 {
		k.Family = unix.AF_INET6
	}
	return k
}

// SetRoute sends connects to the port of the namespace with cookie, of one
// family, to table id.
func (k *Kernel) setRoute(key routeKey, table uint32) error {
	return k.objs.Routes.Put(key, table)
}

func (k *Kernel) deleteRoute(key routeKey) error {
	err := k.objs.Routes.Delete(key)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// routes returns every route in the map.
func (k *Kernel) routes() (map[routeKey]uint32, error) {
	out := make(map[routeKey]uint32)
	var key routeKey
	var id uint32
	it := k.objs.Routes.Iterate()
	for it.Next(&key, &id) {
		out[key] = id
	}
	return out, it.Err()
}

// putTable installs t as table id, replacing the previous one at once.
func (k *Kernel) putTable(id uint32, t *kernTable) error {
	inner, err := ebpf.NewMap(k.inner)
	if err != nil {
		return fmt.Errorf("creating table %d: %w", id, err)
	}
	defer inner.Close()
	if err := inner.Put(uint32(0), t); err != nil {
		return fmt.Errorf("filling table %d: %w", id, err)
	}
	if err := k.objs.Tables.Put(id, inner); err != nil {
		return fmt.Errorf("installing table %d: %w", id, err)
	}
	return nil
}

func (k *Kernel) deleteTable(id uint32) error {
	err := k.objs.Tables.Delete(id)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// tableIDs returns the ids of the tables in the map.
func (k *Kernel) tableIDs() ([]uint32, error) {
	var ids []uint32
	var id, inner uint32
	it := k.objs.Tables.Iterate()
	for it.Next(&id, &inner) {
		ids = append(ids, id)
	}
	return ids, it.Err()
}

// nativeEndian is how the kernel's fields are laid out in memory; addresses
// and ports in them are network byte order within those fields.
var nativeEndian = binary.NativeEndian

// endpoint converts to the kernel's form: IPv6, IPv4 v4-mapped, network
// byte order.
func endpoint(ap netip.AddrPort) kernEndpoint {
	b := ap.Addr().As16()
	var ep kernEndpoint
	for i := range ep.Addr {
		ep.Addr[i] = nativeEndian.Uint32(b[4*i:])
	}
	ep.Port = nativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, ap.Port()))
	return ep
}

// addrPort converts back from the kernel's form.
func (ep kernEndpoint) addrPort() netip.AddrPort {
	var b [16]byte
	for i, w := range ep.Addr {
		nativeEndian.PutUint32(b[4*i:], w)
	}
	port := binary.BigEndian.Uint16(nativeEndian.AppendUint16(nil, ep.Port))
	return netip.AddrPortFrom(netip.AddrFrom16(b).Unmap(), port)
}

// revive clears the marks every namespace holds on an endpoint.
func (k *Kernel) revive(ap netip.AddrPort) error {
	want := endpoint(ap)
	var keys []kernDeadKey
	var key kernDeadKey
	var ts uint64
	it := k.objs.Dead.Iterate()
	for it.Next(&key, &ts) {
		if key.Ep == want {
			keys = append(keys, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading the dead marks: %w", err)
	}
	for _, key := range keys {
		if err := k.objs.Dead.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clearing a dead mark: %w", err)
		}
	}
	return nil
}

// pruneDead deletes the marks the kernel no longer heeds (older than
// DEAD_HOLD_SECONDS): nothing else does, and namespaces that are gone
// would leave theirs for ever. It returns how many it deleted.
func (k *Kernel) pruneDead() (int, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, err
	}
	now := uint64(ts.Nano())
	hold := uint64(kernSockpathConstDEAD_HOLD_SECONDS) * uint64(time.Second)
	var stale []kernDeadKey
	var key kernDeadKey
	var at uint64
	it := k.objs.Dead.Iterate()
	for it.Next(&key, &at) {
		if now-at >= hold {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("reading the dead marks: %w", err)
	}
	n := 0
	for _, key := range stale {
		if err := k.objs.Dead.Delete(key); err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("deleting a stale dead mark: %w", err)
		}
	}
	return n, nil
}

// deadEndpoints lists the endpoints some namespace marked dead, however
// long ago.
func (k *Kernel) deadEndpoints() ([]netip.AddrPort, error) {
	seen := map[netip.AddrPort]bool{}
	var out []netip.AddrPort
	var key kernDeadKey
	var ts uint64
	it := k.objs.Dead.Iterate()
	for it.Next(&key, &ts) {
		if ap := key.Ep.addrPort(); !seen[ap] {
			seen[ap] = true
			out = append(out, ap)
		}
	}
	return out, it.Err()
}

// Counter is what the kernel counted for one endpoint of one service.
type Counter struct {
	Service  uint32
	Endpoint netip.AddrPort
	Connects uint64 // connects rewritten to it
	Failures uint64 // of those, the ones the remote side failed (reset, unreachable, SYN timeout), within the reporting namespace's budget
}

func (k *Kernel) counters() ([]Counter, error) {
	var out []Counter
	var key kernCounterKey
	var c kernEndpointCounters
	it := k.objs.Counters.Iterate()
	for it.Next(&key, &c) {
		out = append(out, Counter{Service: key.Service, Endpoint: key.Ep.addrPort(), Connects: c.Connects, Failures: c.Failures})
	}
	return out, it.Err()
}

// clearCounters deletes every counter.
func (k *Kernel) clearCounters() error {
	var keys []kernCounterKey
	var key kernCounterKey
	var c kernEndpointCounters
	it := k.objs.Counters.Iterate()
	for it.Next(&key, &c) {
		keys = append(keys, key)
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, key := range keys {
		if err := k.objs.Counters.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

func (k *Kernel) ensureCounter(service uint32, ap netip.AddrPort) error {
	err := k.objs.Counters.Update(kernCounterKey{Service: service, Ep: endpoint(ap)}, kernEndpointCounters{}, ebpf.UpdateNoExist)
	if errors.Is(err, ebpf.ErrKeyExist) {
		return nil
	}
	return err
}

func (k *Kernel) deleteCounter(service uint32, ap netip.AddrPort) error {
	err := k.objs.Counters.Delete(kernCounterKey{Service: service, Ep: endpoint(ap)})
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// events returns a reader of the failure reports.
func (k *Kernel) events() (eventReader, error) {
	r, err := ringbuf.NewReader(k.objs.Events)
	if err != nil {
		return nil, err
	}
	return ringReader{r}, nil
}

// ringReader decodes the ring buffer's records.
type ringReader struct{ r *ringbuf.Reader }

func (r ringReader) read() (kernEvent, error) {
	var ev kernEvent
	rec, err := r.r.Read()
	if errors.Is(err, ringbuf.ErrClosed) {
		return ev, errEventsClosed
	}
	if err != nil {
		return ev, err
	}
	if err := binary.Read(bytes.NewReader(rec.RawSample), nativeEndian, &ev); err != nil {
		return ev, fmt.Errorf("decoding a failure report: %w", err)
	}
	return ev, nil
}

func (r ringReader) Close() error { return r.r.Close() }

// stats reads the kernel's counts, indexed by enum stat.
func (k *Kernel) stats() ([]uint64, error) {
	out := make([]uint64, kernStatNSTATS)
	for i := range out {
		if err := k.objs.Stats.Lookup(uint32(i), &out[i]); err != nil {
			return nil, fmt.Errorf("reading the kernel's stats: %w", err)
		}
	}
	return out, nil
}

// Cgroup2Root returns where the root of the cgroup2 hierarchy is mounted:
// /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one
// (Docker's cgroupfs driver on cgroup v1). Programs attached there see every
// process of the machine, whatever the cgroup driver.
func Cgroup2Root() (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	var found []string
	for _, line := range strings.Split(string(b), "\n") {
		// id parent major:minor root mountpoint options... - fstype source super-options
		pre, post, ok := strings.Cut(line, " - ")
		f := strings.Fields(pre)
		if !ok || len(f) < 5 || !strings.HasPrefix(post, "cgroup2 ") || f[3] != "/" {
			continue
		}
		found = append(found, unescapeMount(f[4]))
	}
	if len(found) == 0 {
		return "", errors.New("no cgroup2 file system is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")
	}
	if slices.Contains(found, "/sys/fs/cgroup") {
		return "/sys/fs/cgroup", nil
	}
	return found[0], nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
