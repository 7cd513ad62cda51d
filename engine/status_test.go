package engine_test

import (
	"strings"
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// Inspect reads a migration a dead process left, with its journal, and
// sends nothing but queries.
func TestInspectReadOnly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 1 << 30, DirtyRate: 60 << 20})
		cfg.Bandwidth = 32 << 20
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true}}
		cfg = crash(t, p, cfg, 2)
		nSrc, nDst := len(p.Src.Calls()), len(p.Dst.Calls())

		st, err := engine.Inspect(t.Context(), engine.InspectConfig{Source: cfg.Source, Destination: cfg.Destination})
		require.NoError(t, err)
		assert.Equal(t, "running", st.Source.RunState)
		assert.Equal(t, qmp.StatusActive, st.Source.Migration.Status)
		require.Len(t, st.Source.Journals, 1)
		j := st.Source.Journals[0]
		assert.True(t, j.SourceRunning)
		assert.Equal(t, []string{j.ID}, st.Source.Objects)
		assert.True(t, strings.HasSuffix(j.ID, j.Token))
		assert.False(t, j.Capabilities["events"], "the journal has the capabilities from before")
		require.NotNil(t, st.Destination)
		assert.Equal(t, "inmigrate", st.Destination.RunState)
		assert.Len(t, st.Destination.Journals, 1)
		assert.True(t, st.Storage.Empty())

		// Only the source.
		st, err = engine.Inspect(t.Context(), engine.InspectConfig{Source: cfg.Source})
		require.NoError(t, err)
		assert.Nil(t, st.Destination)

		for _, c := range append(p.Src.Calls()[nSrc:], p.Dst.Calls()[nDst:]...) {
			assert.True(t, strings.HasPrefix(c.Command, "query-") || c.Command == "qom-list" || c.Command == "qom-get", c.Command)
		}
	})
}
