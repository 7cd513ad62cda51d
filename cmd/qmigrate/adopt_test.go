package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// fakePair is a fake QEMU pair listening on unix sockets, and the CLI's
// address flags for it.
func fakePair(t *testing.T, opt qemutest.Options) (p *qemutest.Pair, flags []string) {
	t.Helper()
	p = qemutest.New(opt)
	t.Cleanup(p.Close)
	dir := t.TempDir()
	src, dst, err := p.ListenUnix(dir)
	require.NoError(t, err)
	return p, []string{"--src", "unix:" + src, "--dst", "unix:" + dst, "--uri", "unix:" + filepath.Join(dir, "mig.sock")}
}

// crashMidway starts a migration that does not converge (its bandwidth
// under the guest's dirty rate) through clients of its own, and "kills"
// its process once RAM is being sent: the connections close and it
// changes nothing more, as after a SIGKILL.
func crashMidway(t *testing.T, p *qemutest.Pair, uri string) {
	t.Helper()
	src, dst, err := p.Clients(t.Context())
	require.NoError(t, err)
	j, err := engine.Start(context.Background(), engine.Config{
		Source: engine.Endpoint{Client: src}, Destination: engine.Endpoint{Client: dst}, URI: uri,
		Bandwidth: 32 << 20,
		Strategy:  strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true}},
	})
	require.NoError(t, err)
	sub := j.Subscribe()
	for ev := range sub.C {
		if ev.Kind == engine.EventStats && ev.Stats.Status == "active" && ev.Stats.TransferredBytes > 0 {
			break
		}
	}
	sub.Close()
	src.Close()
	dst.Close()
	<-j.Done()
	require.Equal(t, qmp.StatusActive, p.Status(), "the migration goes on without its process")
}

// mutating are the commands that change a QEMU.
var mutating = []string{"migrate-set-capabilities", "migrate-set-parameters", "object-add", "object-del",
	"migrate_cancel", "migrate", "migrate-incoming", "cont", "stop", "block-job-cancel", "nbd-server-stop", "block-export-del", "blockdev-del"}

// Nothing in flight: adopt exits 2 with the result line, and touches
// nothing.
func TestAdoptNothingExit2(t *testing.T) {
	p, flags := fakePair(t, qemutest.Options{})
	code, stdout, stderr := runCLI(t, append([]string{"adopt", "--json"}, flags...)...)
	assert.Equal(t, exitUsage, code, stderr)
	res := lastJSON(t, stdout)
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "failed", res["status"])
	assert.Contains(t, res["error"], "nothing to adopt")
	assert.Contains(t, stderr, "nothing to adopt")
	for _, cmd := range mutating {
		assert.Empty(t, p.Src.CallsOf(cmd), cmd)
		assert.Empty(t, p.Dst.CallsOf(cmd), cmd)
	}
	code, stdout, _ = runCLI(t, append([]string{"adopt"}, flags...)...)
	assert.Equal(t, exitUsage, code)
	assert.Empty(t, stdout, "nothing started: the error on stderr says it")
}

// A migration whose process died goes on under adopt and completes, with
// migrate's JSON lines, exit 0, and nothing of qmigrate's left.
func TestAdoptCompletes(t *testing.T) {
	p, flags := fakePair(t, qemutest.Options{DirtyRate: 60 << 20})
	crashMidway(t, p, flags[5])
	require.NotEmpty(t, p.Objects(qemutest.Source), "the journal is on the source")

	code, stdout, stderr := runCLI(t, append([]string{"adopt", "--json", "--policy", "qemu"}, flags...)...)
	require.Equal(t, exitOK, code, stderr)
	var types []string
	for _, l := range strings.Split(strings.TrimSpace(stdout), "\n") {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m), l)
		types = append(types, m["type"].(string))
	}
	assert.Contains(t, types, "phase")
	assert.Contains(t, types, "stats")
	res := lastJSON(t, stdout)
	assert.Equal(t, "completed", res["status"])
	assert.Equal(t, "running", p.DstRunState())
	assert.Empty(t, p.Objects(qemutest.Source))
	assert.Empty(t, p.Objects(qemutest.Destination))
	assert.Contains(t, stderr, "adopting the migration")
}

// Adopt with --timeout too short for the migration aborts it: rolled back,
// exit 1, the source's parameters back to the journal's.
func TestAdoptRollsBackExit1(t *testing.T) {
	p, flags := fakePair(t, qemutest.Options{DirtyRate: 60 << 20})
	src, err := p.Src.Client(t.Context())
	require.NoError(t, err)
	require.NoError(t, src.MigrateSetParameters(t.Context(), qmp.MigrationParameters{DowntimeLimit: qmp.Ptr(uint64(5000))}))
	src.Close()
	crashMidway(t, p, flags[5])

	// The cap kept: it cannot converge, and the policy aborts.
	code, stdout, stderr := runCLI(t, append([]string{"adopt", "--json", "--policy", "qemu", "--no-auto-converge",
		"--bandwidth", "32MiB", "--timeout", "1s"}, flags...)...)
	require.Equal(t, exitFailed, code, stderr)
	res := lastJSON(t, stdout)
	assert.NotEqual(t, "completed", res["status"])
	assert.NotEmpty(t, res["undone"])
	assert.Equal(t, "running", p.SrcRunState())
	assert.Equal(t, uint64(5000), p.Param(qemutest.Source, "downtime-limit"))
	assert.Empty(t, p.Objects(qemutest.Source))
}

func TestAdoptHelp(t *testing.T) {
	for _, args := range [][]string{{"adopt", "--help"}, {"help", "adopt"}} {
		code, stdout, _ := runCLI(t, args...)
		assert.Equal(t, exitOK, code)
		assert.Contains(t, stdout, "Usage: qmigrate adopt")
		assert.Contains(t, stdout, "--copy-storage")
		assert.Contains(t, stdout, "nothing to adopt")
	}
	code, _, stderr := runCLI(t, "adopt", "--src", "unix:/a")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "qmigrate adopt: --dst is required")
	assert.Contains(t, stderr, "qmigrate adopt --help")
}
