package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// TestCLIAdopt kills "qmigrate migrate" with SIGKILL mid-migration in each
// phase it can be caught in, then runs "qmigrate adopt" with the same
// flags: the migration completes with the guest intact on the destination,
// or is rolled back with the guest intact on the source, and nothing of
// qmigrate's is left on either QEMU: after a rollback, the capabilities and
// parameters are those from before the first process started (non-default
// ones set by the test), no throttle, no TLS objects, no exports, no jobs,
// no journal.
func TestCLIAdopt(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	bin := buildCLI(t)

	t.Run("NothingInFlight", func(t *testing.T) { testAdoptNothing(t, q, bin) })
	t.Run("ActiveFirstPassTLS", func(t *testing.T) { testAdoptFirstPass(t, q, bin) })
	t.Run("ActiveAfterThrottle", func(t *testing.T) { testAdoptAfterThrottle(t, q, bin) })
	t.Run("CopyStorageActive", func(t *testing.T) { testAdoptStorage(t, q, bin, "active") })
	t.Run("CopyStorageSwitchover", func(t *testing.T) { testAdoptStorage(t, q, bin, "switchover") })
	t.Run("PostcopyActive", func(t *testing.T) { testAdoptPostcopy(t, q, bin) })
	t.Run("PostcopyPaused", func(t *testing.T) { testAdoptPostcopyPaused(t, q, bin) })
}

// before is what a QEMU's migration settings were before the first
// process started.
type before struct {
	caps   map[string]bool
	params *qmp.MigrationParameters
}

// setNonDefault gives a QEMU non-default parameters (as a previous user
// could have left them) and returns its settings.
func setNonDefault(t *testing.T, inst *qemulab.Instance) before {
	t.Helper()
	ctx := tbTimeout(t, 10*time.Second)
	require.NoError(t, inst.QMP.MigrateSetParameters(ctx, qmp.MigrationParameters{
		DowntimeLimit: qmp.Ptr(uint64(5000)), MaxBandwidth: qmp.Ptr(uint64(77e6))}))
	return settings(t, inst)
}

func settings(t *testing.T, inst *qemulab.Instance) before {
	t.Helper()
	ctx := tbTimeout(t, 10*time.Second)
	caps, err := inst.QMP.QueryMigrateCapabilities(ctx)
	require.NoError(t, err)
	params, err := inst.QMP.QueryMigrateParameters(ctx)
	require.NoError(t, err)
	return before{caps, params}
}

// killMidway runs "qmigrate migrate" with args and kills it with SIGKILL
// at the first --json line at returns true for. It returns the lines read.
func killMidway(t *testing.T, bin string, args []string, at func(m map[string]any) bool) []map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"migrate", "--json"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	pipe, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	var lines []map[string]any
	killed := false
	sc := bufio.NewScanner(pipe)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), sc.Text())
		lines = append(lines, m)
		if !killed && at(m) {
			require.NoError(t, cmd.Process.Kill())
			killed = true
			t.Logf("SIGKILL at %s", sc.Text())
		}
	}
	_ = cmd.Wait()
	t.Logf("first process's stderr: %s", stderr.String())
	require.True(t, killed, "the moment to kill never came: %v", lines)
	return lines
}

// adopt runs "qmigrate adopt" with args; it returns the exit code and the
// result line.
func adopt(t *testing.T, bin string, args []string) (int, map[string]any, []map[string]any) {
	t.Helper()
	code, lines, _ := runCLI(t, 3*time.Minute, bin, append([]string{"adopt", "--json"}, args...)...)
	res := lines[len(lines)-1]
	require.Equal(t, "result", res["type"])
	t.Logf("adopt: exit %d, %v", code, res)
	return code, res, lines
}

// noneLeft checks that nothing of qmigrate's is on a live QEMU: no object
// with its prefix (journal, TLS), no mirror job, node or export of its, no
// block job at all, no throttle, tls-creds empty.
func noneLeft(t *testing.T, side string, inst *qemulab.Instance) {
	t.Helper()
	if inst.Exited() {
		t.Logf("%s: exited (its incoming migration ended)", side)
		return
	}
	ctx := tbTimeout(t, 10*time.Second)
	st, err := engine.Inspect(ctx, engine.InspectConfig{Source: engine.Endpoint{Client: inst.QMP}})
	require.NoError(t, err)
	assert.Empty(t, st.Source.Objects, "%s: qmigrate's objects left", side)
	assert.True(t, st.Storage.Empty(), "%s: storage left: %+v", side, st.Storage)
	jobs, err := inst.QMP.QueryBlockJobs(ctx)
	require.NoError(t, err)
	assert.Empty(t, jobs, "%s: block jobs left", side)
	if m := st.Source.Migration; m != nil {
		assert.Zero(t, m.CPUThrottlePercentage, "%s: throttle left", side)
	}
	if p := st.Source.Parameters; p != nil && p.TLSCreds != nil {
		assert.Empty(t, *p.TLSCreds, "%s: tls-creds left", side)
	}
	var exports []map[string]any
	if err := inst.QMP.Execute(ctx, "query-block-exports", nil, &exports); err == nil {
		for _, e := range exports {
			assert.NotContains(t, e["id"], "qmigrate-", "%s: export left", side)
		}
	}
}

// rolledBack checks the guest runs on the source, intact, and the
// source's settings are what they were before the first process.
func rolledBack(t *testing.T, src *qemulab.Instance, was before) {
	t.Helper()
	ctx := tbTimeout(t, 90*time.Second)
	st, err := src.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status, "the guest runs on the source")
	now := settings(t, src)
	assert.Equal(t, was.caps, now.caps, "source capabilities as before")
	assert.Equal(t, was.params, now.params, "source parameters as before")
	assert.Equal(t, uint64(5000), *now.params.DowntimeLimit)
	noneLeft(t, "source", src)
	_, err = qemulab.CheckSweep(ctx, nil, src.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "the source's guest intact")
}

// completed checks the guest runs on the destination, intact, and nothing
// of qmigrate's is left on either side.
func completed(t *testing.T, src, dst *qemulab.Instance) {
	t.Helper()
	noneLeft(t, "source", src)
	noneLeft(t, "destination", dst)
	ctx := tbTimeout(t, 90*time.Second)
	_, err := qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "the destination's guest intact")
}

func isStats(status string) func(m map[string]any) bool {
	return func(m map[string]any) bool {
		return m["type"] == "stats" && m["status"] == status && m["transferred_bytes"].(float64) > 0
	}
}

// Nothing in flight: exit 2, nothing touched.
func testAdoptNothing(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 4e6, true)
	was, wasDst := setNonDefault(t, src), settings(t, dst)
	code, res, _ := adopt(t, bin, []string{"--src", "unix:" + srcSock, "--dst", "unix:" + dstSock,
		"--uri", "unix:" + filepath.Join(shortTempDir(t), "mig.sock")})
	assert.Equal(t, 2, code)
	assert.Equal(t, "failed", res["status"])
	assert.Contains(t, res["error"], "nothing to adopt")
	assert.Equal(t, was, settings(t, src))
	assert.Equal(t, wasDst, settings(t, dst))
	ctx := tbTimeout(t, 10*time.Second)
	st, err := dst.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "inmigrate", st.Status)
	m, err := dst.QMP.QueryMigrate(ctx)
	require.NoError(t, err)
	assert.Equal(t, qmp.StatusNone, m.Status, "the destination does not listen")
}

// Killed at the first pass of a migration over TLS; adopt completes it.
func testAdoptFirstPass(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 4e6, true)
	setNonDefault(t, src)
	pki := filepath.Join(t.TempDir(), "pki")
	require.NoError(t, qemulab.WriteX509Creds(pki, "dst.qmigrate.test"))
	args := []string{"--src", "unix:" + srcSock, "--dst", "unix:" + dstSock, "--uri", "unix:" + filepath.Join(shortTempDir(t), "mig.sock"),
		"--bandwidth", "32MiB", "--timeout", "2m", "--tls-x509", pki, "--tls-hostname", "dst.qmigrate.test"}
	killMidway(t, bin, args, isStats("active"))
	code, res, _ := adopt(t, bin, args)
	require.Equal(t, 0, code, "%v", res)
	assert.Equal(t, "completed", res["status"])
	completed(t, src, dst)
	assertNoTLSLeft(t, "source", src)
	assertNoTLSLeft(t, "destination", dst)
}

// Killed after the policy throttled the guest; adopt completes it or rolls
// it back (throttle gone either way).
func testAdoptAfterThrottle(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 300e6, true)
	was := setNonDefault(t, src)
	args := []string{"--src", "unix:" + srcSock, "--dst", "unix:" + dstSock, "--uri", "unix:" + filepath.Join(shortTempDir(t), "mig.sock"),
		"--bandwidth", "40MB", "--max-downtime", "1s", "--timeout", "60s"}
	killMidway(t, bin, args, func(m map[string]any) bool { return m["type"] == "decision" && m["action"] == "set-throttle" })
	code, res, _ := adopt(t, bin, args)
	switch code {
	case 0:
		completed(t, src, dst)
	case 1:
		assert.NotEqual(t, "completed", res["status"])
		rolledBack(t, src, was)
		noneLeft(t, "destination", dst)
	default:
		t.Fatalf("adopt exit %d: %v", code, res)
	}
}

// Killed with its disk mirrored (during pre-copy, or at the switchover
// while the mirrors finish): the mirrors died with the process, adopt
// rolls it back.
func testAdoptStorage(t *testing.T, q *qemulab.QEMU, bin, at string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 4e6, true)
	was := setNonDefault(t, src)
	dir := shortTempDir(t)
	args := []string{"--src", "unix:" + srcSock, "--dst", "unix:" + dstSock, "--uri", "unix:" + filepath.Join(dir, "mig.sock"),
		"--disk", "sweep0", "--nbd", "unix:" + filepath.Join(dir, "nbd.sock"), "--bandwidth", "64MiB"}
	when := isStats("active")
	if at == "switchover" {
		when = func(m map[string]any) bool {
			return (m["type"] == "phase" && m["phase"] == "switchover") || (m["type"] == "stats" && m["status"] == "pre-switchover")
		}
	}
	lines := killMidway(t, bin, args, when)
	if lines[len(lines)-1]["type"] == "result" {
		t.Logf("the first process finished before the kill landed: %v", lines[len(lines)-1])
	}
	code, res, _ := adopt(t, bin, args)
	switch code {
	case 1:
		assert.Contains(t, res["error"], "abandoned")
		rolledBack(t, src, was)
		noneLeft(t, "destination", dst)
	case 0:
		// Killed after the mirrors finished: adopt saw it through.
		completed(t, src, dst)
	default:
		t.Fatalf("adopt exit %d: %v", code, res)
	}
}

// Killed in postcopy (a busy guest, postcopy permitted, a short budget):
// adopt sees it through.
func testAdoptPostcopy(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 500e6, true)
	setNonDefault(t, src)
	args := []string{"--src", "unix:" + srcSock, "--dst", "unix:" + dstSock, "--uri", "unix:" + filepath.Join(shortTempDir(t), "mig.sock"),
		"--bandwidth", "20MB", "--allow-postcopy", "--no-auto-converge", "--timeout", "3s"}
	killMidway(t, bin, args, func(m map[string]any) bool {
		return m["type"] == "stats" && strings.HasPrefix(m["status"].(string), "postcopy")
	})
	code, res, _ := adopt(t, bin, args)
	require.Equal(t, 0, code, "%v", res)
	completed(t, src, dst)
}

// Postcopy's link black-holed through the test's proxy; the CLI, having
// paused both sides, is killed as it starts its first recovery attempt.
// The link comes back, and adopt recovers the paused postcopy and
// completes it, the guest intact on the destination.
func testAdoptPostcopyPaused(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 500e6, true)
	setNonDefault(t, src)
	p := newLinkProxy(t)
	args := []string{"--src", "unix:" + srcSock, "--dst", "unix:" + dstSock, "--uri", "tcp:" + p.Addr(), "--listen", "tcp:" + p.target,
		"--bandwidth", "8MiB", "--allow-postcopy", "--no-auto-converge", "--timeout", "2s"}
	// The hole comes once a quarter of postcopy moved (the guest runs on
	// the destination: a destination still loading the device state
	// answers nothing in band, and Adopt reads it in band, docs/faults.md).
	holed := false
	var start float64
	lines := killMidway(t, bin, args, func(m map[string]any) bool {
		if !holed && m["type"] == "stats" && m["status"] == "postcopy-active" {
			left := m["remaining_bytes"].(float64)
			switch {
			case start == 0:
				start = max(left, 1)
			case left <= start*3/4 && left >= start/4:
				holed = true
				p.BlackHole(true)
			}
		}
		return holed && m["type"] == "recovery" && m["step"] == "attempt"
	})
	require.True(t, holed)
	info, err := src.QMP.QueryMigrate(tbTimeout(t, 10*time.Second))
	require.NoError(t, err)
	t.Logf("the source after the kill: %s", info.Status)
	t.Logf("first process: %d lines, the last %v", len(lines), lines[len(lines)-1])
	p.BlackHole(false)
	code, res, alines := adopt(t, bin, args)
	require.Equal(t, 0, code, "%v", res)
	assert.Equal(t, "completed", res["status"])
	var steps []string
	for _, l := range alines {
		if l["type"] == "recovery" {
			steps = append(steps, l["step"].(string))
		}
	}
	t.Logf("adopt's recovery steps: %v", steps)
	completed(t, src, dst)
}
