package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// TestEngineSourceStopped stops the source QEMU (SIGSTOP) in the middle of
// a converging migration with a budget of a few seconds: Migrate must come
// back within the budget and a few seconds with the budget exhausted
// (ErrAborted) naming the source's monitor, although the source answers
// nothing. The rollback cannot reach the source either: it holds the
// destination and cuts the migration stream there (yank), so the
// destination exits and the source's migration fails as soon as the source
// runs again. Then (SIGCONT) the source's migration is over (failed: the
// rollback, not the test, ended it) and the guest runs on the source,
// intact.
//
// The CLI subtest does the same through qmigrate migrate --timeout --json:
// exit 1, the monitor named on stderr, a result line with status failed.
func TestEngineSourceStopped(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	t.Run("Engine", func(t *testing.T) { testEngineSourceStopped(t, q) })
	t.Run("CLI", func(t *testing.T) { testCLISourceStopped(t, q, buildCLI(t)) })
}

func testEngineSourceStopped(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	// Whatever happens, never leave a stopped QEMU behind.
	t.Cleanup(func() { _ = syscall.Kill(src.Pid(), syscall.SIGCONT) })
	sock := filepath.Join(dst.Dir(), "mig.sock")
	cfg := nonConverging(t, src, dst) // 20 MB/s against a 500 MB/s guest, policy qemu
	const budget = 4 * time.Second
	cfg.Strategy.Limits.Budget = budget
	var stoppedAt time.Duration
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventStats && stoppedAt == 0 && e.Stats.Status == "active" && e.Elapsed >= 1500*time.Millisecond {
			require.NoError(t, syscall.Kill(src.Pid(), syscall.SIGSTOP))
			stoppedAt = e.Elapsed
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.Error(t, err)
	t.Logf("stopped at %v, returned after %v: %v\nundone %q\nundo errors %q", stoppedAt, res.Total, err, res.Undone, res.UndoErrors)
	require.NotZero(t, stoppedAt, "the source was stopped mid-converge")
	assert.ErrorIs(t, err, engine.ErrAborted)
	assert.NotErrorIs(t, err, engine.ErrBadInput)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, engine.SideSource, ee.Side)
	assert.Equal(t, "query-migrate", ee.Op)
	assert.Contains(t, err.Error(), "the source QEMU's monitor did not answer query-migrate within the budget")
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.False(t, res.StateUnknown)
	// Budget + poll interval, then a 2s probe of the source in the rollback
	// and the destination's exit.
	assert.Less(t, res.Total, budget+6*time.Second, "returned within the budget and a few seconds")
	assert.Contains(t, strings.Join(res.UndoErrors, "\n"), "source: cancel migration: ")
	assert.Contains(t, strings.Join(res.Undone, "\n"), "destination: yank migration")

	// The destination's stream was cut: it exits (exit-on-error).
	select {
	case <-dst.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the destination did not exit after its migration stream was cut")
	}
	_, serr := os.Stat(sock)
	assert.True(t, os.IsNotExist(serr), "migration socket removed once the destination exited")

	// SIGCONT: the source's migration fails on the cut stream; QEMU keeps
	// the guest running.
	require.NoError(t, syscall.Kill(src.Pid(), syscall.SIGCONT))
	info := waitSourceMigrationEnded(t, src)
	t.Logf("source after SIGCONT: %s (%s)", info.Status, info.ErrorDesc)
	assert.Equal(t, qmp.StatusFailed, info.Status, "the rollback's cut ended the source's migration")
	sourceIntact(t, src)
}

// waitSourceMigrationEnded polls the source's migration until it is
// terminal.
func waitSourceMigrationEnded(t *testing.T, src *qemulab.Instance) *qmp.MigrationInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	for {
		info, err := src.QMP.QueryMigrate(ctx)
		require.NoError(t, err)
		if info.Status.Terminal() {
			return info
		}
		select {
		case <-ctx.Done():
			require.NoError(t, errors.Join(ctx.Err(), errors.New("source migration still "+string(info.Status))))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func testCLISourceStopped(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 500e6, true)
	t.Cleanup(func() { _ = syscall.Kill(src.Pid(), syscall.SIGCONT) })
	uri := "unix:" + filepath.Join(shortTempDir(t), "mig.sock")
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst", "unix:"+dstSock,
		"--uri", uri, "--bandwidth", "20MB", "--policy", "qemu", "--timeout", "4s")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	pipe, err := cmd.StdoutPipe()
	require.NoError(t, err)
	start := time.Now()
	require.NoError(t, cmd.Start())
	var lines []string
	var stoppedAt time.Time
	sc := bufio.NewScanner(pipe)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), sc.Text())
		if stoppedAt.IsZero() && m["type"] == "stats" && m["status"] == "active" && m["elapsed_ms"].(float64) >= 1500 {
			require.NoError(t, syscall.Kill(src.Pid(), syscall.SIGSTOP))
			stoppedAt = time.Now()
		}
	}
	require.NoError(t, sc.Err())
	err = cmd.Wait()
	took := time.Since(start)
	t.Logf("exit after %v (stopped %v in): %v\nstderr: %s", took, stoppedAt.Sub(start), err, stderr.String())
	require.False(t, stoppedAt.IsZero(), "no active stats line seen: %v", lines)
	assert.Equal(t, 1, exitCode(t, err), "failed, not bad input")
	assert.Less(t, took, 4*time.Second+7*time.Second, "within --timeout and a few seconds")
	assert.Contains(t, stderr.String(), "the source QEMU's monitor did not answer query-migrate")
	var res map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &res))
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "failed", res["status"])
	assert.Contains(t, res["error"], "monitor did not answer")
	assert.NotContains(t, res, "state_unknown")

	select {
	case <-dst.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the destination did not exit after its migration stream was cut")
	}
	require.NoError(t, syscall.Kill(src.Pid(), syscall.SIGCONT))
	info := waitSourceMigrationEnded(t, src)
	t.Logf("source after SIGCONT: %s (%s)", info.Status, info.ErrorDesc)
	assert.Equal(t, qmp.StatusFailed, info.Status)
	sourceIntact(t, src)
}
