package qmp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Version is the QEMU version announced in the greeting.
type Version struct {
	Major   int    `json:"major"`
	Minor   int    `json:"minor"`
	Micro   int    `json:"micro"`
	Package string `json:"-"`
}

// String formats the version as "major.minor.micro".
func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// AtLeast reports whether v is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || (v.Major == major && v.Minor >= minor)
}

// Option configures a Client.
type Option func(*options)

type options struct {
	logger      *slog.Logger
	eventBuffer int
	tls         *tls.Config // WithTLS
}

// WithLogger sets the logger that receives the wire transcript at debug level
// (secrets redacted). A nil logger discards.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithEventBuffer sets the default buffer size of subscriptions (default 256).
func WithEventBuffer(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.eventBuffer = n
		}
	}
}

// Client is a QMP connection. It is safe for concurrent use: several commands
// may be in flight at once, each matched to its reply by id, and replies may
// come in any order. One goroutine reads the connection (lines of any length:
// the query-qmp-schema reply is about 200 KB, replies of many megabytes work)
// and routes each message in wire order: replies to their caller, events to
// subscriptions, without ever blocking on a subscriber. A Client lives until
// Close or until the connection dies, whichever comes first; Done is closed
// then and Err says why. It is not reused after that: dial again.
type Client struct {
	conn    net.Conn
	unix    *net.UnixConn // non-nil when fd passing is possible
	log     *slog.Logger
	version Version
	caps    []string
	oob     bool
	evBuf   int

	wmu    sync.Mutex // serialises writes
	nextID atomic.Uint64

	mu      sync.Mutex
	pending map[uint64]chan response
	subs    map[*Subscription]struct{}
	err     error // set once when the connection dies
	done    chan struct{}
	closing atomic.Bool
	// byteRecords: write one byte per TLS record (QEMU < 10.0 over TLS,
	// see NewClient).
	byteRecords bool
}

type response struct {
	ret json.RawMessage
	err *Error
}

// wire message: any of greeting, return, error, event.
type message struct {
	QMP       *greeting       `json:"QMP"`
	ID        json.RawMessage `json:"id"`
	Return    json.RawMessage `json:"return"`
	Error     *wireError      `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

type greeting struct {
	Version struct {
		QEMU    Version `json:"qemu"`
		Package string  `json:"package"`
	} `json:"version"`
	Capabilities []string `json:"capabilities"`
}

type wireError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Dial connects to a QMP socket. network is "unix" or "tcp"; addr is a path or
// host:port. The greeting is read and capabilities negotiated before it returns;
// ctx bounds the whole handshake.
func Dial(ctx context.Context, network, addr string, opts ...Option) (*Client, error) {
	switch network {
	case "unix", "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("qmp: dial %s %q: %w", network, addr, ErrUnsupportedNetwork)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s %s: %w", network, addr, err)
	}
	var o options
	for _, f := range opts {
		f(&o)
	}
	if o.tls != nil {
		host := addr
		if h, _, err := net.SplitHostPort(addr); err == nil {
			host = h
		}
		if conn, err = tlsClient(ctx, conn, o.tls, host); err != nil {
			return nil, fmt.Errorf("qmp: %s %s: %w", network, addr, err)
		}
	}
	c, err := NewClient(ctx, conn, opts...)
	if err != nil {
		if o.tls != nil && ctx.Err() == nil && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			// TLS 1.3: the monitor checks our certificate after our side
			// of the handshake ended, and closes on a refusal.
			err = fmt.Errorf("%w: the monitor closed the connection after the handshake: it refused our client certificate (none, or not signed by its CA)? (%w)", ErrTLS, err)
		}
		return nil, fmt.Errorf("qmp: %s %s: %w", network, addr, err)
	}
	return c, nil
}

// DialAddress connects to a QMP monitor at a (see Dial). An address that
// is not Dialable fails with an *AddressError.
func DialAddress(ctx context.Context, a Address, opts ...Option) (*Client, error) {
	if err := a.Dialable(); err != nil {
		return nil, err
	}
	network, addr := a.dialTarget()
	return Dial(ctx, network, addr, opts...)
}

// NewClient runs the QMP handshake over an existing connection and returns a
// ready client: it reads QEMU's greeting, checks it, keeps the version and
// negotiates capabilities, enabling out-of-band execution ("oob") when QEMU
// offers it. The client owns conn from then on. ctx bounds the whole
// handshake: a QEMU that never greets fails the call when ctx ends, and conn
// is closed.
func NewClient(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	o := options{eventBuffer: 256}
	for _, f := range opts {
		f(&o)
	}
	log := o.logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Client{
		conn:    conn,
		log:     log,
		evBuf:   o.eventBuffer,
		pending: make(map[uint64]chan response),
		subs:    make(map[*Subscription]struct{}),
		done:    make(chan struct{}),
	}
	if uc, ok := conn.(*net.UnixConn); ok {
		c.unix = uc
	}
	// The handshake reads the greeting on this goroutine; the reader starts after.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	r := bufio.NewReaderSize(conn, 64<<10)
	line, err := readLine(r)
	if !stop() {
		conn.Close()
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", ctx.Err())
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: reading greeting: %w", err)
	}
	line = bytes.TrimSpace(line)
	c.logWire("<-", line)
	var m message
	if err := json.Unmarshal(line, &m); err != nil || m.QMP == nil {
		conn.Close()
		if err == nil {
			err = errors.New("no QMP key")
		}
		return nil, &ProtocolError{Msg: "malformed greeting", Line: truncate(line), Err: err}
	}
	c.version = m.QMP.Version.QEMU
	c.version.Package = m.QMP.Version.Package
	c.caps = m.QMP.Capabilities
	for _, cp := range c.caps {
		if cp == "oob" {
			c.oob = true
		}
	}
	if _, ok := conn.(*tls.Conn); ok && !c.version.AtLeast(10, 0) {
		// QEMU 7.2 (measured; 10.0 is fixed, the versions between are
		// not known) reads a monitor's input one byte per wake-up, and a
		// TLS record's remaining bytes, already decrypted, wake nothing:
		// a command sits unread until more data arrives. One byte per
		// record makes every byte a wake-up.
		c.byteRecords = true
	}
	go c.readLoop(r)
	var args any
	if c.oob {
		args = map[string]any{"enable": []string{"oob"}}
	}
	if err := c.Execute(ctx, "qmp_capabilities", args, nil); err != nil {
		c.closeWith(fmt.Errorf("handshake failed: %w", err))
		return nil, fmt.Errorf("qmp: negotiating capabilities: %w", err)
	}
	return c, nil
}

// Version is the QEMU version from the greeting.
func (c *Client) Version() Version { return c.version }

// GreetingCapabilities lists the capabilities QEMU offered in its greeting.
func (c *Client) GreetingCapabilities() []string { return append([]string(nil), c.caps...) }

// OOB reports whether out-of-band execution was negotiated.
func (c *Client) OOB() bool { return c.oob }

// Done is closed when the connection is gone. Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns nil while the connection is alive, and afterwards the reason it
// ended: it always wraps ErrClosed, and the cause (io.EOF, a *ProtocolError
// for garbage on the wire, the write that failed, ...).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection. Waiting calls fail with ErrClosed.
func (c *Client) Close() error {
	c.closing.Store(true)
	c.closeWith(nil)
	return nil
}

// Execute sends command with args (nil for none) under a fresh "id" and
// decodes the reply's "return" into result (nil to discard). A QMP error
// reply is returned as *Error; any other failure (context ended, connection
// gone, undecodable reply) is a *CommandError wrapping the cause, and when
// the connection dies every waiting call fails at once wrapping ErrClosed.
// ctx covers the wait: if it ends first the call returns ctx.Err() and the
// late reply is dropped by id; the connection stays usable. Only a write
// that cannot finish before ctx ends closes the connection, since a
// half-written command would corrupt the stream.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	return c.execute(ctx, "execute", command, args, result, -1)
}

// ExecuteOOB is Execute with "exec-oob", for commands QEMU runs out of band
// (migrate-recover, migrate-pause). It fails with ErrOOBUnavailable when the
// server did not offer oob.
func (c *Client) ExecuteOOB(ctx context.Context, command string, args, result any) error {
	if !c.oob {
		return &CommandError{Command: command, Err: ErrOOBUnavailable}
	}
	return c.execute(ctx, "exec-oob", command, args, result, -1)
}

// ExecuteWithFile is Execute that also passes fd to QEMU with SCM_RIGHTS on the
// same write, as getfd and add-fd need. It works only on unix socket
// connections (others fail with ErrNoFDPassing). The caller keeps ownership
// of fd and closes its copy; QEMU holds a duplicate until closefd, remove-fd,
// or until a command such as migrate "fd:name" consumes it.
func (c *Client) ExecuteWithFile(ctx context.Context, command string, args, result any, fd int) error {
	if c.unix == nil {
		return &CommandError{Command: command, Err: ErrNoFDPassing}
	}
	if fd < 0 {
		return &CommandError{Command: command, Err: fmt.Errorf("invalid fd %d", fd)}
	}
	return c.execute(ctx, "execute", command, args, result, fd)
}

func (c *Client) execute(ctx context.Context, verb, command string, args, result any, fd int) error {
	if err := ctx.Err(); err != nil {
		return &CommandError{Command: command, Err: err}
	}
	id := c.nextID.Add(1)
	buf, err := appendRequest(make([]byte, 0, 64+len(command)), verb, command, id, args)
	if err != nil {
		return &CommandError{Command: command, Err: fmt.Errorf("encoding arguments: %w", err)}
	}

	ch := make(chan response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return &CommandError{Command: command, Err: err}
	}
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}

	// Log before writing: once written, the reply may be logged by the
	// reader before this goroutine runs again.
	c.logWire("->", buf[:len(buf)-1])
	if err := c.write(ctx, buf, fd); err != nil {
		forget()
		return &CommandError{Command: command, Err: err}
	}

	select {
	case r := <-ch:
		return r.decode(command, result)
	case <-ctx.Done():
		forget()
		return &CommandError{Command: command, Err: ctx.Err()}
	case <-c.done:
		// A reply may have raced with the close.
		select {
		case r := <-ch:
			return r.decode(command, result)
		default:
		}
		return &CommandError{Command: command, Err: c.Err()}
	}
}

// decode turns a reply into the command's result: its QMP error, or its
// "return" decoded into result (nil discards it).
func (r response) decode(command string, result any) error {
	if r.err != nil {
		r.err.Command = command
		return r.err
	}
	if result != nil && len(r.ret) > 0 {
		if err := json.Unmarshal(r.ret, result); err != nil {
			return &CommandError{Command: command, Err: &ProtocolError{Msg: "decoding return", Line: truncate(r.ret), Err: err}}
		}
	}
	return nil
}

// write sends buf (with fd attached when fd >= 0). A write that cannot finish
// before ctx ends kills the connection: a half-written command would corrupt
// the stream for everyone.
func (c *Client) write(ctx context.Context, buf []byte, fd int) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.Err(); err != nil {
		return err
	}
	var stop func() bool
	var fired chan struct{}
	if ctx.Done() != nil {
		fired = make(chan struct{})
		stop = context.AfterFunc(ctx, func() {
			_ = c.conn.SetWriteDeadline(time.Unix(1, 0))
			close(fired)
		})
	}
	var err error
	switch {
	case fd >= 0:
		err = c.writeWithFD(buf, fd)
	case c.byteRecords:
		for i := 0; i < len(buf) && err == nil; i++ {
			_, err = c.conn.Write(buf[i : i+1])
		}
	default:
		_, err = c.conn.Write(buf)
	}
	if stop != nil && !stop() {
		// The context ended while or just after writing: the deadline is
		// (being) set in the past. Wait for it and clear it, or every later
		// write would fail and kill a healthy connection.
		<-fired
		if err == nil {
			_ = c.conn.SetWriteDeadline(time.Time{})
		}
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (write abandoned: %v)", ctx.Err(), err)
		}
		c.closeWith(fmt.Errorf("write: %w", err))
		return c.Err() // wraps ErrClosed and the first cause
	}
	return nil
}

func (c *Client) writeWithFD(buf []byte, fd int) error {
	rights := unix.UnixRights(fd)
	n, oobn, err := c.unix.WriteMsgUnix(buf, rights, nil)
	if err != nil {
		return err
	}
	if oobn != len(rights) {
		return fmt.Errorf("fd not sent (%d of %d control bytes)", oobn, len(rights))
	}
	if n < len(buf) {
		_, err = c.conn.Write(buf[n:])
	}
	return err
}

func (c *Client) readLoop(r *bufio.Reader) {
	for {
		line, err := readLine(r)
		if err != nil {
			if c.closing.Load() {
				c.closeWith(nil)
			} else {
				c.closeWith(fmt.Errorf("read: %w", err))
			}
			return
		}
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		c.logWire("<-", line)
		var m message
		if err := json.Unmarshal(line, &m); err != nil {
			c.closeWith(&ProtocolError{Msg: "malformed message", Line: truncate(line), Err: err})
			return
		}
		switch {
		case m.Event != "":
			ev := Event{Name: m.Event, Data: m.Data}
			if m.Timestamp != nil {
				ev.Time = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
			}
			c.dispatch(ev)
		case m.Return != nil || m.Error != nil:
			id, ok := parseID(m.ID)
			var ch chan response
			if ok {
				c.mu.Lock()
				ch, ok = c.pending[id]
				delete(c.pending, id)
				c.mu.Unlock()
			}
			if !ok {
				// A reply nobody waits for: its caller gave up, or QEMU
				// answered an id-less error (e.g. a parse error). Drop it.
				c.log.Debug("qmp: dropped unmatched reply", "id", string(m.ID))
				continue
			}
			resp := response{ret: m.Return}
			if m.Error != nil {
				resp.err = &Error{Class: m.Error.Class, Desc: m.Error.Desc}
			}
			ch <- resp
		case m.QMP != nil:
			// A second greeting cannot happen on a live connection.
			c.closeWith(&ProtocolError{Msg: "unexpected greeting", Line: truncate(line)})
			return
		default:
			c.closeWith(&ProtocolError{Msg: "message is neither reply nor event", Line: truncate(line)})
			return
		}
	}
}

// appendRequest encodes {"<verb>":"<command>","id":"<id>","arguments":<args>}
// and a newline. Nil args (or args encoding to null) leave "arguments" out.
func appendRequest(buf []byte, verb, command string, id uint64, args any) ([]byte, error) {
	buf = append(buf, '{', '"')
	buf = append(buf, verb...)
	buf = append(buf, '"', ':')
	buf = appendString(buf, command)
	buf = append(buf, `,"id":"`...)
	buf = strconv.AppendUint(buf, id, 10)
	buf = append(buf, '"')
	if args != nil {
		a, err := json.Marshal(args)
		if err != nil {
			return nil, err
		}
		if string(a) != "null" {
			buf = append(buf, `,"arguments":`...)
			buf = append(buf, a...)
		}
	}
	return append(buf, '}', '\n'), nil
}

// appendString appends s as a JSON string.
func appendString(buf []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if b := s[i]; b < 0x20 || b > 0x7e || b == '"' || b == '\\' {
			q, _ := json.Marshal(s) // a string always encodes
			return append(buf, q...)
		}
	}
	buf = append(buf, '"')
	buf = append(buf, s...)
	return append(buf, '"')
}

// parseID reads the ids this client sends: a decimal number in a JSON string.
// Anything else is not ours.
func parseID(raw json.RawMessage) (uint64, bool) {
	if len(raw) < 3 || raw[0] != '"' || raw[len(raw)-1] != '"' || len(raw) > 21 { // at most 19 digits: no overflow
		return 0, false
	}
	var n uint64
	for _, b := range raw[1 : len(raw)-1] {
		if b < '0' || b > '9' {
			return 0, false
		}
		n = n*10 + uint64(b-'0')
	}
	return n, true
}

// closeWith ends the connection once; cause nil means a local Close.
func (c *Client) closeWith(cause error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if cause == nil {
		c.err = ErrClosed
	} else {
		c.err = fmt.Errorf("%w: %w", ErrClosed, cause)
	}
	subs := c.subs
	c.subs = map[*Subscription]struct{}{}
	close(c.done)
	c.mu.Unlock()
	c.conn.Close()
	for s := range subs {
		s.closeChan()
	}
}

// readLine reads one line of any length.
func readLine(r *bufio.Reader) ([]byte, error) {
	var out []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if err == nil {
			if out == nil {
				return append([]byte(nil), chunk...), nil
			}
			return append(out, chunk...), nil
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			out = append(out, chunk...)
			continue
		}
		if err == io.EOF && len(out)+len(chunk) > 0 {
			return nil, fmt.Errorf("connection closed mid-line: %w", io.ErrUnexpectedEOF)
		}
		return nil, err
	}
}

func truncate(b []byte) string {
	const max = 200
	if len(b) > max {
		return string(b[:max]) + "..."
	}
	return string(b)
}

// Closed returns a Client for a QEMU that cannot be reached (cause says
// why): every command fails with ErrClosed, Done is closed, subscriptions
// are closed at once. For code that holds a client per QEMU whatever
// happened to the QEMU (the engine adopting a migration whose destination
// already exited).
func Closed(cause error) *Client {
	c := &Client{subs: map[*Subscription]struct{}{}, pending: map[uint64]chan response{}, done: make(chan struct{}), log: slog.New(slog.DiscardHandler)}
	c.err = fmt.Errorf("%w: %w", ErrClosed, cause)
	close(c.done)
	return c
}
