package qmptest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// HandlerFunc answers one command. args is the command's "arguments" object
// (nil when the client sent none).
//
// The result is encoded as the reply's "return" (nil becomes {}), unless it is
// a [Raw] line, which is written verbatim instead of a reply. A *qmp.Error
// becomes a QMP error reply with its Class and Desc; [ErrNoReply] sends
// nothing; [ErrCloseConn] closes the connection instead of answering; any
// other error becomes a GenericError reply with the error's text.
type HandlerFunc func(args json.RawMessage) (any, error)

// Handler sentinels a HandlerFunc may return.
var (
	// ErrNoReply makes the server swallow the command: it is never answered.
	ErrNoReply = errors.New("qmptest: no reply")
	// ErrCloseConn makes the server close the connection the command came
	// on, without answering: QEMU dying mid-command.
	ErrCloseConn = errors.New("qmptest: close connection")
)

// Raw is a handler result written to the wire as it is (a newline is added
// when missing) in place of the reply: garbage, a reply with a wrong id, a
// second greeting, anything a test needs.
type Raw string

// Call is a command the server received.
type Call struct {
	Command string
	Args    json.RawMessage
	// OOB is true when the command came as "exec-oob".
	OOB bool
}

// Option configures a Server.
type Option func(*Server)

// WithVersion sets the QEMU version the greeting announces (default 10.0.0).
func WithVersion(major, minor, micro int) Option {
	return func(s *Server) { s.version = [3]int{major, minor, micro} }
}

// WithCapabilities sets the capabilities the greeting offers (default
// ["oob"]). WithCapabilities() offers none, so the client cannot use exec-oob.
func WithCapabilities(caps ...string) Option {
	return func(s *Server) { s.caps = append([]string{}, caps...) }
}

// WithGreeting replaces the greeting with a raw line (for malformed greetings).
func WithGreeting(line string) Option {
	return func(s *Server) { s.greeting = &line }
}

// WithoutGreeting makes the server accept connections but never greet: a
// QEMU that hangs before its monitor is ready.
func WithoutGreeting() Option {
	return func(s *Server) { s.noGreeting = true }
}

// WithSerial makes each connection run its commands one at a time, in arrival
// order, as QEMU's monitor does for in-band commands. By default every
// command runs in its own goroutine so that a handler that blocks delays only
// its own reply (which is how tests get replies out of order).
func WithSerial() Option {
	return func(s *Server) { s.serial = true }
}

// Server is a fake QEMU monitor. The zero value is not usable; call NewServer.
// All methods are safe for concurrent use, also from inside handlers.
type Server struct {
	version    [3]int
	caps       []string
	greeting   *string
	noGreeting bool
	serial     bool

	mu         sync.Mutex
	inBandGate func() // SetInBandGate
	handlers   map[string]HandlerFunc
	conns      map[*conn]struct{}
	listeners  []net.Listener
	calls      []Call
	handshakes []json.RawMessage
	called     chan struct{} // closed (and dropped) when a call arrives
	closed     bool
	wg         sync.WaitGroup
}

// NewServer returns a server that greets with a QEMU version and "oob"
// offered and handles qmp_capabilities itself: as in QEMU, every other
// command before it, and a second qmp_capabilities, get CommandNotFound.
// Connect with Conn, Client or ListenUnix; register commands with Handle;
// Close it when done.
func NewServer(opts ...Option) *Server {
	s := &Server{
		version:  [3]int{10, 0, 0},
		caps:     []string{"oob"},
		handlers: make(map[string]HandlerFunc),
		conns:    make(map[*conn]struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Handle registers h for command, replacing any previous handler. Commands
// without a handler get a CommandNotFound error reply, as QEMU sends.
// Registering "qmp_capabilities" replaces the built-in handshake handler.
func (s *Server) Handle(command string, h HandlerFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[command] = h
}

// SetInBandGate makes every in-band command wait for gate to return before
// its handler runs (on the command's own goroutine; with WithSerial while
// holding the connection's turn, so the in-band commands behind it wait
// too), as QEMU's in-band commands wait while its main thread is blocked.
// exec-oob commands and qmp_capabilities do not wait, nor do events. nil
// removes the gate. A gate that blocks must be released before Close.
func (s *Server) SetInBandGate(gate func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inBandGate = gate
}

// Handler returns the handler registered for command (nil when none), so
// that a test can wrap it: fail its first call, delay it, then defer to it.
func (s *Server) Handler(command string) HandlerFunc { return s.handler(command) }

// Emit sends an event (with the current time as its timestamp) to every
// connected client that has finished the handshake. data may be nil. Emit
// never blocks: each connection has its own unbounded send queue, so events
// and replies reach a client in the order they were emitted or answered.
func (s *Server) Emit(name string, data any) {
	now := time.Now()
	msg := map[string]any{
		"event": name,
		"timestamp": map[string]int64{
			"seconds":      now.Unix(),
			"microseconds": int64(now.Nanosecond() / 1000),
		},
	}
	if data != nil {
		msg["data"] = data
	}
	line, err := json.Marshal(msg)
	if err != nil {
		panic(fmt.Sprintf("qmptest: Emit %s: cannot encode data: %v", name, err))
	}
	for _, c := range s.live() {
		c.mu.Lock()
		ready := c.negotiated
		c.mu.Unlock()
		if ready {
			c.send(line)
		}
	}
}

// SendRaw writes line (a newline is added when missing) to every connected
// client, whatever its handshake state.
func (s *Server) SendRaw(line string) {
	for _, c := range s.live() {
		c.send([]byte(line))
	}
}

// Conn returns the client end of a new net.Pipe whose other end the server
// serves. After Close the returned connection is already closed at the far end.
func (s *Server) Conn() net.Conn {
	client, server := net.Pipe()
	s.serve(server)
	return client
}

// Client connects a real *qmp.Client to the server over Conn and runs the
// handshake. The caller closes the client.
func (s *Server) Client(ctx context.Context, opts ...qmp.Option) (*qmp.Client, error) {
	return qmp.NewClient(ctx, s.Conn(), opts...)
}

// ServeConn serves an existing connection (e.g. one accepted from a TCP
// listener the test made). The server owns it from then on.
func (s *Server) ServeConn(nc net.Conn) { s.serve(nc) }

// ListenUnix also serves connections on a unix socket at path, for code that
// dials (CLI tests). Close removes the socket.
func (s *Server) ListenUnix(path string) error {
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("qmptest: %w", err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return fmt.Errorf("qmptest: listen on %s: %w", path, net.ErrClosed)
	}
	s.listeners = append(s.listeners, l)
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			s.serve(nc)
		}
	}()
	return nil
}

// Calls returns the commands received so far, in arrival order, across all
// connections. The handshake's qmp_capabilities is not among them (see
// Handshakes).
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// CallsOf returns the received calls of one command, in arrival order.
func (s *Server) CallsOf(command string) []Call {
	var out []Call
	for _, c := range s.Calls() {
		if c.Command == command {
			out = append(out, c)
		}
	}
	return out
}

// WaitCall waits until the server has received n calls of command (n >= 1)
// and returns the n-th, or fails when ctx ends. It lets a test act on the
// moment the code under test sends a command (emit events, check arguments)
// without sleeping.
func (s *Server) WaitCall(ctx context.Context, command string, n int) (Call, error) {
	for {
		s.mu.Lock()
		seen := 0
		for _, c := range s.calls {
			if c.Command == command {
				seen++
				if seen == n {
					s.mu.Unlock()
					return c, nil
				}
			}
		}
		if s.called == nil {
			s.called = make(chan struct{})
		}
		ch := s.called
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return Call{}, fmt.Errorf("qmptest: waiting for call %d of %s (%d seen): %w", n, command, seen, ctx.Err())
		}
	}
}

// Handshakes returns the arguments of every qmp_capabilities received (nil
// entries when sent without arguments), e.g. {"enable":["oob"]}.
func (s *Server) Handshakes() []json.RawMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]json.RawMessage(nil), s.handshakes...)
}

// NumConns is the number of connections currently open.
func (s *Server) NumConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// CloseConns closes every open connection (QEMU exiting) but keeps the server,
// its handlers and its listeners, so clients may connect again.
func (s *Server) CloseConns() {
	for _, c := range s.live() {
		c.close()
	}
}

// Close stops listening, closes every connection and waits for the server's
// own goroutines. Handlers still running (blocked in test code) are not
// waited for; their replies are dropped.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	ls := s.listeners
	s.listeners = nil
	s.mu.Unlock()
	for _, l := range ls {
		l.Close()
	}
	s.CloseConns()
	s.wg.Wait()
}

func (s *Server) live() []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		out = append(out, c)
	}
	return out
}

func (s *Server) handler(command string) HandlerFunc {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handlers[command]
}

// conn is one served connection: a reader goroutine that parses commands and
// a writer goroutine that drains an unbounded queue of lines.
type conn struct {
	s  *Server
	nc net.Conn

	mu         sync.Mutex
	queue      [][]byte
	negotiated bool
	oob        bool
	closed     bool
	wake       chan struct{} // cap 1: queue not empty
	done       chan struct{} // closed by close()
	serialMu   chan struct{} // cap 1: token for WithSerial
}

func (s *Server) serve(nc net.Conn) {
	c := &conn{
		s:        s,
		nc:       nc,
		wake:     make(chan struct{}, 1),
		done:     make(chan struct{}),
		serialMu: make(chan struct{}, 1),
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(2)
	s.mu.Unlock()

	if !s.noGreeting {
		if s.greeting != nil {
			c.send([]byte(*s.greeting))
		} else {
			c.send(s.greetingLine())
		}
	}
	go func() {
		defer s.wg.Done()
		c.writeLoop()
	}()
	go func() {
		defer s.wg.Done()
		c.readLoop()
	}()
}

func (s *Server) greetingLine() []byte {
	caps := s.caps
	if caps == nil {
		caps = []string{}
	}
	g := map[string]any{"QMP": map[string]any{
		"version": map[string]any{
			"qemu":    map[string]int{"major": s.version[0], "minor": s.version[1], "micro": s.version[2]},
			"package": "qmptest",
		},
		"capabilities": caps,
	}}
	b, _ := json.Marshal(g)
	return b
}

func (c *conn) send(line []byte) {
	b := make([]byte, 0, len(line)+1)
	b = append(b, line...)
	if len(b) == 0 || b[len(b)-1] != '\n' {
		b = append(b, '\n')
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.queue = append(c.queue, b)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *conn) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.queue = nil
	close(c.done)
	c.mu.Unlock()
	c.nc.Close()
	c.s.mu.Lock()
	delete(c.s.conns, c)
	c.s.mu.Unlock()
}

func (c *conn) writeLoop() {
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		for {
			c.mu.Lock()
			if len(c.queue) == 0 || c.closed {
				c.mu.Unlock()
				break
			}
			line := c.queue[0]
			c.queue[0] = nil
			c.queue = c.queue[1:]
			c.mu.Unlock()
			if _, err := c.nc.Write(line); err != nil {
				c.close()
				return
			}
		}
	}
}

type request struct {
	Execute   string          `json:"execute"`
	ExecOOB   string          `json:"exec-oob"`
	ID        json.RawMessage `json:"id"`
	Arguments json.RawMessage `json:"arguments"`
}

func (c *conn) readLoop() {
	defer c.close()
	r := bufio.NewReaderSize(c.nc, 64<<10)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		var req request
		if err := json.Unmarshal(line, &req); err != nil {
			c.reply(nil, nil, &qmp.Error{Class: "GenericError", Desc: "JSON parse error, " + err.Error()})
			continue
		}
		c.request(req)
	}
}

func (c *conn) request(req request) {
	cmd, oob := req.Execute, false
	if req.ExecOOB != "" {
		cmd, oob = req.ExecOOB, true
	}
	if cmd == "" {
		c.reply(req.ID, nil, &qmp.Error{Class: "GenericError", Desc: "QMP input lacks member 'execute'"})
		return
	}
	c.mu.Lock()
	negotiated, oobOn := c.negotiated, c.oob
	c.mu.Unlock()

	if cmd == "qmp_capabilities" {
		c.s.mu.Lock()
		c.s.handshakes = append(c.s.handshakes, req.Arguments)
		h := c.s.handlers[cmd]
		c.s.mu.Unlock()
		if negotiated {
			c.reply(req.ID, nil, &qmp.Error{Class: "CommandNotFound", Desc: "Capabilities negotiation is already complete, command ignored"})
			return
		}
		if h != nil {
			res, err := h(req.Arguments)
			if err == nil {
				c.setNegotiated(req.Arguments)
			}
			c.finish(req.ID, res, err)
			return
		}
		if err := c.setNegotiated(req.Arguments); err != nil {
			c.reply(req.ID, nil, err)
			return
		}
		c.reply(req.ID, struct{}{}, nil)
		return
	}

	c.s.mu.Lock()
	c.s.calls = append(c.s.calls, Call{Command: cmd, Args: req.Arguments, OOB: oob})
	if c.s.called != nil {
		close(c.s.called)
		c.s.called = nil
	}
	c.s.mu.Unlock()

	if !negotiated {
		c.reply(req.ID, nil, &qmp.Error{Class: "CommandNotFound", Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"})
		return
	}
	if oob && !oobOn {
		c.reply(req.ID, nil, &qmp.Error{Class: "GenericError", Desc: "Please enable out-of-band first for the session during capabilities negotiation"})
		return
	}
	h := c.s.handler(cmd)
	if h == nil {
		c.reply(req.ID, nil, &qmp.Error{Class: "CommandNotFound", Desc: fmt.Sprintf("The command %s has not been found", cmd)})
		return
	}
	run := func() {
		if !oob {
			c.s.mu.Lock()
			gate := c.s.inBandGate
			c.s.mu.Unlock()
			if gate != nil {
				gate()
			}
		}
		res, err := h(req.Arguments)
		c.finish(req.ID, res, err)
	}
	if c.s.serial && !oob {
		// In-band commands run one at a time; the reader goes on reading so
		// that exec-oob still overtakes, as in QEMU. Like handlers in the
		// default mode, these goroutines are not waited for by Close.
		go func() {
			select {
			case c.serialMu <- struct{}{}:
			case <-c.done:
				return
			}
			defer func() { <-c.serialMu }()
			run()
		}()
		return
	}
	go run()
}

func (c *conn) setNegotiated(args json.RawMessage) error {
	var a struct {
		Enable []string `json:"enable"`
	}
	if len(args) > 0 {
		if err := json.Unmarshal(args, &a); err != nil {
			return &qmp.Error{Class: "GenericError", Desc: "Invalid parameter type for 'enable', expected: array"}
		}
	}
	oob := false
	for _, e := range a.Enable {
		if e != "oob" {
			return &qmp.Error{Class: "GenericError", Desc: fmt.Sprintf("Parameter 'enable' does not accept value '%s'", e)}
		}
		offered := false
		for _, cp := range c.s.caps {
			if cp == "oob" {
				offered = true
			}
		}
		if !offered {
			return &qmp.Error{Class: "GenericError", Desc: "This monitor does not support Out-Of-Band (OOB)"}
		}
		oob = true
	}
	c.mu.Lock()
	c.negotiated, c.oob = true, oob
	c.mu.Unlock()
	return nil
}

// finish turns a handler's outcome into what goes on the wire.
func (c *conn) finish(id json.RawMessage, res any, err error) {
	switch {
	case errors.Is(err, ErrNoReply):
		return
	case errors.Is(err, ErrCloseConn):
		c.close()
		return
	case err != nil:
		c.reply(id, nil, err)
		return
	}
	if raw, ok := res.(Raw); ok {
		c.send([]byte(raw))
		return
	}
	if res == nil {
		res = struct{}{}
	}
	c.reply(id, res, nil)
}

func (c *conn) reply(id json.RawMessage, res any, err error) {
	msg := map[string]any{}
	if len(id) > 0 {
		msg["id"] = id
	}
	if err != nil {
		var qe *qmp.Error
		if errors.As(err, &qe) {
			msg["error"] = map[string]string{"class": qe.Class, "desc": qe.Desc}
		} else {
			msg["error"] = map[string]string{"class": "GenericError", "desc": err.Error()}
		}
	} else {
		msg["return"] = res
	}
	line, merr := json.Marshal(msg)
	if merr != nil {
		line, _ = json.Marshal(map[string]any{"id": id, "error": map[string]string{
			"class": "GenericError", "desc": "qmptest: cannot encode handler result: " + merr.Error()}})
	}
	c.send(line)
}

// Return is a HandlerFunc that always answers v.
func Return(v any) HandlerFunc {
	return func(json.RawMessage) (any, error) { return v, nil }
}

// Fail is a HandlerFunc that always answers a QMP error of class with desc.
func Fail(class, desc string) HandlerFunc {
	return func(json.RawMessage) (any, error) { return nil, &qmp.Error{Class: class, Desc: desc} }
}

// Delay wraps h so that it answers d later (time.Sleep, so it runs instantly
// under testing/synctest).
func Delay(d time.Duration, h HandlerFunc) HandlerFunc {
	return func(args json.RawMessage) (any, error) {
		time.Sleep(d)
		return h(args)
	}
}
