package qmp_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// fake starts a qmptest server and a client connected to it; both are closed
// when the test ends.
func fake(t *testing.T, opts ...qmptest.Option) (*qmptest.Server, *qmp.Client) {
	t.Helper()
	s := qmptest.NewServer(opts...)
	t.Cleanup(s.Close)
	c, err := s.Client(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return s, c
}

// echo answers its arguments.
func echo(args json.RawMessage) (any, error) {
	if args == nil {
		return nil, nil
	}
	return args, nil
}

func TestHandshakeNegotiatesOOB(t *testing.T) {
	s, c := fake(t, qmptest.WithVersion(10, 0, 2))
	assert.True(t, c.OOB())
	assert.Equal(t, []string{"oob"}, c.GreetingCapabilities())
	assert.Equal(t, "10.0.2", c.Version().String())
	assert.True(t, c.Version().AtLeast(9, 1))
	assert.False(t, c.Version().AtLeast(10, 1))
	require.Len(t, s.Handshakes(), 1)
	assert.JSONEq(t, `{"enable":["oob"]}`, string(s.Handshakes()[0]))
	assert.NoError(t, c.Err())
	select {
	case <-c.Done():
		t.Fatal("Done closed on a live connection")
	default:
	}
}

func TestHandshakeWithoutOOB(t *testing.T) {
	s, c := fake(t, qmptest.WithCapabilities(), qmptest.WithVersion(7, 2, 0))
	assert.False(t, c.OOB())
	assert.Empty(t, c.GreetingCapabilities())
	assert.Nil(t, s.Handshakes()[0], "no enable list when oob was not offered")
	err := c.ExecuteOOB(t.Context(), "migrate-pause", nil, nil)
	assert.ErrorIs(t, err, qmp.ErrOOBUnavailable)
	var ce *qmp.CommandError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, "migrate-pause", ce.Command)

	// The typed helpers fall back to in-band execution.
	s.Handle("migrate-pause", qmptest.Return(nil))
	require.NoError(t, c.MigratePause(t.Context()))
	assert.False(t, s.CallsOf("migrate-pause")[0].OOB)
}

func TestExecuteOOB(t *testing.T) {
	s, c := fake(t)
	s.Handle("migrate-recover", qmptest.Return(nil))
	s.Handle("migrate-pause", qmptest.Return(nil))
	require.NoError(t, c.MigrateRecover(t.Context(), "unix:/tmp/x"))
	require.NoError(t, c.MigratePause(t.Context()))
	calls := s.Calls()
	require.Len(t, calls, 2)
	assert.True(t, calls[0].OOB)
	assert.JSONEq(t, `{"uri":"unix:/tmp/x"}`, string(calls[0].Args))
	assert.True(t, calls[1].OOB)
}

func TestHandshakeBadGreeting(t *testing.T) {
	for name, line := range map[string]string{
		"garbage":    "hello, I am not QEMU",
		"no QMP key": `{"return": {}}`,
		"bad type":   `{"QMP": {"version": "seven"}}`,
	} {
		t.Run(name, func(t *testing.T) {
			s := qmptest.NewServer(qmptest.WithGreeting(line))
			defer s.Close()
			c, err := s.Client(t.Context())
			require.Error(t, err)
			assert.Nil(t, c)
			var pe *qmp.ProtocolError
			require.ErrorAs(t, err, &pe)
			assert.Contains(t, pe.Line, line[:5])
		})
	}
}

func TestHandshakeGreetingNeverSent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer(qmptest.WithoutGreeting())
		defer s.Close()
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
		defer cancel()
		start := time.Now()
		c, err := s.Client(ctx)
		assert.Nil(t, c)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, 3*time.Second, time.Since(start))
		synctest.Wait()
		assert.Equal(t, 0, s.NumConns(), "the connection is closed after a failed handshake")
	})
}

func TestHandshakeCapabilitiesNeverAnswered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer()
		defer s.Close()
		s.Handle("qmp_capabilities", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		_, err := s.Client(ctx)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		synctest.Wait()
		assert.Equal(t, 0, s.NumConns())
	})
}

func TestHandshakeCapabilitiesRefused(t *testing.T) {
	s := qmptest.NewServer()
	defer s.Close()
	s.Handle("qmp_capabilities", qmptest.Fail("GenericError", "no"))
	_, err := s.Client(t.Context())
	assert.ErrorIs(t, err, &qmp.Error{Class: "GenericError", Desc: "no"})
}

func TestRepliesMatchedByIDOutOfOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, c := fake(t)
		const n = 8
		release := make([]chan struct{}, n)
		for i := range release {
			release[i] = make(chan struct{})
		}
		s.Handle("slow", func(args json.RawMessage) (any, error) {
			var a struct{ I int }
			if err := json.Unmarshal(args, &a); err != nil {
				return nil, err
			}
			<-release[a.I]
			return map[string]int{"i": a.I}, nil
		})
		var wg sync.WaitGroup
		got := make([]int, n)
		for i := range n {
			wg.Go(func() {
				var r struct{ I int }
				assert.NoError(t, c.Execute(t.Context(), "slow", map[string]int{"i": i}, &r))
				got[i] = r.I
			})
		}
		synctest.Wait()
		require.Len(t, s.Calls(), n, "all commands in flight at once")
		// Answer in reverse order.
		for i := n - 1; i >= 0; i-- {
			close(release[i])
			synctest.Wait()
		}
		wg.Wait()
		for i := range n {
			assert.Equal(t, i, got[i])
		}
	})
}

func TestCancelAbandonsWaitAndDropsLateReply(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, c := fake(t)
		release := make(chan struct{})
		s.Handle("slow", func(json.RawMessage) (any, error) {
			<-release
			return map[string]string{"who": "slow"}, nil
		})
		s.Handle("fast", qmptest.Return(map[string]string{"who": "fast"}))

		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		start := time.Now()
		var r struct{ Who string }
		err := c.Execute(ctx, "slow", nil, &r)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		var ce *qmp.CommandError
		require.ErrorAs(t, err, &ce)
		assert.Equal(t, "slow", ce.Command)
		assert.Equal(t, 10*time.Second, time.Since(start))
		assert.Empty(t, r.Who)

		// The late reply arrives and is dropped; the connection stays usable
		// and the next command gets its own reply.
		close(release)
		synctest.Wait()
		require.NoError(t, c.Execute(t.Context(), "fast", nil, &r))
		assert.Equal(t, "fast", r.Who)
		assert.NoError(t, c.Err())

		// An already-cancelled context fails before anything is sent.
		cctx, ccancel := context.WithCancel(t.Context())
		ccancel()
		assert.ErrorIs(t, c.Execute(cctx, "fast", nil, nil), context.Canceled)
		assert.Len(t, s.CallsOf("fast"), 1)
	})
}

func TestConnectionClosedMidCommandFailsEveryWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, c := fake(t)
		s.Handle("hang", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
		s.Handle("die", func(json.RawMessage) (any, error) { return nil, qmptest.ErrCloseConn })
		sub := c.SubscribeNames("STOP")

		errs := make(chan error, 4)
		for range 3 {
			go func() { errs <- c.Execute(t.Context(), "hang", nil, nil) }()
		}
		synctest.Wait()
		go func() { errs <- c.Execute(t.Context(), "die", nil, nil) }()
		synctest.Wait() // every call has returned without any time passing
		require.Len(t, errs, 4)
		for range 4 {
			err := <-errs
			assert.ErrorIs(t, err, qmp.ErrClosed)
			assert.ErrorIs(t, err, io.EOF, "the cause is kept")
		}
		select {
		case <-c.Done():
		default:
			t.Fatal("Done not closed")
		}
		assert.ErrorIs(t, c.Err(), qmp.ErrClosed)
		assert.ErrorIs(t, c.Err(), io.EOF)

		// Subscriptions end with the connection.
		_, ok := <-sub.C
		assert.False(t, ok)
		// Later calls fail at once.
		assert.ErrorIs(t, c.Execute(t.Context(), "hang", nil, nil), qmp.ErrClosed)
		late := c.SubscribeNames("STOP")
		_, ok = <-late.C
		assert.False(t, ok, "a subscription on a dead client is closed")
		late.Close()
		sub.Close()
	})
}

func TestLocalClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, c := fake(t)
		s.Handle("hang", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
		errc := make(chan error, 1)
		go func() { errc <- c.Execute(t.Context(), "hang", nil, nil) }()
		synctest.Wait()
		require.NoError(t, c.Close())
		err := <-errc
		assert.ErrorIs(t, err, qmp.ErrClosed)
		assert.Equal(t, qmp.ErrClosed, c.Err(), "a local close has no other cause")
		require.NoError(t, c.Close(), "Close twice is fine")
		synctest.Wait()
		assert.Equal(t, 0, s.NumConns())
	})
}

func TestQMPErrorKeepsClassDescCommand(t *testing.T) {
	s, c := fake(t)
	s.Handle("migrate-incoming", qmptest.Fail("GenericError", "The incoming migration has already been started"))
	err := c.MigrateIncoming(t.Context(), qmp.MigrateIncomingArgs{URI: "unix:/x"})
	var qe *qmp.Error
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "migrate-incoming", qe.Command)
	assert.Equal(t, "GenericError", qe.Class)
	assert.Equal(t, "The incoming migration has already been started", qe.Desc)
	assert.Equal(t, "qmp: migrate-incoming: The incoming migration has already been started (GenericError)", err.Error())
	assert.ErrorIs(t, err, &qmp.Error{Class: "GenericError"})
	assert.ErrorIs(t, err, &qmp.Error{Command: "migrate-incoming"})
	assert.NotErrorIs(t, err, &qmp.Error{Class: "CommandNotFound"})
	assert.False(t, qmp.IsCommandNotFound(err))

	err = c.Execute(t.Context(), "block-job-change", nil, nil)
	assert.True(t, qmp.IsCommandNotFound(err))
	assert.True(t, qmp.IsCommandNotFound(fmt.Errorf("wrapped: %w", err)))
	assert.NoError(t, c.Err(), "an error reply does not hurt the connection")
}

func TestGarbageOnTheWire(t *testing.T) {
	for name, line := range map[string]string{
		"not json":          "}{ definitely not json",
		"neither":           `{"foo": 1}`,
		"second greeting":   `{"QMP": {"version": {"qemu": {"major": 1, "minor": 0, "micro": 0}}, "capabilities": []}}`,
		"truncated":         `{"return": {"a": `,
		"wrong return type": `[1,2,3]`,
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				s, c := fake(t)
				s.Handle("hang", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
				errc := make(chan error, 1)
				go func() { errc <- c.Execute(t.Context(), "hang", nil, nil) }()
				synctest.Wait()
				s.SendRaw(line)
				err := <-errc
				assert.ErrorIs(t, err, qmp.ErrClosed)
				var pe *qmp.ProtocolError
				require.ErrorAs(t, err, &pe)
				require.ErrorAs(t, c.Err(), &pe)
				<-c.Done()
			})
		})
	}
}

func TestUnmatchedRepliesAreDropped(t *testing.T) {
	s, c := fake(t)
	s.Handle("query-status", qmptest.Return(map[string]any{"status": "paused"}))
	s.SendRaw(`{"return": {}, "id": "no-such-id"}`)
	s.SendRaw(`{"error": {"class": "GenericError", "desc": "JSON parse error"}}`)
	s.SendRaw(`{"return": {}, "id": 12345}`)
	s.SendRaw("")
	st, err := c.QueryStatus(t.Context())
	require.NoError(t, err)
	assert.Equal(t, "paused", st.Status)
}

func TestReplyDecodeError(t *testing.T) {
	s, c := fake(t)
	s.Handle("query-status", qmptest.Return(map[string]any{"running": "yes"}))
	_, err := c.QueryStatus(t.Context())
	var ce *qmp.CommandError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, "query-status", ce.Command)
	var pe *qmp.ProtocolError
	assert.ErrorAs(t, err, &pe)
	assert.NoError(t, c.Err(), "a reply that does not fit the type does not kill the connection")
}

func TestArgumentsEncodeError(t *testing.T) {
	_, c := fake(t)
	err := c.Execute(t.Context(), "x", map[string]any{"f": func() {}}, nil)
	var ce *qmp.CommandError
	require.ErrorAs(t, err, &ce)
	assert.NoError(t, c.Err())
}

func TestMultiMegabyteLines(t *testing.T) {
	s, c := fake(t)
	big := strings.Repeat("0123456789abcdef", 8<<20/16) // 8 MiB
	reply := json.RawMessage(`{"s":"` + big + `"}`)
	s.Handle("big", qmptest.Return(reply))
	var out struct{ S string }
	require.NoError(t, c.Execute(t.Context(), "big", nil, &out))
	assert.Equal(t, len(big), len(out.S))
	assert.True(t, out.S == big)

	// A 1 MiB command goes the other way.
	s.Handle("echo", echo)
	var e struct{ S string }
	require.NoError(t, c.Execute(t.Context(), "echo", map[string]string{"s": big[:1<<20]}, &e))
	assert.Len(t, e.S, 1<<20)

	sub := c.SubscribeNames("BIG")
	defer sub.Close()
	s.Emit("BIG", map[string]string{"s": big[:1<<20]})
	ev := <-sub.C
	var d struct{ S string }
	require.NoError(t, ev.Decode(&d))
	assert.Len(t, d.S, 1<<20)
}

func TestEventsByNameAndFilter(t *testing.T) {
	s, c := fake(t)
	s.Handle("sync", qmptest.Return(nil))
	all := c.Subscribe(qmp.EventFilter{})
	jobs := c.Subscribe(qmp.EventFilter{
		Names: []string{"BLOCK_JOB_READY", "JOB_STATUS_CHANGE"},
		Match: qmp.ForDevice("mirror0"),
	})
	stops := c.SubscribeNames("STOP", "RESUME")
	defer all.Close()
	defer jobs.Close()
	defer stops.Close()

	s.Emit("BLOCK_JOB_READY", map[string]any{"device": "mirror1", "type": "mirror"})
	s.Emit("BLOCK_JOB_READY", map[string]any{"device": "mirror0", "type": "mirror", "len": 10})
	s.Emit("JOB_STATUS_CHANGE", map[string]any{"id": "mirror0", "status": "ready"})
	s.Emit("STOP", nil)
	s.Emit("RESUME", nil)
	// Events and replies keep their order, so after this reply every event
	// above has been dispatched.
	require.NoError(t, c.Execute(t.Context(), "sync", nil, nil))

	names := func(sub *qmp.Subscription) []string {
		var out []string
		for {
			select {
			case ev := <-sub.C:
				out = append(out, ev.Name)
			default:
				return out
			}
		}
	}
	assert.Equal(t, []string{"BLOCK_JOB_READY", "BLOCK_JOB_READY", "JOB_STATUS_CHANGE", "STOP", "RESUME"}, names(all))
	assert.Equal(t, []string{"STOP", "RESUME"}, names(stops))

	s.Emit("BLOCK_JOB_READY", map[string]any{"device": "mirror0", "type": "mirror", "len": 10})
	ev := <-jobs.C
	assert.Equal(t, "mirror0", ev.Field("device"))
	var d struct{ Len int }
	require.NoError(t, ev.Decode(&d))
	assert.Equal(t, 10, d.Len)
	assert.Equal(t, "JOB_STATUS_CHANGE", (<-jobs.C).Name)
	assert.Equal(t, "BLOCK_JOB_READY", (<-jobs.C).Name)
}

func TestSlowSubscriberNeverBlocksReplies(t *testing.T) {
	s, c := fake(t)
	s.Handle("query-status", qmptest.Return(map[string]any{"status": "running", "running": true}))
	slow := c.Subscribe(qmp.EventFilter{Names: []string{"MIGRATION_PASS"}, Buffer: 2})
	defer slow.Close()
	for i := range 100 {
		s.Emit("MIGRATION_PASS", map[string]int{"pass": i})
	}
	// Nobody reads slow.C, yet the reply comes through.
	st, err := c.QueryStatus(t.Context())
	require.NoError(t, err)
	assert.True(t, st.Running)
	assert.Equal(t, uint64(98), slow.Dropped())
	var p struct{ Pass int }
	require.NoError(t, (<-slow.C).Decode(&p))
	assert.Equal(t, 0, p.Pass, "the oldest events are kept, newer ones dropped")
}

func TestSubscribeBeforeCommand(t *testing.T) {
	s, c := fake(t)
	s.Handle("stop", func(json.RawMessage) (any, error) {
		s.Emit("STOP", nil)
		return nil, nil
	})
	s.Handle("cont", func(json.RawMessage) (any, error) {
		s.Emit("RESUME", nil)
		return nil, nil
	})
	sub := c.SubscribeNames("STOP", "RESUME")
	defer sub.Close()
	require.NoError(t, c.Stop(t.Context()))
	require.NoError(t, c.Cont(t.Context()))
	assert.Equal(t, "STOP", (<-sub.C).Name)
	assert.Equal(t, "RESUME", (<-sub.C).Name)
}

func TestSubscriptionClose(t *testing.T) {
	s, c := fake(t)
	s.Handle("sync", qmptest.Return(nil))
	sub := c.SubscribeNames("STOP")
	sub.Close()
	sub.Close()
	_, ok := <-sub.C
	assert.False(t, ok)
	s.Emit("STOP", nil) // must not panic on a closed channel
	require.NoError(t, c.Execute(t.Context(), "sync", nil, nil))
}

func TestEventTimestampAndHelpers(t *testing.T) {
	s, c := fake(t)
	sub := c.SubscribeNames("X")
	defer sub.Close()
	s.SendRaw(`{"event": "X", "data": {"device": "d", "n": 3}, "timestamp": {"seconds": 1700000000, "microseconds": 250}}`)
	ev := <-sub.C
	assert.Equal(t, time.Unix(1700000000, 250000), ev.Time)
	assert.Equal(t, "d", ev.Field("device"))
	assert.Equal(t, "", ev.Field("n"), "not a string")
	assert.Equal(t, "", ev.Field("missing"))
	assert.True(t, qmp.ForDevice("d")(ev))
	assert.False(t, qmp.ForDevice("e")(ev))

	s.SendRaw(`{"event": "X", "timestamp": {"seconds": 1, "microseconds": 0}}`)
	ev = <-sub.C
	assert.Nil(t, ev.Data)
	var v struct{}
	assert.NoError(t, ev.Decode(&v))
	assert.Equal(t, "", ev.Field("device"))
}

func TestDebugLogRedactsSecrets(t *testing.T) {
	var buf bytes.Buffer
	var mu sync.Mutex
	h := slog.NewTextHandler(&lockedWriter{w: &buf, mu: &mu}, &slog.HandlerOptions{Level: slog.LevelDebug})
	s := qmptest.NewServer()
	defer s.Close()
	s.Handle("object-add", qmptest.Return(nil))
	c, err := s.Client(t.Context(), qmp.WithLogger(slog.New(h)))
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.ObjectAdd(t.Context(), "secret", "sec0", map[string]any{"data": "hunter2", "format": "raw"}))
	require.NoError(t, c.ObjectAdd(t.Context(), "tls-creds-psk", "tls0", map[string]any{"password": `s3cr"et`, "key": "k3y", "iv": "iv-value"}))
	s.Emit("X", map[string]any{"token": "t0k3n"})
	require.NoError(t, c.Execute(t.Context(), "object-add", nil, nil)) // flush

	mu.Lock()
	log := buf.String()
	mu.Unlock()
	for _, secret := range []string{"hunter2", "k3y", "iv-value", "t0k3n", "s3cr"} {
		assert.NotContains(t, log, secret)
	}
	assert.Contains(t, log, "<redacted>")
	assert.Contains(t, log, "tls-creds-psk", "the rest of the line is kept")
	assert.Contains(t, log, "dir=->")
	assert.Contains(t, log, "dir=<-")
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestNilLoggerAndOptions(t *testing.T) {
	s := qmptest.NewServer()
	defer s.Close()
	c, err := s.Client(t.Context(), qmp.WithLogger(nil), qmp.WithEventBuffer(1), qmp.WithEventBuffer(-5))
	require.NoError(t, err)
	defer c.Close()
	sub := c.SubscribeNames("E")
	defer sub.Close()
	s.Emit("E", nil)
	s.Emit("E", nil)
	s.Handle("sync", qmptest.Return(nil))
	require.NoError(t, c.Execute(t.Context(), "sync", nil, nil))
	assert.Equal(t, uint64(1), sub.Dropped())
}

func TestFDPassingNeedsUnixSocket(t *testing.T) {
	_, c := fake(t)
	err := c.Getfd(t.Context(), "fd0", 0)
	assert.ErrorIs(t, err, qmp.ErrNoFDPassing)
	_, err = c.AddFd(t.Context(), 0, -1, "")
	assert.ErrorIs(t, err, qmp.ErrNoFDPassing)
}

func TestQuitTreatsCloseAsSuccess(t *testing.T) {
	s, c := fake(t)
	s.Handle("quit", func(json.RawMessage) (any, error) { return nil, qmptest.ErrCloseConn })
	assert.NoError(t, c.Quit(t.Context()))
	<-c.Done()
}

func TestDialErrors(t *testing.T) {
	_, err := qmp.Dial(t.Context(), "udp", "x")
	assert.ErrorIs(t, err, qmp.ErrUnsupportedNetwork)
	_, err = qmp.DialAddress(t.Context(), qmp.Address{})
	assert.ErrorIs(t, err, qmp.ErrBadAddress)
	_, err = qmp.DialAddress(t.Context(), qmp.TCPAddress("127.0.0.1", "0"))
	assert.ErrorIs(t, err, qmp.ErrBadAddress)
	_, err = qmp.Dial(t.Context(), "unix", "/nonexistent/qmp.sock")
	assert.Error(t, err)
}

func TestParseAddress(t *testing.T) {
	for in, want := range map[string]qmp.Address{
		"unix:/run/q.sock":   qmp.UnixAddress("/run/q.sock"),
		"unix:rel.sock":      qmp.UnixAddress("rel.sock"),
		"tcp:127.0.0.1:4444": qmp.TCPAddress("127.0.0.1", "4444"),
		"tcp:[::1]:4444":     qmp.TCPAddress("::1", "4444"),
		"tcp::4444":          qmp.TCPAddress("", "4444"),
		"tcp:h:0049":         qmp.TCPAddress("h", "49"),
		"tcp:h:0":            qmp.TCPAddress("h", "0"),
	} {
		a, err := qmp.ParseAddress(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, a, in)
		if want.Port == "0" {
			assert.ErrorIs(t, a.Dialable(), qmp.ErrBadAddress)
			assert.Contains(t, a.Dialable().Error(), `port "0"`)
		} else {
			assert.NoError(t, a.Dialable(), in)
		}
	}
	assert.Equal(t, "tcp:[::1]:4444", qmp.TCPAddress("::1", "4444").String())
	for in, why := range map[string]string{
		"":                    "want unix:/path or tcp:host:port",
		"unix:":               "empty socket path",
		"tcp:nohostport":      "missing port",
		"tcp:127.0.0.1:":      `port ""`,
		"tcp:127.0.0.1:99999": `port "99999"`,
		"tcp:127.0.0.1:-1":    `port "-1"`,
		"tcp:127.0.0.1:qmp":   `port "qmp"`,
		"/path":               "want unix:/path or tcp:host:port",
		"vsock:1:2":           "want unix:/path or tcp:host:port",
		"unix:/" + strings.Repeat("x", qmp.MaxUnixPath): "longer than the 107",
	} {
		_, err := qmp.ParseAddress(in)
		require.Error(t, err, in)
		assert.ErrorIs(t, err, qmp.ErrBadAddress, in)
		var ae *qmp.AddressError
		require.ErrorAs(t, err, &ae, in)
		assert.Contains(t, ae.Reason, why, in)
		assert.Equal(t, in, ae.Address)
	}
	_, err := qmp.ParseAddress("unix:/" + strings.Repeat("x", qmp.MaxUnixPath-1))
	assert.NoError(t, err, "a path of exactly MaxUnixPath bytes fits")
}

func TestSameSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "q.qmp")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer l.Close()
	link := filepath.Join(dir, "link.qmp")
	require.NoError(t, os.Symlink(path, link))

	assert.True(t, qmp.SameSocket(qmp.TCPAddress("h", "1"), qmp.TCPAddress("h", "1")))
	assert.False(t, qmp.SameSocket(qmp.TCPAddress("h", "1"), qmp.TCPAddress("h", "2")))
	assert.True(t, qmp.SameSocket(qmp.UnixAddress("/run/q.qmp"), qmp.UnixAddress("//run/./q.qmp")), "cleaned")
	assert.True(t, qmp.SameSocket(qmp.UnixAddress(path), qmp.UnixAddress(link)), "through a link")
	assert.False(t, qmp.SameSocket(qmp.UnixAddress(path), qmp.UnixAddress(filepath.Join(dir, "other.qmp"))))
	assert.False(t, qmp.SameSocket(qmp.UnixAddress("/h"), qmp.TCPAddress("h", "1")))
}

// lateCancelCtx is a context that is cancelled at a moment the test picks
// (cancel), through the hook context.AfterFunc offers to custom contexts.
type lateCancelCtx struct {
	context.Context
	done  chan struct{}
	mu    sync.Mutex
	f     func()
	fired bool
}

func (c *lateCancelCtx) Done() <-chan struct{} { return c.done }

func (c *lateCancelCtx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fired {
		return context.Canceled
	}
	return nil
}

func (c *lateCancelCtx) AfterFunc(f func()) func() bool {
	c.mu.Lock()
	c.f = f
	c.mu.Unlock()
	return func() bool { return true }
}

func (c *lateCancelCtx) cancel() {
	c.mu.Lock()
	f := c.f
	c.fired = true
	c.mu.Unlock()
	if f != nil {
		f()
	}
}

// hookConn runs afterWrite once a write has gone through.
type hookConn struct {
	net.Conn
	afterWrite func()
}

func (h *hookConn) Write(b []byte) (int, error) {
	n, err := h.Conn.Write(b)
	if h.afterWrite != nil {
		h.afterWrite()
	}
	return n, err
}

// A context that ends right after the command was written, before the client
// stops watching it, must not leave a write deadline behind that would kill
// the next command. context.AfterFunc runs the client's deadline setter in a
// goroutine of its own; inside the bubble synctest.Wait returns only once that
// goroutine is done, so a stray deadline has landed before the next command
// whenever there is one.
func TestCancelJustAfterWriteKeepsConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer()
		defer s.Close()
		s.Handle("query-status", qmptest.Return(map[string]any{"status": "running", "running": true}))
		hc := &hookConn{Conn: s.Conn()}
		c, err := qmp.NewClient(t.Context(), hc)
		require.NoError(t, err)
		defer c.Close()

		ctx := &lateCancelCtx{Context: t.Context(), done: make(chan struct{})}
		hc.afterWrite = ctx.cancel
		_, _ = c.QueryStatus(ctx) // may return the reply or context.Canceled
		hc.afterWrite = nil
		require.True(t, ctx.fired)
		synctest.Wait() // every goroutine blocked: the AfterFunc has run
		_, err = c.QueryStatus(t.Context())
		require.NoError(t, err)
		assert.NoError(t, c.Err())
	})
}

func TestDialTCP(t *testing.T) {
	s := qmptest.NewServer(qmptest.WithVersion(9, 2, 0))
	defer s.Close()
	s.Handle("query-status", qmptest.Return(map[string]any{"status": "running", "running": true}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	go func() {
		nc, err := l.Accept()
		if err == nil {
			s.ServeConn(nc)
		}
	}()
	c, err := qmp.DialAddress(t.Context(), qmp.TCPAddress("127.0.0.1", strconv.Itoa(l.Addr().(*net.TCPAddr).Port)))
	require.NoError(t, err)
	defer c.Close()
	assert.Equal(t, "9.2.0", c.Version().String())
	st, err := c.QueryStatus(t.Context())
	require.NoError(t, err)
	assert.True(t, st.Running)
	assert.ErrorIs(t, c.Getfd(t.Context(), "x", 0), qmp.ErrNoFDPassing, "no fd passing over TCP")
}

// A QEMU that stops reading: the write cannot finish before the context
// ends, so the connection is closed (a half-written command would corrupt
// the stream) and the error says both.
func TestWriteAbandonedKillsConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		client, server := net.Pipe()
		defer server.Close()
		go func() {
			_, _ = server.Write([]byte(`{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}` + "\n"))
			buf := make([]byte, 4096)
			_, _ = server.Read(buf) // qmp_capabilities
			_, _ = server.Write([]byte(`{"return": {}, "id": "1"}` + "\n"))
			// and never read again
		}()
		c, err := qmp.NewClient(t.Context(), client)
		require.NoError(t, err)
		defer c.Close()
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		err = c.Execute(ctx, "query-status", nil, nil)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.ErrorIs(t, err, qmp.ErrClosed)
		<-c.Done()
		assert.ErrorIs(t, c.Err(), context.DeadlineExceeded)
	})
}

// Many callers, subscribers that come and go, events, and finally the
// connection dying under them: no race, no hang, no reply to the wrong caller.
func TestStressConcurrentUse(t *testing.T) {
	s, c := fake(t)
	s.Handle("echo", echo)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range 8 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var out struct{ G, I int }
				err := c.Execute(t.Context(), "echo", map[string]int{"g": g, "i": i}, &out)
				if err != nil {
					assert.ErrorIs(t, err, qmp.ErrClosed)
					return
				}
				if out.G != g || out.I != i {
					t.Errorf("goroutine %d call %d got reply %+v", g, i, out)
					return
				}
			}
		})
	}
	for range 3 {
		wg.Go(func() {
			for {
				sub := c.Subscribe(qmp.EventFilter{Names: []string{"TICK"}, Buffer: 4})
				select {
				case <-sub.C:
				case <-stop:
					sub.Close()
					return
				}
				sub.Close()
			}
		})
	}
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			s.Emit("TICK", map[string]int{"i": i})
			if i%64 == 0 {
				_ = c.Execute(t.Context(), "echo", nil, nil)
			}
		}
	})
	_, err := s.WaitCall(t.Context(), "echo", 2000)
	require.NoError(t, err)
	s.CloseConns()
	<-c.Done()
	close(stop)
	wg.Wait()
	assert.ErrorIs(t, c.Err(), qmp.ErrClosed)
}

func TestClosedClient(t *testing.T) {
	cause := errors.New("nothing listens")
	c := qmp.Closed(cause)
	require.ErrorIs(t, c.Err(), qmp.ErrClosed)
	require.ErrorIs(t, c.Err(), cause)
	_, err := c.QueryStatus(context.Background())
	require.ErrorIs(t, err, qmp.ErrClosed)
	select {
	case <-c.Done():
	default:
		t.Fatal("Done not closed")
	}
	_, ok := <-c.SubscribeNames("STOP").C
	require.False(t, ok)
	require.NoError(t, c.Close())
}
