package main

import (
	"bytes"
	"context"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// syncBuffer is a bytes.Buffer safe for the signal goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestSignalContextFirstCancelsLaterOnesOnlyReport(t *testing.T) {
	var stderr syncBuffer
	ctx, stop := signalContext(context.Background(), &stderr)
	defer stop()

	require.NoError(t, syscall.Kill(syscall.Getpid(), syscall.SIGINT))
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("SIGINT did not cancel the context")
	}
	assert.Contains(t, stderr.String(), "cancelling; rolling back")

	require.NoError(t, syscall.Kill(syscall.Getpid(), syscall.SIGTERM))
	require.Eventually(t, func() bool {
		return bytes.Contains([]byte(stderr.String()), []byte("still rolling back"))
	}, 5*time.Second, 10*time.Millisecond)
}

func TestSignalContextStopCancels(t *testing.T) {
	ctx, stop := signalContext(context.Background(), &syncBuffer{})
	require.NoError(t, ctx.Err())
	stop()
	assert.Error(t, ctx.Err())
}
