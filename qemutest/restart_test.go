package qemutest_test

import (
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
)

// A destination killed mid-migration fails it (the guest stays on the
// source); RestartDst gives a fresh destination on the same monitor, and
// the same source migrates to it.
func TestRestartDstAfterKill(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := qemutest.New(qemutest.Options{RAM: 64 << 20, Throughput: 32 << 20})
		defer p.Close()
		src, dst, err := p.Clients(t.Context())
		require.NoError(t, err)
		defer src.Close()
		cfg := engine.Config{Source: engine.Endpoint{Client: src}, Destination: engine.Endpoint{Client: dst}, URI: "tcp:127.0.0.1:0"}
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		p.KillDst()
		res, err := j.Wait(t.Context())
		require.Error(t, err)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.False(t, res.StateUnknown)
		assert.Equal(t, "running", p.SrcRunState())
		dst.Close()

		p.RestartDst()
		assert.False(t, p.DstGone())
		assert.Equal(t, "inmigrate", p.DstRunState())
		assert.Equal(t, uint64(134217728), p.Param(qemutest.Destination, "max-bandwidth"))
		dst2, err := p.Dst.Client(t.Context())
		require.NoError(t, err)
		defer dst2.Close()
		cfg.Destination.Client = dst2
		res2, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res2.Status)
		assert.Equal(t, "running", p.DstRunState())
		assert.Equal(t, "postmigrate", p.SrcRunState())
	})
}
