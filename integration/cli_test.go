package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/qemulab"
)

// TestCLI runs the qmigrate binary against real QEMUs: it is built once, and
// the subtests run one after another (never more than two QEMUs at a time).
func TestCLI(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	bin := buildCLI(t)

	t.Run("MigrateJSON", func(t *testing.T) { testCLIMigrateJSON(t, q, bin) })
	t.Run("SIGINTRollsBack", func(t *testing.T) { testCLISignal(t, q, bin, syscall.SIGINT) })
	t.Run("SIGTERMRollsBack", func(t *testing.T) { testCLISignal(t, q, bin, syscall.SIGTERM) })
	t.Run("TCPPortZeroMultifd", func(t *testing.T) { testCLITCPPortZero(t, q, bin) })
	t.Run("CopyStorage", func(t *testing.T) { testCLICopyStorage(t, q, bin) })
	t.Run("DestinationNotIncoming", func(t *testing.T) { testCLINotIncoming(t, q, bin) })
	t.Run("TLS", func(t *testing.T) { testCLITLS(t, q, bin) })
	t.Run("DemoJSON", func(t *testing.T) { testCLIDemo(t, bin) })
	t.Run("DemoTLSCopyStorage", func(t *testing.T) { testCLIDemo(t, bin, "--tls", "--copy-storage") })
}

// buildCLI builds cmd/qmigrate into the test's temporary folder.
func buildCLI(t *testing.T) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "qmigrate")
	cmd := exec.CommandContext(t.Context(), goBin, "build", "-o", bin, "github.com/qmigrate/qmigrate/cmd/qmigrate")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

// cliPair starts a source running the sweep guest and a destination waiting
// with -incoming defer. Each gets a second QMP monitor for the CLI (a QEMU
// monitor socket serves one client at a time; the test keeps the first).
func cliPair(t *testing.T, q *qemulab.QEMU, rate float64, incoming bool) (src, dst *qemulab.Instance, srcSock, dstSock string) {
	t.Helper()
	dir := shortTempDir(t)
	srcSock, dstSock = filepath.Join(dir, "src-cli.qmp"), filepath.Join(dir, "dst-cli.qmp")
	guest := qemulab.NewSweepGuest(rate)
	src = qemulab.StartT(t, q, qemulab.Config{Name: "src", Guest: guest,
		Args: []string{"-qmp", "unix:" + srcSock + ",server=on,wait=off"}})
	dst = qemulab.StartT(t, q, qemulab.Config{Name: "dst", Guest: guest, Incoming: incoming,
		Args: []string{"-qmp", "unix:" + dstSock + ",server=on,wait=off"}})
	// The guest is live: at least one full pass done.
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	_, err := src.CountSerial(ctx, sweep.StartChar, sweep.PassChar, 1)
	require.NoError(t, err)
	return src, dst, srcSock, dstSock
}

// shortTempDir is a temporary folder with a short path: unix socket paths
// are limited to 108 bytes, and t.TempDir() names can be long.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "qm-cli-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// jsonLines decodes every stdout line, failing on anything that is not one
// JSON object with a "type".
func jsonLines(t *testing.T, stdout []byte) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(string(stdout)), "\n") {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m), "stdout line %q", l)
		require.Contains(t, m, "type", l)
		out = append(out, m)
	}
	require.NotEmpty(t, out)
	return out
}

// runCLI runs bin with args, bounded by timeout, and returns its exit code
// and its --json lines; its stderr is logged and returned.
func runCLI(t *testing.T, timeout time.Duration, bin string, args ...string) (int, []map[string]any, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	t.Logf("stderr: %s", stderr.String())
	return exitCode(t, err), jsonLines(t, stdout.Bytes()), stderr.String()
}

func exitCode(t *testing.T, err error) int {
	t.Helper()
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	return ee.ExitCode()
}

func testCLIMigrateJSON(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 64<<20, true)
	uri := "unix:" + filepath.Join(shortTempDir(t), "mig.sock")

	code, lines, _ := runCLI(t, 3*time.Minute, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst=unix:"+dstSock,
		"--uri", uri, "--max-downtime", "500ms", "--timeout=2m")
	require.Equal(t, 0, code, "stdout: %v", lines)
	res := lines[len(lines)-1]
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "completed", res["status"])
	assert.NotContains(t, res, "error")
	assert.IsType(t, []any{}, res["decisions"])
	assert.Greater(t, res["transferred_bytes"], float64(100<<20))
	assert.LessOrEqual(t, res["downtime_ms"], float64(500+250), "downtime within the limit (plus switchover overhead)")
	var phases []string
	stats := 0
	for _, l := range lines[:len(lines)-1] {
		switch l["type"] {
		case "phase":
			phases = append(phases, l["phase"].(string))
		case "stats":
			stats++
			for _, k := range []string{"elapsed_ms", "status", "iteration", "transferred_bytes", "remaining_bytes",
				"total_bytes", "dirty_rate_bps", "throughput_bps", "expected_downtime_ms", "throttle_pct",
				"downtime_limit_ms", "storage_remaining_bytes", "storage_total_bytes"} {
				assert.Contains(t, l, k)
			}
		case "result":
			t.Fatalf("result before the last line: %v", l)
		}
	}
	assert.Contains(t, phases, "prepare")
	assert.Contains(t, phases, "converge")
	assert.Equal(t, "complete", phases[len(phases)-1])
	assert.Positive(t, stats)

	// The guest runs on the destination, every page intact; the source is
	// left in postmigrate.
	_, err := qemulab.CheckSweep(t.Context(), src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err)
}

// testCLITCPPortZero migrates over tcp with port 0 (the destination picks,
// qmigrate reads the port back), multifd channels and a bandwidth with a
// unit, all from the command line.
func testCLITCPPortZero(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 64<<20, true)
	code, lines, _ := runCLI(t, 3*time.Minute, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst", "unix:"+dstSock,
		"--uri", "tcp:127.0.0.1:0", "--multifd", "2", "--bandwidth", "1GiB", "--max-downtime=500ms", "--timeout", "2m")
	require.Equal(t, 0, code, "stdout: %v", lines)
	ctx := t.Context()
	res := lines[len(lines)-1]
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "completed", res["status"])
	for _, k := range []string{"total_ms", "downtime_ms", "transferred_bytes", "decisions", "undone", "undo_errors"} {
		assert.Contains(t, res, k)
	}
	assert.IsType(t, []any{}, res["decisions"])
	// The parameters really set on the source.
	var params struct {
		MaxBandwidth    uint64 `json:"max-bandwidth"`
		MultifdChannels int    `json:"multifd-channels"`
	}
	require.NoError(t, src.QMP.Execute(ctx, "query-migrate-parameters", nil, &params))
	assert.Equal(t, uint64(1<<30), params.MaxBandwidth)
	assert.Equal(t, 2, params.MultifdChannels)
	_, err := qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err)
}

// testCLISignal interrupts a running migration with sig (SIGINT or SIGTERM):
// rolled back, exit 1, a result line with status cancelled.
func testCLISignal(t *testing.T, q *qemulab.QEMU, bin string, sig syscall.Signal) {
	src, dst, srcSock, dstSock := cliPair(t, q, 64<<20, true)
	uri := "unix:" + filepath.Join(shortTempDir(t), "mig.sock")

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst", "unix:"+dstSock,
		"--uri", uri, "--bandwidth", "1MiB")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	pipe, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())

	// Interrupt once RAM is being sent.
	var lines []string
	sc := bufio.NewScanner(pipe)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	signalled, secondSent := false, false
	for sc.Scan() {
		lines = append(lines, sc.Text())
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), sc.Text())
		if !signalled && m["type"] == "stats" && m["status"] == "active" && m["transferred_bytes"].(float64) > 0 {
			require.NoError(t, cmd.Process.Signal(sig))
			signalled = true
			// An impatient second signal must not cut the rollback short.
			time.Sleep(20 * time.Millisecond)
			if err := cmd.Process.Signal(sig); err == nil {
				secondSent = true
			}
		}
	}
	require.NoError(t, sc.Err())
	err = cmd.Wait()
	t.Logf("stderr: %s", stderr.String())
	require.True(t, signalled, "no active stats line seen: %v", lines)
	assert.Equal(t, 1, exitCode(t, err))
	assert.Contains(t, stderr.String(), "cancelling")
	if secondSent && !strings.Contains(stderr.String(), "still rolling back") {
		t.Logf("the second SIGINT arrived after the rollback had finished")
	}

	var res map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &res))
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "cancelled", res["status"])
	assert.NotEmpty(t, res["error"])
	assert.NotEmpty(t, res["undone"], "rollback steps are reported")

	// The guest still runs on the source, intact.
	st, err := src.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status)
	_, err = qemulab.CheckSweep(ctx, nil, src.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err)
	_ = dst
}

// testCLICopyStorage migrates the sweep guest's boot disk too: --disk names
// its drive, --nbd puts the NBD server on a unix socket of our choosing.
func testCLICopyStorage(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 64<<20, true)
	dir := shortTempDir(t)
	code, lines, _ := runCLI(t, 3*time.Minute, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst", "unix:"+dstSock,
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"), "--disk", "sweep0", "--nbd", "unix:"+filepath.Join(dir, "nbd.sock"))
	require.Equal(t, 0, code, "stdout: %v", lines)
	assert.Equal(t, "completed", lines[len(lines)-1]["status"])
	var disks []map[string]any
	for _, l := range lines {
		if l["type"] == "disk" {
			disks = append(disks, l)
			for _, k := range []string{"node", "job", "done_bytes", "total_bytes", "rate_bps", "ready"} {
				assert.Contains(t, l, k)
			}
		}
	}
	require.NotEmpty(t, disks, "disk progress lines")
	assert.Equal(t, true, disks[len(disks)-1]["ready"])
	_, err := qemulab.CheckSweep(t.Context(), src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err)
}

func testCLINotIncoming(t *testing.T, q *qemulab.QEMU, bin string) {
	_, _, srcSock, dstSock := cliPair(t, q, 64<<20, false)
	uri := "unix:" + filepath.Join(shortTempDir(t), "mig.sock")
	code, lines, _ := runCLI(t, time.Minute, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst", "unix:"+dstSock, "--uri", uri)
	assert.Equal(t, 2, code)
	res := lines[len(lines)-1]
	assert.Equal(t, "failed", res["status"])
	assert.Contains(t, res["error"], "incoming")
}

func testCLIDemo(t *testing.T, bin string, flags ...string) {
	code, lines, stderr := runCLI(t, 3*time.Minute, bin, append([]string{"demo", "--json"}, flags...)...)
	require.Equal(t, 0, code, "stdout: %v", lines)
	res := lines[len(lines)-1]
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "completed", res["status"])
	assert.Equal(t, true, res["verified"])
	// Nothing left behind: no QEMU of this demo, no folder.
	_, after, ok := strings.Cut(stderr, "source in ")
	require.True(t, ok, "the demo names its folders")
	src, dst, ok := strings.Cut(strings.SplitN(after, "\n", 2)[0], ", destination in ")
	require.True(t, ok, after)
	if slices.Contains(flags, "--tls") {
		_, pki, ok := strings.Cut(stderr, "from a throwaway CA in ")
		require.True(t, ok, "the demo names its certificates' folder")
		pki = strings.SplitN(pki, "\n", 2)[0]
		assert.Contains(t, stderr, "with TLS")
		assert.NoDirExists(t, pki, "certificates removed")
	}
	for _, dir := range []string{src, dst} {
		require.Contains(t, dir, "qm-demo-")
		assert.NoDirExists(t, dir)
		out, _ := exec.Command("pgrep", "-f", dir).Output()
		assert.Empty(t, strings.TrimSpace(string(out)), "demo QEMU left running in %s", dir)
	}
}

// testCLITLS: credentials the destination cannot load exit 2 with QEMU's
// reason and leave the pair as it was; the same pair then migrates over
// x509 TLS on a unix socket (the certificate's name given).
func testCLITLS(t *testing.T, q *qemulab.QEMU, bin string) {
	src, dst, srcSock, dstSock := cliPair(t, q, 64<<20, true)
	uri := "unix:" + filepath.Join(shortTempDir(t), "mig.sock")
	args := []string{"migrate", "--json", "--src", "unix:" + srcSock, "--dst", "unix:" + dstSock, "--uri", uri,
		"--tls-hostname", "dst.qmigrate.test", "--timeout", "2m"}

	missing := filepath.Join(t.TempDir(), "no-pki")
	code, lines, stderr := runCLI(t, time.Minute, bin, append(args, "--tls-x509", missing)...)
	assert.Equal(t, 2, code)
	res := lines[len(lines)-1]
	assert.Equal(t, "failed", res["status"])
	assert.Contains(t, res["error"], "Unable to access credentials "+missing+"/ca-cert.pem")
	assert.Contains(t, stderr, "Unable to access credentials")

	pki := filepath.Join(t.TempDir(), "pki")
	require.NoError(t, qemulab.WriteX509Creds(pki, "dst.qmigrate.test"))
	code, lines, stderr = runCLI(t, 3*time.Minute, bin, append(args, "--tls-x509", pki)...)
	require.Equal(t, 0, code, "stdout: %v", lines)
	res = lines[len(lines)-1]
	assert.Equal(t, "completed", res["status"])
	assert.Equal(t, []any{}, res["undo_errors"])
	assert.Contains(t, stderr, "with TLS (x509 certificates in "+pki+")")
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	_, err := qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
	assertNoTLSLeft(t, "source", src)
	assertNoTLSLeft(t, "destination", dst)
}
