package strategy_test

import (
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// rewrite regenerates the golden files in testdata/ (as etcd-raft's
// data-driven tests do): go test ./strategy/ -run NAME -rewrite, then read
// the diff before committing it.
var rewrite = flag.Bool("rewrite", false, "rewrite the golden files in testdata/")

// golden compares got with testdata/name, or rewrites the file with -rewrite.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *rewrite {
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
		return
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "missing golden file: run go test -run %s -rewrite", t.Name())
	require.Equal(t, string(want), got, "%s changed: if intended, rerun with -rewrite and commit the diff", path)
}
