package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// replayPair serves a capture of testdata/qmp/preflight (what real QEMUs
// answered to preflight) on two unix sockets, and returns their addresses.
// extra handlers, when given, are added to the source (they override the
// capture's).
func replayPair(t *testing.T, scenario string, extra ...map[string]qmptest.HandlerFunc) (src, dst string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "qmp", "preflight", scenario+".json"))
	require.NoError(t, err)
	type recording struct {
		Greeting struct {
			QMP struct {
				Version struct {
					QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
				} `json:"version"`
			} `json:"QMP"`
		} `json:"greeting"`
		Replies map[string]json.RawMessage `json:"replies"`
	}
	var c struct {
		Src recording `json:"src"`
		Dst recording `json:"dst"`
	}
	require.NoError(t, json.Unmarshal(b, &c))
	dir := t.TempDir()
	serve := func(rec recording, name string) string {
		v := rec.Greeting.QMP.Version.QEMU
		srv := qmptest.NewServer(qmptest.WithVersion(v.Major, v.Minor, v.Micro))
		t.Cleanup(srv.Close)
		for k := range rec.Replies {
			cmd, _, _ := strings.Cut(k, " ")
			srv.Handle(cmd, func(args json.RawMessage) (any, error) {
				key := cmd
				if len(args) > 0 {
					var v any
					require.NoError(t, json.Unmarshal(args, &v))
					kb, _ := json.Marshal(v)
					key += " " + string(kb)
				}
				raw, ok := rec.Replies[key]
				if !ok {
					return nil, &qmp.Error{Class: "GenericError", Desc: "not captured: " + key}
				}
				var r struct {
					Return json.RawMessage `json:"return"`
					Error  *qmp.Error      `json:"error"`
				}
				require.NoError(t, json.Unmarshal(raw, &r))
				if r.Error != nil {
					return nil, r.Error
				}
				return r.Return, nil
			})
		}
		if name == "src" {
			for _, hs := range extra {
				for cmd, h := range hs {
					srv.Handle(cmd, h)
				}
			}
		}
		path := filepath.Join(dir, name+".qmp")
		require.NoError(t, srv.ListenUnix(path))
		return "unix:" + path
	}
	return serve(c.Src, "src"), serve(c.Dst, "dst")
}

func TestCheckPasses(t *testing.T) {
	src, dst := replayPair(t, "upgrade-pinned")
	code, stdout, stderr := runCLI(t, "check", "--src", src, "--dst", dst)
	assert.Equal(t, exitOK, code, stderr)
	assert.Empty(t, stderr)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	assert.Regexp(t, `^CHECK\s+RESULT\s+DETAIL$`, lines[0])
	assert.Regexp(t, `^machine-type\s+pass\s+pc-i440fx-7.2$`, lines[2])
	assert.Equal(t, "the migration can run", lines[len(lines)-1])
	// The destination's pid is not known through a fake: postcopy's
	// userfaultfd check warns, but only with --allow-postcopy.
	assert.Contains(t, stdout, "postcopy-userfaultfd  pass    postcopy not permitted: not checked")
}

func TestCheckRefusesWithEveryReason(t *testing.T) {
	src, dst := replayPair(t, "upgrade-unpinned")
	code, stdout, stderr := runCLI(t, "check", "--src", src, "--dst", dst)
	assert.Equal(t, exitFailed, code)
	assert.Empty(t, stderr)
	assert.Contains(t, stdout, "start the destination with -machine pc-i440fx-7.2")
	assert.Regexp(t, `(?m)^cpu-features\s+fail\s+destination lacks pcommit$`, stdout)
	assert.Regexp(t, `(?m)^\s+adds 3dnowprefetch, cmp-legacy, fsrm, rdpid, rdseed, sha-ni, wbnoinvd, x2apic, xsaveerptr$`, stdout)
	assert.True(t, strings.HasSuffix(stdout, "the migration cannot run: machine-type, cpu-model, cpu-features failed\n"), stdout)

	code, stdout, stderr = runCLI(t, "check", "--json", "--src", src, "--dst", dst)
	assert.Equal(t, exitFailed, code)
	assert.Equal(t, "qmigrate check: the migration cannot run: machine-type, cpu-model, cpu-features failed\n", stderr)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	require.Len(t, lines, 13, "one line per check and the result")
	var first map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &first))
	assert.Equal(t, map[string]any{"type": "check", "check": "run-state", "result": "pass", "detail": "source running, destination waiting for the migration"}, first)
	res := lastJSON(t, stdout)
	assert.Equal(t, "result", res["type"])
	assert.Equal(t, "fail", res["status"])
	assert.Equal(t, []any{"machine-type", "cpu-model", "cpu-features"}, res["failed"])
	assert.Equal(t, []any{}, res["warnings"])
	assert.Equal(t, false, res["postcopy"])
}

func TestCheckStorageAndPostcopyFlags(t *testing.T) {
	src, dst := replayPair(t, "same-10.0")
	code, stdout, _ := runCLI(t, "check", "--json", "--allow-postcopy", "--disk", "drive0", "--src", src, "--dst", dst)
	assert.Equal(t, exitOK, code)
	assert.Contains(t, stdout, `"check":"block-devices","result":"pass","detail":"drive0 (copied, 8 MiB)"`)
	res := lastJSON(t, stdout)
	assert.Equal(t, "pass", res["status"])
	// The peer of the destination's unix socket is this test process: the
	// userfaultfd check reads its credentials (root or not, it never fails:
	// what forbids a permitted postcopy is a warning).
	assert.Contains(t, stdout, `"check":"postcopy-userfaultfd","result":`)
	assert.Contains(t, stdout, fmt.Sprintf("the destination QEMU (pid %d", os.Getpid()))

	code, stdout, _ = runCLI(t, "check", "--copy-storage", "--disk", "nope", "--src", src, "--dst", dst)
	assert.Equal(t, exitFailed, code)
	assert.Contains(t, stdout, "disk nope to copy is not on the source")
}

func TestCheckUsage(t *testing.T) {
	code, stdout, stderr := runCLI(t, "check", "--src", "unix:/x.qmp")
	assert.Equal(t, exitUsage, code)
	assert.Empty(t, stdout)
	assert.Contains(t, stderr, "qmigrate check: --dst is required")
	assert.Contains(t, stderr, "Run 'qmigrate check --help' for usage.")

	code, stdout, _ = runCLI(t, "check", "--json", "--src", "/x.qmp", "--dst", "unix:/y.qmp")
	assert.Equal(t, exitUsage, code)
	res := lastJSON(t, stdout)
	assert.Equal(t, "error", res["status"])
	assert.Contains(t, res["error"], "did you mean unix:/x.qmp?")

	code, _, stderr = runCLI(t, "check", "--uri", "tcp:a:1")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "flag provided but not defined: --uri")

	missing := filepath.Join(t.TempDir(), "none.qmp")
	code, _, stderr = runCLI(t, "check", "--src", "unix:"+missing, "--dst", "unix:"+missing+"2")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "no such file or directory")

	code, stdout, _ = runCLI(t, "check", "--help")
	assert.Equal(t, exitOK, code)
	assert.Contains(t, stdout, "Usage: qmigrate check --src ADDR --dst ADDR")
	for _, name := range checkFlagOrder() {
		assert.Contains(t, stdout, "--"+name)
	}
	code, stdout2, _ := runCLI(t, "help", "check")
	assert.Equal(t, exitOK, code)
	assert.Equal(t, stdout, stdout2)
}
