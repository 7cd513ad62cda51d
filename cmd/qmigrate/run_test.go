package main

import (
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
}

func TestSilentPeerExit2WithinConnectTimeout(t *testing.T) {
	dir := t.TempDir()
	// A QMP-ish server that accepts and never greets.
	silent := qmptest.NewServer(qmptest.WithoutGreeting())
	defer silent.Close()
	srcPath := filepath.Join(dir, "src.qmp")
	require.NoError(t, silent.ListenUnix(srcPath))
	// A bare listener that accepts and never writes a byte.
	dstPath := filepath.Join(dir, "dst.qmp")
	l, err := net.Listen("unix", dstPath)
	require.NoError(t, err)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()

	start := time.Now()
	code, stdout, stderr := runCLI(t, "migrate", "--json", "--connect-timeout", "300ms",
		"--src", "unix:"+srcPath, "--dst", "unix:"+dstPath, "--uri", "unix:"+filepath.Join(dir, "mig.sock"))
	took := time.Since(start)
	assert.Equal(t, exitUsage, code)
	assert.Less(t, took, 3*time.Second)
	assert.Contains(t, stderr, "--src unix:"+srcPath)
	assert.Contains(t, stderr, "--dst unix:"+dstPath)
	assert.Contains(t, stderr, "--connect-timeout")
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
