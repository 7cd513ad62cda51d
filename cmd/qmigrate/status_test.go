package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// readOnly asserts that every command a QEMU received is a query, qom-list
// or qom-get (and the greeting's qmp_capabilities).
func readOnly(t *testing.T, side string, calls []qmptest.Call) {
	t.Helper()
	for _, c := range calls {
		ok := strings.HasPrefix(c.Command, "query-") || c.Command == "qom-list" || c.Command == "qom-get" || c.Command == "qmp_capabilities"
		assert.True(t, ok, "%s: status sent %s %s", side, c.Command, c.Args)
	}
}

// status reads a migration a dead process left in flight, and its
// journal, in both forms, sending nothing but queries.
func TestStatusInFlightReadOnly(t *testing.T) {
	p, flags := fakePair(t, qemutest.Options{DirtyRate: 60 << 20})
	crashMidway(t, p, flags[5])
	nSrc, nDst := len(p.Src.Calls()), len(p.Dst.Calls())
	addrs := flags[:4] // --src, --dst

	code, stdout, stderr := runCLI(t, append([]string{"status", "--json"}, addrs...)...)
	require.Equal(t, exitOK, code, stderr)
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(stdout), "\n") {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m), l)
		lines = append(lines, m)
	}
	require.Len(t, lines, 4, stdout)
	src, dst, storage, res := lines[0], lines[1], lines[2], lines[3]
	assert.Equal(t, "qemu", src["type"])
	assert.Equal(t, "source", src["side"])
	assert.Equal(t, "running", src["run_state"])
	assert.Equal(t, "active", src["migration_status"])
	assert.Positive(t, src["transferred_bytes"])
	assert.Equal(t, float64(32<<20), src["max_bandwidth_bps"])
	assert.Contains(t, src["capabilities"], "events")
	journals := src["journals"].([]any)
	require.Len(t, journals, 1)
	j := journals[0].(map[string]any)
	assert.Contains(t, src["objects"], j["id"])
	assert.NotEmpty(t, j["token"])
	assert.NotEmpty(t, j["started"])
	assert.Equal(t, true, j["source_running"])
	assert.Equal(t, "destination", dst["side"])
	assert.Equal(t, "inmigrate", dst["run_state"])
	assert.Equal(t, "storage", storage["type"])
	assert.Equal(t, []any{}, storage["jobs"])
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "ok", res["status"])
	assert.Equal(t, true, res["in_flight"])
	assert.Equal(t, true, res["leftovers"])
	assert.Equal(t, j["token"], res["token"])

	code, stdout, stderr = runCLI(t, append([]string{"status"}, addrs...)...)
	require.Equal(t, exitOK, code, stderr)
	for _, want := range []string{"SOURCE", "DESTINATION", "run state", "running", "inmigrate", "migration", "active",
		"qmigrate objects", "qmigrate-journal-", "token " + j["token"].(string), "'qmigrate adopt' takes it over"} {
		assert.Contains(t, stdout, want)
	}
	t.Log("\n" + stdout)

	readOnly(t, "source", p.Src.Calls()[nSrc:])
	readOnly(t, "destination", p.Dst.Calls()[nDst:])
	assert.Equal(t, "active", string(p.Status()), "the migration goes on")
}

// Only --src, nothing of qmigrate's: one qemu line, the verdict says so.
func TestStatusSourceOnly(t *testing.T) {
	p, flags := fakePair(t, qemutest.Options{})
	code, stdout, stderr := runCLI(t, "status", flags[0], flags[1])
	require.Equal(t, exitOK, code, stderr)
	assert.Contains(t, stdout, "SOURCE")
	assert.NotContains(t, stdout, "DESTINATION")
	assert.Contains(t, stdout, "nothing of qmigrate's on these QEMUs")
	readOnly(t, "source", p.Src.Calls())
	assert.Empty(t, p.Dst.Calls())

	code, stdout, _ = runCLI(t, "status", "--json", flags[0], flags[1])
	require.Equal(t, exitOK, code)
	res := lastJSON(t, stdout)
	assert.Equal(t, false, res["in_flight"])
	assert.Equal(t, false, res["leftovers"])
}

// Bad usage and an unreachable QEMU exit 2, naming the flag.
func TestStatusExit2(t *testing.T) {
	code, _, stderr := runCLI(t, "status")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "--src is required")
	code, stdout, stderr := runCLI(t, "status", "--json", "--src", "unix:/nonexistent/qm.sock")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "--src unix:/nonexistent/qm.sock")
	res := lastJSON(t, stdout)
	assert.Equal(t, "error", res["status"])
	code, stdout, _ = runCLI(t, "help", "status")
	assert.Equal(t, exitOK, code)
	assert.Contains(t, stdout, "changing nothing")
}
