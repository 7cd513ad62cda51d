package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
)

// What the engine returns when a QEMU stops answering (see
// engine/unresponsive_test.go): before the switchover, rolled back, the
// guest on the source; after it, nothing rolled back and the state unknown.
func unresponsiveResults() map[string]*engine.Result {
	budget := &engine.Error{Phase: engine.PhaseConverge, Side: engine.SideSource, Op: "query-migrate",
		Err: fmt.Errorf("%w: budget 3s exhausted at 3.2s: the source QEMU's monitor did not answer query-migrate within the budget (waited 2.2s)", engine.ErrAborted)}
	limit := &engine.Error{Phase: engine.PhaseConverge, Side: engine.SideSource, Op: "query-migrate",
		Err: fmt.Errorf("%w: the source QEMU's monitor did not answer query-migrate within 30s (its process stopped or its main loop stuck?)", engine.ErrUnresponsive)}
	late := &engine.Error{Phase: engine.PhaseSwitchover, Side: engine.SideSource, Op: "query-migrate",
		Err: fmt.Errorf("%w: the source QEMU's monitor did not answer query-migrate within 30s (its process stopped or its main loop stuck?); the switchover had begun, so nothing is rolled back: the migration's state is unknown, check both QEMUs", engine.ErrUnresponsive)}
	rolledBack := func(err error) *engine.Result {
		return &engine.Result{Status: engine.StatusFailed, Total: 5200 * time.Millisecond, Err: err,
			Undone:     []string{"destination: yank migration: the stream is cut"},
			UndoErrors: []string{"source: resume guest: not attempted: the source QEMU's monitor stopped answering"}}
	}
	return map[string]*engine.Result{
		"budget": rolledBack(budget),
		"limit":  rolledBack(limit),
		"after switchover": {Status: engine.StatusFailed, Total: 32 * time.Second, Err: late, StateUnknown: true,
			UndoErrors: []string{"rollback not attempted: a monitor stopped answering after the switchover began: the migration's state is unknown, check both QEMUs"}},
	}
}

// A QEMU that stopped answering is a failure (exit 1), never bad input; the
// message names the side and that its monitor stopped answering; with
// --json the result line says failed; and the summary never claims where
// the guest runs when the engine could not tell.
func TestUnresponsiveQEMUExit1(t *testing.T) {
	for name, res := range unresponsiveResults() {
		t.Run(name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := finish(&plainRenderer{w: &stdout, seen: true}, &stderr, resultOf(res, res.Err), nil)
			assert.Equal(t, exitFailed, code)
			assert.Contains(t, stderr.String(), "qmigrate: engine: ")
			assert.Contains(t, stderr.String(), "source QEMU's monitor did not answer query-migrate")
			if res.StateUnknown {
				assert.Contains(t, stdout.String(), "where the guest runs is unknown")
				assert.NotContains(t, stdout.String(), "the guest runs on the source")
			} else {
				assert.Contains(t, stdout.String(), "the guest runs on the source")
			}

			stdout.Reset()
			stderr.Reset()
			code = finish(newJSONRenderer(&stdout), &stderr, resultOf(res, res.Err), nil)
			assert.Equal(t, exitFailed, code)
			lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
			require.Len(t, lines, 1)
			var m map[string]any
			require.NoError(t, json.Unmarshal([]byte(lines[0]), &m))
			assert.Equal(t, "result", m["type"])
			assert.Equal(t, "failed", m["status"])
			assert.Contains(t, m["error"], "monitor did not answer")
			if res.StateUnknown {
				assert.Equal(t, true, m["state_unknown"])
			} else {
				assert.NotContains(t, m, "state_unknown")
			}
			assert.True(t, errors.Is(res.Err, engine.ErrUnresponsive) || errors.Is(res.Err, engine.ErrAborted))
		})
	}
}
