package preflight_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qemutest"
)

// QEMU 10.0 lists ht and cmp-legacy in the feature words of a guest with
// more than one vCPU per socket, 7.2 sets them only when the guest runs
// CPUID: the guest sees the same CPU, and cpu-features passes (real 7.2
// and 10.0 showed "destination adds cmp-legacy, ht" before; the fake
// models their feature words). A real difference still fails.
func TestTopologyBitsAreNoDifference(t *testing.T) {
	for _, tc := range []struct {
		dstCPU string
		want   preflight.Status
	}{{"", preflight.Pass}, {"qemu64,+avx2", preflight.Fail}} {
		p := qemutest.New(qemutest.Options{Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, VCPUs: 2, DstCPU: tc.dstCPU})
		t.Cleanup(p.Close)
		src, dst, err := p.Clients(t.Context())
		require.NoError(t, err)
		t.Cleanup(func() { src.Close(); dst.Close() })
		rep, err := preflight.Run(t.Context(), src, dst, preflight.Options{})
		require.NoError(t, err)
		r, _ := rep.Result(preflight.CPUFeatures)
		assert.Equal(t, tc.want, r.Status, r.Detail)
		if tc.want == preflight.Fail {
			assert.Equal(t, "destination adds avx2; the guest would see its CPU change on every vCPU: 1 CPUID feature bits differ (CPUID.7H.0:EBX)", r.Detail)
		}
	}
}
