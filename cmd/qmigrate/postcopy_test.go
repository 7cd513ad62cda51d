package main

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
)

// A postcopy that lost a side: exit 1, and the result line says which
// ("state"), as the human text does.
func TestPostcopyLostStateExit1(t *testing.T) {
	for _, tc := range []struct {
		lost engine.LostState
		err  error
		want string
	}{
		{engine.GuestLost, engine.ErrGuestLost, "GUEST LOST"},
		{engine.PagesLost, engine.ErrPagesLost, "MISSING PAGES LOST"},
		{engine.PostcopyPaused, engine.ErrRecoveryFailed, "postcopy paused"},
	} {
		res := &engine.Result{Status: engine.StatusFailed, Lost: tc.lost,
			Err: &engine.Error{Phase: engine.PhaseSwitchover, Op: "postcopy", Err: fmt.Errorf("%w: %w", engine.ErrPostcopyFailed, tc.err)}}
		assert.Equal(t, exitFailed, exitCode(res))
		b, err := json.Marshal(jsonResultOf(res))
		require.NoError(t, err)
		var m map[string]any
		require.NoError(t, json.Unmarshal(b, &m))
		assert.Equal(t, string(tc.lost), m["state"])
		assert.Contains(t, fmt.Sprint(summary(res, nil)), tc.want)
	}
	b, err := json.Marshal(jsonResultOf(&engine.Result{Status: engine.StatusCompleted, Recoveries: 2, PostcopyStall: 1500e6}))
	require.NoError(t, err)
	assert.Contains(t, string(b), `"recoveries":2,"postcopy_stall_ms":1500`)
	assert.NotContains(t, string(b), `"state"`)
}

func TestListenFlag(t *testing.T) {
	o := migrateOptions{}
	require.NoError(t, parseFlags(o.flagSet(), []string{"--src", "unix:/a", "--dst", "unix:/b", "--uri", "tcp:10.0.0.2:4444", "--listen", "tcp:0.0.0.0:4444"}))
	cfg, err := o.config()
	require.NoError(t, err)
	assert.Equal(t, "tcp:0.0.0.0:4444", cfg.Listen)
	assert.Equal(t, "tcp:10.0.0.2:4444", cfg.URI)

	o = migrateOptions{}
	require.NoError(t, parseFlags(o.flagSet(), []string{"--src", "unix:/a", "--dst", "unix:/b", "--uri", "tcp:10.0.0.2:4444", "--listen", "unix:/x"}))
	_, err = o.config()
	assert.ErrorContains(t, err, "--listen")
}
