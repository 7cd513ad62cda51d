package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qemutest"
)

// qmigrate migrate runs preflight in prepare and prints every failed check,
// each on its own stderr line, and exits 2 (bad input): here the unpinned
// upgrade (machine alias "pc" on 7.2 and 10.0) with another CPU flag and a
// missing device on the destination.
func TestMigratePrintsEveryFailedCheck(t *testing.T) {
	p := qemutest.New(qemutest.Options{Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, Machine: "pc",
		DstCPU: "qemu64,+avx2", DstDevices: []qemutest.Device{}})
	t.Cleanup(p.Close)
	dir := t.TempDir()
	src, dst, err := p.ListenUnix(dir)
	require.NoError(t, err)
	for _, jsonOut := range []bool{false, true} {
		args := []string{"migrate", "--src", "unix:" + src, "--dst", "unix:" + dst, "--uri", "unix:" + filepath.Join(dir, "mig.sock")}
		if jsonOut {
			args = append(args, "--json")
		}
		code, stdout, stderr := runCLI(t, args...)
		assert.Equal(t, exitUsage, code, stderr)
		var checks []string
		for _, line := range strings.Split(stderr, "\n") {
			for _, name := range []string{"machine-type", "cpu-features", "devices", "pci-addresses"} {
				if strings.Contains(line, name+": ") {
					checks = append(checks, name)
					assert.True(t, strings.HasPrefix(line, "qmigrate: "), line)
				}
			}
		}
		assert.Equal(t, []string{"machine-type", "cpu-features", "devices", "pci-addresses"}, checks, stderr)
		assert.Contains(t, stderr, "start the destination with -machine pc-i440fx-7.2")
		assert.Contains(t, stderr, "destination adds avx2")
		assert.Contains(t, stderr, "device net0 (virtio-net-pci) is missing on the destination")
		if jsonOut {
			res := lastJSON(t, stdout)
			assert.Equal(t, "failed", res["status"])
			assert.Contains(t, res["error"], "cpu-features: destination adds avx2")
		}
		assert.Empty(t, p.Src.CallsOf("migrate-set-capabilities"))
		assert.Empty(t, p.Dst.CallsOf("migrate-set-capabilities"))
	}
}
