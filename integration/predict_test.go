package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/strategy"
)

// predictLink is the tbf rate of the accuracy runs' link, bytes/s.
const predictLink = 32e6

// predictState is what check --predict must leave as it was: the run
// state, the capabilities and the migration parameters.
func predictState(t *testing.T, inst *qemulab.Instance) string {
	t.Helper()
	p, err := inst.QMP.QueryMigrateParameters(tbTimeout(t, 10*time.Second))
	require.NoError(t, err)
	b, err := json.Marshal(p) // the values, not the pointers' addresses
	require.NoError(t, err)
	return runState(t, inst.QMP) + " " + string(b)
}

// predictCLI runs "qmigrate check --predict --json" on a pair and returns
// its exit code and predict line; it asserts that the check changed
// nothing on either QEMU.
func predictCLI(t *testing.T, bin string, src, dst *qemulab.Instance, srcSock, dstSock string, args ...string) (int, map[string]any) {
	t.Helper()
	before := [2]string{predictState(t, src), predictState(t, dst)}
	code, lines, _ := runCLI(t, time.Minute, bin, append([]string{"check", "--src", "unix:" + srcSock, "--dst", "unix:" + dstSock,
		"--predict", "--json"}, args...)...)
	assert.Equal(t, before, [2]string{predictState(t, src), predictState(t, dst)}, "check --predict changed nothing")
	var pred map[string]any
	for _, l := range lines {
		if l["type"] == "predict" {
			pred = l
		}
	}
	require.NotNil(t, pred, "a predict line")
	t.Logf("predict: %v (%v)", pred["summary"], pred["reason"])
	return code, pred
}

// TestCheckPredict runs check --predict through the CLI against a real pair
// (a sweep guest at twice a 32 MB/s link): it measures, predicts, and
// changes nothing on either QEMU.
func TestCheckPredict(t *testing.T) {
	q, _ := tbQEMU(t)
	bin := buildCLI(t)
	src, dst, srcSock, dstSock := cliPair(t, q, 2*predictLink, true)
	code, pred := predictCLI(t, bin, src, dst, srcSock, dstSock, "--bandwidth", "32MB")
	assert.Equal(t, 0, code, "throttling is permitted: the migration can run")
	assert.Equal(t, true, pred["converges"])
	assert.Equal(t, "throttle", pred["lever"])
	assert.Positive(t, pred["measured_bps"])
	// Nothing permitted: a failed check, and what would finish it.
	code, pred = predictCLI(t, bin, src, dst, srcSock, dstSock, "--bandwidth", "32MB", "--no-auto-converge")
	assert.Equal(t, 1, code)
	assert.Equal(t, false, pred["converges"])
	assert.NotNil(t, pred["remedy"])
}

// TestPredictAccuracy migrates guests at several dirty rates (idle,
// converging, 2× and 10× a 32 MB/s tbf link between two namespaces) with
// the auto policy and default limits, after check --predict on the same
// pair, and logs predicted against measured time and lever (the figures of
// docs/predict.md). Long: it runs only with QMIGRATE_PREDICT_ACCURACY=1.
func TestPredictAccuracy(t *testing.T) {
	if os.Getenv("QMIGRATE_PREDICT_ACCURACY") == "" {
		t.Skip("set QMIGRATE_PREDICT_ACCURACY=1 to run the accuracy runs")
	}
	q, v := tbQEMU(t)
	bin := buildCLI(t)
	n := qemulab.NewNetworkT(t, predictLink)
	type row struct {
		name       string
		rate       float64 // bytes/s, 0 = idle (no guest)
		lo, hi     float64 // accepted measured rate, × the link
		pred, meas string
		out        PredictRow
	}
	rows := []*row{{name: "idle"}, {name: "converging", rate: 0.5 * predictLink, lo: 0.3, hi: 0.7},
		{name: "2x", rate: 2 * predictLink, lo: 1.5, hi: 3}, {name: "10x", rate: 10 * predictLink, lo: 6, hi: 15}}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			dir := shortTempDir(t)
			srcSock, dstSock := filepath.Join(dir, "s.qmp"), filepath.Join(dir, "d.qmp")
			scfg := qemulab.Config{Name: "src", Netns: n.A.Netns, Args: []string{"-qmp", "unix:" + srcSock + ",server=on,wait=off"}}
			var src *qemulab.Instance
			var g qemulab.Guest
			sweepMeasured := 0.0
			if r.rate > 0 {
				var sg qemulab.SweepGuest
				src, sg, sweepMeasured = tunedSweep(t, q, scfg, r.rate, r.lo*predictLink, r.hi*predictLink)
				g = sg
			} else {
				src = qemulab.StartT(t, q, scfg)
			}
			dst := qemulab.StartT(t, q, qemulab.Config{Name: "dst", Guest: g, Incoming: true, Netns: n.B.Netns,
				Args: []string{"-qmp", "unix:" + dstSock + ",server=on,wait=off"}})
			_, pred := predictCLI(t, bin, src, dst, srcSock, dstSock, "--bandwidth", fmt.Sprint(int64(predictLink)))
			cfg := engine.Config{
				Source:      engine.Endpoint{Client: src.QMP},
				Destination: engine.Endpoint{Client: dst.QMP},
				URI:         fmt.Sprintf("tcp:%s:4444", n.B.Addr),
				Bandwidth:   uint64(predictLink),
				Logger:      testLogger(t),
			}
			ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
			defer cancel()
			res, err := engine.Migrate(ctx, cfg)
			require.NoError(t, err)
			lever, throttle := "none", 0
			for _, d := range res.Decisions {
				switch d.Action {
				case strategy.SetThrottle:
					lever, throttle = "throttle", max(throttle, d.Throttle.Max)
				case strategy.StartPostcopy:
					lever = "postcopy"
				case strategy.PauseSource:
					lever = "pause"
				case strategy.SetDowntime:
					if lever == "none" {
						lever = "downtime"
					}
				}
			}
			r.pred = fmt.Sprintf("%s %v%% %.1fs", pred["lever"], pred["throttle_pct"], pred["time_ms"].(float64)/1000)
			r.meas = fmt.Sprintf("%s %d%% %.1fs (downtime %v)", lever, throttle, res.Total.Seconds(), res.Downtime.Round(time.Millisecond))
			r.out = PredictRow{Guest: r.name, SweepBps: sweepMeasured, MeasuredBps: pred["measured_bps"].(float64),
				WorkingSet: uint64(pred["working_set_bytes"].(float64)),
				PredLever:  fmt.Sprint(pred["lever"]), PredThrottle: int(pred["throttle_pct"].(float64)),
				PredTime: time.Duration(pred["time_ms"].(float64)) * time.Millisecond, PredConverges: pred["converges"] == true,
				Lever: lever, Throttle: throttle, Status: res.Status, Time: res.Total, Downtime: res.Downtime}
			t.Logf("QEMU %s %s: sweep %.0f MB/s, calc-dirty-rate %.0f MB/s, working set %.0f MiB; predicted %s; measured %s",
				v, r.name, sweepMeasured/1e6, pred["measured_bps"].(float64)/1e6, pred["working_set_bytes"].(float64)/(1<<20), r.pred, r.meas)
		})
	}
	doc := PredictResults{Version: v.String(), Date: time.Now().UTC(), Link: predictLink,
		Command: "QMIGRATE_PREDICT_ACCURACY=1 QMIGRATE_PREDICT_JSON=FILE go test -v -count=1 -p 1 -run TestPredictAccuracy ./integration/"}
	for _, r := range rows {
		t.Logf("| %s | %s | %s | %s |", v, r.name, r.pred, r.meas)
		doc.Rows = append(doc.Rows, r.out)
	}
	if out := os.Getenv("QMIGRATE_PREDICT_JSON"); out != "" && !t.Failed() {
		b, err := json.MarshalIndent(doc, "", "  ")
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(out, append(b, '\n'), 0o644))
		t.Logf("wrote %s", out)
	}
}

// PredictResults is what TestPredictAccuracy writes to QMIGRATE_PREDICT_JSON:
// check --predict's verdict beside the migration that followed, per guest
// (qmbench -predict renders it into docs/benchmarks.md).
type PredictResults struct {
	Version, Command string
	Date             time.Time
	Link             float64 // the tbf link, bytes/s
	Rows             []PredictRow
}

// PredictRow is one guest: the prediction, then the migration.
type PredictRow struct {
	Guest                 string
	SweepBps, MeasuredBps float64 // the sweep's own rate; calc-dirty-rate's
	WorkingSet            uint64
	PredLever             string
	PredThrottle          int
	PredTime              time.Duration
	PredConverges         bool
	Lever                 string // the strongest lever of the migration's decisions
	Throttle              int
	Status                string
	Time, Downtime        time.Duration
}
