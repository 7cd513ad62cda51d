package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// lastJSON decodes the last stdout line.
func lastJSON(t *testing.T, stdout string) map[string]any {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &m), stdout)
	return m
}

func TestWrongSocketPathExit2NamingThePath(t *testing.T) {
	dir := t.TempDir()
	dst := qmptest.NewServer()
	defer dst.Close()
	dstPath := filepath.Join(dir, "dst.qmp")
	require.NoError(t, dst.ListenUnix(dstPath))
	missing := filepath.Join(dir, "no-such.qmp")

	code, stdout, stderr := runCLI(t, "migrate", "--src", "unix:"+missing, "--dst", "unix:"+dstPath,
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	assert.Equal(t, exitUsage, code)
	assert.Empty(t, stdout)
	assert.Contains(t, stderr, "--src unix:"+missing)
	assert.Contains(t, stderr, "no such file or directory")

	code, stdout, stderr = runCLI(t, "migrate", "--json", "--src", "unix:"+missing, "--dst", "unix:"+dstPath,
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	assert.Equal(t, exitUsage, code)
	res := lastJSON(t, stdout)
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "failed", res["status"])
	assert.Contains(t, res["error"], missing)
	assert.Contains(t, stderr, missing)
	assert.Equal(t, 1, strings.Count(strings.TrimSpace(stdout), "\n")+1, "only the result line on stdout")

	// Both sockets wrong: each problem on its own stderr line, each line
	// marked as qmigrate's.
	code, _, stderr = runCLI(t, "migrate", "--src", "unix:"+missing, "--dst", "unix:"+missing+"2",
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	assert.Equal(t, exitUsage, code)
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	require.Len(t, lines, 2, stderr)
	assert.True(t, strings.HasPrefix(lines[0], "qmigrate: --src "), lines[0])
	assert.True(t, strings.HasPrefix(lines[1], "qmigrate: --dst "), lines[1])
}

// silentPeers serves two unix sockets in a temporary folder, a source's and
// a destination's, that accept every connection and never greet (never
// write a byte), until the test ends. It returns the folder and the paths.
func silentPeers(t *testing.T) (dir, srcPath, dstPath string) {
	t.Helper()
	dir = t.TempDir()
	srcPath, dstPath = filepath.Join(dir, "src.qmp"), filepath.Join(dir, "dst.qmp")
	for _, path := range []string{srcPath, dstPath} {
		s := qmptest.NewServer(qmptest.WithoutGreeting())
		t.Cleanup(s.Close)
		require.NoError(t, s.ListenUnix(path))
	}
	return dir, srcPath, dstPath
}

// --timeout is the budget of the whole migration: a peer that never answers
// is given up on when it is spent, even with a longer --connect-timeout.
func TestSilentPeerGivenUpWithinTimeout(t *testing.T) {
	dir, srcPath, dstPath := silentPeers(t)

	start := time.Now()
	code, stdout, stderr := runCLI(t, "migrate", "--json", "--timeout", "300ms", "--connect-timeout", "1m",
		"--src", "unix:"+srcPath, "--dst", "unix:"+dstPath, "--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	took := time.Since(start)
	assert.Equal(t, exitUsage, code)
	assert.Less(t, took, 5*time.Second)
	assert.Contains(t, stderr, "no QMP answer within 300ms (--timeout)")
	res := lastJSON(t, stdout)
	assert.Equal(t, "failed", res["status"])
}

// A cancel (what SIGINT and SIGTERM do) while connecting: status cancelled,
// exit 1, and with --json the result line is still the last one.
func TestCancelWhileConnectingExit1(t *testing.T) {
	dir, srcPath, dstPath := silentPeers(t)

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	var out, errb bytes.Buffer
	start := time.Now()
	code := run(ctx, []string{"migrate", "--json", "--src", "unix:" + srcPath, "--dst", "unix:" + dstPath,
		"--uri", "unix:" + filepath.Join(dir, "mig.sock")}, &out, &errb)
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.Equal(t, exitFailed, code, errb.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 1, out.String())
	res := lastJSON(t, out.String())
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "cancelled", res["status"])
	assert.Equal(t, []any{}, res["decisions"])
	assert.NotEmpty(t, res["error"])
}

func TestSilentPeerExit2WithinConnectTimeout(t *testing.T) {
	dir, srcPath, dstPath := silentPeers(t)

	start := time.Now()
	code, stdout, stderr := runCLI(t, "migrate", "--json", "--connect-timeout", "300ms",
		"--src", "unix:"+srcPath, "--dst", "unix:"+dstPath, "--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	took := time.Since(start)
	assert.Equal(t, exitUsage, code)
	assert.Less(t, took, 3*time.Second)
	assert.Contains(t, stderr, "--src unix:"+srcPath)
	assert.Contains(t, stderr, "--dst unix:"+dstPath)
	assert.Contains(t, stderr, "--connect-timeout")
	assert.Contains(t, stderr, "no other client connected", "the usual cause of a silent monitor")
	res := lastJSON(t, stdout)
	assert.Equal(t, "failed", res["status"])
	assert.Contains(t, res["error"], "no QMP answer within 300ms")
}

func TestNotQMPPeerExit2(t *testing.T) {
	dir := t.TempDir()
	garbage := qmptest.NewServer(qmptest.WithGreeting("SSH-2.0-OpenSSH_9.2"))
	defer garbage.Close()
	srcPath := filepath.Join(dir, "src.qmp")
	require.NoError(t, garbage.ListenUnix(srcPath))
	dst := qmptest.NewServer()
	defer dst.Close()
	dstPath := filepath.Join(dir, "dst.qmp")
	require.NoError(t, dst.ListenUnix(dstPath))

	code, _, stderr := runCLI(t, "migrate", "--src", "unix:"+srcPath, "--dst", "unix:"+dstPath,
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"), "--connect-timeout", "2s")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "--src unix:"+srcPath)
	assert.Contains(t, stderr, "greeting")
}

// A --src or --dst path that is not a socket, or a socket nobody listens on:
// exit 2, and the message says which.
func TestUnixPathNotAMonitor(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file.qmp")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	stale := filepath.Join(dir, "stale.qmp")
	l, err := net.Listen("unix", stale)
	require.NoError(t, err)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	require.NoError(t, l.Close())

	for path, want := range map[string]string{
		dir:   "it is a directory, not a socket",
		file:  "it is a file, not a socket",
		stale: "a socket no process listens on",
	} {
		code, stdout, stderr := runCLI(t, "migrate", "--src", "unix:"+path, "--dst", "unix:"+filepath.Join(dir, "dst.qmp"),
			"--uri", "unix:"+filepath.Join(dir, "mig.sock"))
		assert.Equal(t, exitUsage, code, path)
		assert.Empty(t, stdout)
		assert.Contains(t, stderr, "--src unix:"+path+": cannot connect", path)
		assert.Contains(t, stderr, want, path)
	}
}

// A symbolic link to the source's socket given as --dst is the same socket:
// refused at once rather than left waiting for a greeting the monitor,
// busy with --src, never sends.
func TestSameSocketThroughALink(t *testing.T) {
	dir := t.TempDir()
	srv := qmptest.NewServer()
	defer srv.Close()
	path := filepath.Join(dir, "src.qmp")
	require.NoError(t, srv.ListenUnix(path))
	link := filepath.Join(dir, "link.qmp")
	require.NoError(t, os.Symlink(path, link))
	code, stdout, stderr := runCLI(t, "migrate", "--src", "unix:"+path, "--dst", "unix:"+link,
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	assert.Equal(t, exitUsage, code)
	assert.Empty(t, stdout)
	assert.Contains(t, stderr, "--src and --dst are the same socket")
}

// Once the engine connected, what is held back while connecting is shown
// in order: a QEMU that greets but knows no query-status fails in prepare,
// after the opening message (stderr with --json) and the prepare phase.
func TestFailureAfterConnectShowsThePreparePhase(t *testing.T) {
	dir := t.TempDir()
	var paths []string
	for _, name := range []string{"src.qmp", "dst.qmp"} {
		s := qmptest.NewServer()
		t.Cleanup(s.Close)
		path := filepath.Join(dir, name)
		require.NoError(t, s.ListenUnix(path))
		paths = append(paths, path)
	}
	code, stdout, stderr := runCLI(t, "migrate", "--json", "--src", "unix:"+paths[0], "--dst", "unix:"+paths[1],
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	assert.Equal(t, exitUsage, code)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	require.Len(t, lines, 2, stdout)
	var phase map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &phase))
	assert.Equal(t, "prepare", phase["phase"])
	assert.Equal(t, "failed", lastJSON(t, stdout)["status"])
	assert.True(t, strings.HasPrefix(stderr, "migrating unix:"+paths[0]), stderr)
	assert.Contains(t, stderr, "query-status")
}

// --metrics-addr serves /metrics while the command runs (here: while it
// waits for two silent monitors) and closes the listener when it ends.
func TestMetricsServedWhileRunningAndClosedAfter(t *testing.T) {
	dir, srcPath, dstPath := silentPeers(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	var out bytes.Buffer
	done := make(chan int)
	go func() {
		code := run(ctx, []string{"migrate", "--json", "--metrics-addr", "127.0.0.1:0", "--connect-timeout", "1h",
			"--src", "unix:" + srcPath, "--dst", "unix:" + dstPath, "--uri", "unix:" + filepath.Join(dir, "mig.sock")}, &out, pw)
		pw.Close()
		done <- code
	}()
	lines := bufio.NewScanner(pr)
	require.True(t, lines.Scan(), "the address is said on stderr with --json")
	url, ok := strings.CutPrefix(lines.Text(), "serving metrics on ")
	require.True(t, ok, lines.Text())
	go func() { // drain the rest of stderr until run ends
		for lines.Scan() {
		}
	}()

	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	for _, name := range []string{"qmigrate_migrations_total", "qmigrate_migration_downtime_seconds", "go_goroutines", "process_resident_memory_bytes"} {
		assert.Contains(t, fams, name)
	}

	cancel()
	assert.Equal(t, exitFailed, <-done)
	assert.Equal(t, "cancelled", lastJSON(t, out.String())["status"])
	_, err = http.Get(url)
	var oe *net.OpError
	require.ErrorAs(t, err, &oe, "the listener is closed when the command ends")
	assert.ErrorIs(t, err, syscall.ECONNREFUSED)
}

// A --metrics-addr that cannot be listened on is bad usage: exit 2 naming
// the flag, before any QEMU is touched; with --json the result line says it.
func TestMetricsAddrBad(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	dir, srcPath, dstPath := silentPeers(t)
	for addr, want := range map[string]string{
		"9090":                 "want host:port or :port",
		"127.0.0.1:":           "missing port",
		"127.0.0.1:http-alt-x": "cannot listen",
		taken.Addr().String():  "address already in use",
		"[::1:9090":            "want host:port",
	} {
		code, stdout, stderr := runCLI(t, "migrate", "--json", "--metrics-addr", addr,
			"--src", "unix:"+srcPath, "--dst", "unix:"+dstPath, "--uri", "unix:"+filepath.Join(dir, "mig.sock"))
		assert.Equal(t, exitUsage, code, addr)
		assert.Contains(t, stderr, "--metrics-addr "+addr+": ", addr)
		assert.Contains(t, stderr, want, addr)
		res := lastJSON(t, stdout)
		assert.Equal(t, "failed", res["status"])
		assert.Contains(t, res["error"], "--metrics-addr")
	}
}
