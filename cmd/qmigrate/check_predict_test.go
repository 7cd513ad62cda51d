package main

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// sweepDirtyRate fakes calc-dirty-rate on a guest that sweeps 48 MiB (of
// the capture's 64) at 160 MiB/s: distinct pages per period, at most the working set. It
// records the periods asked for.
func sweepDirtyRate(t *testing.T) (map[string]qmptest.HandlerFunc, func() []int64) {
	var mu sync.Mutex
	var asked []int64
	h := map[string]qmptest.HandlerFunc{
		"calc-dirty-rate": func(args json.RawMessage) (any, error) {
			var a struct {
				CalcTime int64  `json:"calc-time"`
				Unit     string `json:"calc-time-unit"`
			}
			require.NoError(t, json.Unmarshal(args, &a))
			assert.Equal(t, "millisecond", a.Unit)
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, a.CalcTime)
			return map[string]any{}, nil
		},
		"query-dirty-rate": func(json.RawMessage) (any, error) {
			mu.Lock()
			defer mu.Unlock()
			ms := asked[len(asked)-1]
			rate := min(160*ms/1000, 48) * 1000 / ms // MiB/s
			return map[string]any{"status": "measured", "dirty-rate": rate, "calc-time": ms, "sample-pages": 4096, "mode": "page-sampling"}, nil
		},
	}
	return h, func() []int64 { mu.Lock(); defer mu.Unlock(); return append([]int64(nil), asked...) }
}

func TestCheckPredict(t *testing.T) {
	h, asked := sweepDirtyRate(t)
	src, dst := replayPair(t, "same-10.0", h)
	code, stdout, stderr := runCLI(t, "check", "--predict", "--bandwidth", "32MiB", "--src", src, "--dst", dst)
	assert.Equal(t, exitOK, code, stderr)
	assert.Equal(t, []int64{200, 1000}, asked(), "a short and a long measurement")
	assert.Regexp(t, `(?m)^predict\s+pass\s+needs a throttle of about \d+%: converges in about `, stdout)
	assert.True(t, strings.HasSuffix(stdout, "the migration can run\n"), stdout)

	// Nothing permitted converges: a failed check, with what would.
	code, stdout, _ = runCLI(t, "check", "--json", "--predict", "--bandwidth", "32MiB", "--no-auto-converge", "--src", src, "--dst", dst)
	assert.Equal(t, exitFailed, code)
	var pred map[string]any
	for _, l := range strings.Split(strings.TrimSpace(stdout), "\n") {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m))
		if m["type"] == "predict" {
			pred = m
		}
	}
	require.NotNil(t, pred)
	assert.Equal(t, false, pred["converges"])
	assert.Equal(t, "none", pred["lever"])
	assert.InDelta(t, 48<<20, pred["working_set_bytes"], 1<<20, "the 1 s measurement saturated: the working set")
	assert.InDelta(t, 160<<20, pred["measured_bps"], 1<<20)
	remedy, ok := pred["remedy"].(map[string]any)
	require.True(t, ok)
	assert.Equal(t, true, remedy["throttle"])
	assert.Equal(t, true, remedy["postcopy"])
	assert.Contains(t, pred["summary"], "cannot finish with what is permitted")
	res := lastJSON(t, stdout)
	assert.Equal(t, []any{"predict"}, res["failed"])
}

func TestCheckPredictUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--predict"},
		{"--bandwidth", "1GiB"},
		{"--no-auto-converge"},
		{"--predict", "--bandwidth", "1GiB", "--max-downtime", "0s"},
	} {
		code, _, stderr := runCLI(t, append([]string{"check", "--src", "unix:/x.qmp", "--dst", "unix:/y.qmp"}, args...)...)
		assert.Equal(t, exitUsage, code, args)
		assert.Contains(t, stderr, "Run 'qmigrate check --help' for usage.", args)
	}
}
