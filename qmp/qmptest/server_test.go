package qmptest_test

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

func newClient(t *testing.T, s *qmptest.Server, opts ...qmp.Option) *qmp.Client {
	t.Helper()
	c, err := s.Client(t.Context(), opts...)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestServerHandshakeAndCalls(t *testing.T) {
	s := qmptest.NewServer(qmptest.WithVersion(7, 2, 22))
	defer s.Close()
	s.Handle("query-status", qmptest.Return(map[string]any{"running": true, "status": "running"}))
	c := newClient(t, s)
	assert.Equal(t, qmp.Version{Major: 7, Minor: 2, Micro: 22, Package: "qmptest"}, c.Version())
	assert.True(t, c.OOB())
	require.Len(t, s.Handshakes(), 1)
	assert.JSONEq(t, `{"enable":["oob"]}`, string(s.Handshakes()[0]))

	st, err := c.QueryStatus(t.Context())
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status)

	err = c.Execute(t.Context(), "nope", map[string]int{"a": 1}, nil)
	var qe *qmp.Error
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "CommandNotFound", qe.Class)

	calls := s.Calls()
	require.Len(t, calls, 2)
	assert.Equal(t, "query-status", calls[0].Command)
	assert.Nil(t, calls[0].Args)
	assert.Equal(t, "nope", calls[1].Command)
	assert.JSONEq(t, `{"a":1}`, string(calls[1].Args))
	assert.Len(t, s.CallsOf("nope"), 1)
}

func TestServerErrors(t *testing.T) {
	s := qmptest.NewServer()
	defer s.Close()
	s.Handle("qmp-err", qmptest.Fail("DeviceNotFound", "Device 'x' not found"))
	s.Handle("go-err", func(json.RawMessage) (any, error) { return nil, errors.New("plain failure") })
	c := newClient(t, s)

	err := c.Execute(t.Context(), "qmp-err", nil, nil)
	assert.ErrorIs(t, err, &qmp.Error{Class: "DeviceNotFound", Desc: "Device 'x' not found"})
	err = c.Execute(t.Context(), "go-err", nil, nil)
	assert.ErrorIs(t, err, &qmp.Error{Class: "GenericError", Desc: "plain failure"})
}

func TestServerEmitFromHandler(t *testing.T) {
	s := qmptest.NewServer()
	defer s.Close()
	s.Handle("stop", func(json.RawMessage) (any, error) {
		s.Emit("STOP", nil)
		return nil, nil
	})
	c := newClient(t, s)
	sub := c.SubscribeNames("STOP")
	defer sub.Close()
	require.NoError(t, c.Stop(t.Context()))
	// The event was queued before the reply, so it is already delivered.
	select {
	case ev := <-sub.C:
		assert.Equal(t, "STOP", ev.Name)
		assert.False(t, ev.Time.IsZero())
	default:
		t.Fatal("STOP not delivered before the reply of stop")
	}
}

func TestServerNoReplyAndClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer()
		defer s.Close()
		s.Handle("hang", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
		s.Handle("die", func(json.RawMessage) (any, error) { return nil, qmptest.ErrCloseConn })
		c := newClient(t, s)

		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		start := time.Now()
		err := c.Execute(ctx, "hang", nil, nil)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, time.Minute, time.Since(start))

		err = c.Execute(t.Context(), "die", nil, nil)
		assert.ErrorIs(t, err, qmp.ErrClosed)
		<-c.Done()
		synctest.Wait()
		assert.Equal(t, 0, s.NumConns())
	})
}

func TestServerSerial(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer(qmptest.WithSerial())
		defer s.Close()
		var mu sync.Mutex
		var order []string
		record := func(name string, d time.Duration) qmptest.HandlerFunc {
			return qmptest.Delay(d, func(json.RawMessage) (any, error) {
				mu.Lock()
				order = append(order, name)
				mu.Unlock()
				return nil, nil
			})
		}
		s.Handle("slow", record("slow", time.Second))
		s.Handle("fast", record("fast", 0))
		s.Handle("migrate-pause", record("oob", 0))
		c := newClient(t, s)
		var wg sync.WaitGroup
		wg.Go(func() { assert.NoError(t, c.Execute(t.Context(), "slow", nil, nil)) })
		synctest.Wait()
		wg.Go(func() { assert.NoError(t, c.Execute(t.Context(), "fast", nil, nil)) })
		synctest.Wait()
		wg.Go(func() { assert.NoError(t, c.ExecuteOOB(t.Context(), "migrate-pause", nil, nil)) })
		wg.Wait()
		assert.Equal(t, []string{"oob", "slow", "fast"}, order)
		assert.True(t, s.CallsOf("migrate-pause")[0].OOB)
	})
}

// SetInBandGate holds in-band commands (a blocked main thread); exec-oob
// and events still go through, and the held commands are answered once the
// gate opens.
func TestServerInBandGate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer(qmptest.WithSerial())
		defer s.Close()
		open := make(chan struct{})
		s.SetInBandGate(func() { <-open })
		s.Handle("query-migrate", qmptest.Return(map[string]any{"status": "postcopy-paused"}))
		s.Handle("migrate-recover", qmptest.Return(nil))
		c := newClient(t, s)
		sub := c.SubscribeNames("MIGRATION")
		defer sub.Close()
		answered := make(chan error, 1)
		go func() { answered <- c.Execute(t.Context(), "query-migrate", nil, nil) }()
		synctest.Wait()
		require.NoError(t, c.ExecuteOOB(t.Context(), "migrate-recover", map[string]any{"uri": "tcp:0:1"}, nil))
		s.Emit("MIGRATION", map[string]any{"status": "postcopy-recover-setup"})
		ev := <-sub.C
		assert.Equal(t, "MIGRATION", ev.Name)
		synctest.Wait()
		select {
		case err := <-answered:
			t.Fatalf("in-band command answered through the gate: %v", err)
		default:
		}
		close(open)
		assert.NoError(t, <-answered)
	})
}

func TestServerOOBNotOffered(t *testing.T) {
	s := qmptest.NewServer(qmptest.WithCapabilities())
	defer s.Close()
	c := newClient(t, s)
	assert.False(t, c.OOB())
	assert.ErrorIs(t, c.ExecuteOOB(t.Context(), "migrate-pause", nil, nil), qmp.ErrOOBUnavailable)
	assert.Nil(t, s.Handshakes()[0])
}

func TestServerListenUnix(t *testing.T) {
	s := qmptest.NewServer()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	require.NoError(t, s.ListenUnix(path))
	s.Handle("query-version", qmptest.Return(map[string]any{
		"qemu": map[string]int{"major": 10, "minor": 0, "micro": 0}, "package": "qmptest"}))
	c, err := qmp.Dial(t.Context(), "unix", path)
	require.NoError(t, err)
	v, err := c.QueryVersion(t.Context())
	require.NoError(t, err)
	assert.Equal(t, 10, v.QEMU.Major)
	s.Close()
	<-c.Done()
	assert.ErrorIs(t, c.Err(), qmp.ErrClosed)
	_, err = qmp.Dial(t.Context(), "unix", path)
	assert.Error(t, err)
}

func TestServerRawReply(t *testing.T) {
	s := qmptest.NewServer()
	defer s.Close()
	s.Handle("garbage", qmptest.Return(qmptest.Raw("this is not json")))
	c := newClient(t, s)
	err := c.Execute(t.Context(), "garbage", nil, nil)
	assert.ErrorIs(t, err, qmp.ErrClosed)
	var pe *qmp.ProtocolError
	assert.ErrorAs(t, c.Err(), &pe)
}

func TestServerCloseConnsAndReconnect(t *testing.T) {
	s := qmptest.NewServer()
	defer s.Close()
	s.Handle("query-status", qmptest.Return(map[string]any{"status": "running", "running": true}))
	c1 := newClient(t, s)
	s.CloseConns()
	<-c1.Done()
	c2 := newClient(t, s)
	_, err := c2.QueryStatus(t.Context())
	assert.NoError(t, err)
}

func TestServerWaitCall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer()
		defer s.Close()
		s.Handle("migrate", qmptest.Return(nil))
		c := newClient(t, s)
		go func() {
			time.Sleep(time.Second)
			_ = c.Migrate(t.Context(), qmp.MigrateArgs{URI: "unix:/a"})
			_ = c.Migrate(t.Context(), qmp.MigrateArgs{URI: "unix:/b"})
		}()
		call, err := s.WaitCall(t.Context(), "migrate", 2)
		require.NoError(t, err)
		assert.JSONEq(t, `{"uri":"unix:/b"}`, string(call.Args))
		call, err = s.WaitCall(t.Context(), "migrate", 1)
		require.NoError(t, err)
		assert.JSONEq(t, `{"uri":"unix:/a"}`, string(call.Args))

		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		_, err = s.WaitCall(ctx, "migrate", 3)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
	})
}

func TestServerCloseDoesNotWaitForBlockedHandlers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := qmptest.NewServer(qmptest.WithSerial())
		release := make(chan struct{})
		s.Handle("block", func(json.RawMessage) (any, error) { <-release; return nil, nil })
		c := newClient(t, s)
		go func() { _ = c.Execute(t.Context(), "block", nil, nil) }()
		go func() { _ = c.Execute(t.Context(), "block", nil, nil) }()
		_, err := s.WaitCall(t.Context(), "block", 2)
		require.NoError(t, err)
		s.Close()
		<-c.Done()
		close(release)
	})
}
