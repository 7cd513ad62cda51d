package qemutest_test

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// The fake QEMUs refuse the argument forms they do not know with the errors
// real QEMU gave (testdata/qmp/*/errors, captured by qmp/internal/capture),
// and accept what real QEMU accepted (no capture).
func TestArgumentErrorsMatchQEMU(t *testing.T) {
	ch := []qmp.MigrationChannel{{ChannelType: "main",
		Addr: qmp.MigrationAddr{Transport: "socket", SocketAddress: qmp.SocketAddress{Type: "unix", Path: "/tmp/qm-golden.sock"}}}}
	for version, v := range map[string][3]int{"7.2": {7, 2, 22}, "10.0": {10, 0, 2}} {
		for _, tc := range []struct {
			file, cmd string
			args      any
		}{
			{"migrate-incoming-channels", "migrate-incoming", map[string]any{"channels": ch}},
			{"migrate-incoming-exit-on-error", "migrate-incoming", map[string]any{"uri": "unix:/tmp/qm-golden.sock", "exit-on-error": true}},
			{"migrate-incoming-unexpected", "migrate-incoming", map[string]any{"uri": "unix:/tmp/qm-golden.sock", "no-such-argument": true}},
			{"migrate-unexpected", "migrate", map[string]any{"uri": "unix:/tmp/qm-golden.sock", "no-such-argument": true}},
		} {
			t.Run(version+"/"+tc.file, func(t *testing.T) {
				p := qemutest.New(qemutest.Options{Version: v})
				t.Cleanup(p.Close)
				src, dst, err := p.Clients(t.Context())
				require.NoError(t, err)
				t.Cleanup(func() { src.Close(); dst.Close() })
				c := dst
				if tc.cmd == "migrate" {
					c = src
				}
				err = c.Execute(t.Context(), tc.cmd, tc.args, nil)
				want, rerr := qmptest.CapturedError(filepath.Join("..", "testdata", "qmp", version, "errors", tc.file+".json"))
				require.NoError(t, rerr)
				assert.NoError(t, qmptest.MatchError(err, want), "QEMU %s", version)
			})
		}
	}
}
