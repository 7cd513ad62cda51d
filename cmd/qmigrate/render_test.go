package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/strategy"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		require.NoError(t, os.MkdirAll("testdata", 0o755))
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "run go test -update to create it")
	assert.Equal(t, string(want), got)
}

// sampleRun is a migration's events: storage, a non-converging start, two
// decisions (one failing to apply), completion.
func sampleRun() ([]engine.Event, *engine.Result) {
	setDowntime := strategy.Decision{Action: strategy.SetDowntime, DowntimeLimit: 500 * time.Millisecond,
		Summary: "downtime limit 500ms: the guest dirties memory at 97% of the link's speed, so each pass shrinks too little",
		Reason:  "dirty rate 310 MiB/s > 0.8 x throughput: raise downtime to converge", At: 2100 * time.Millisecond}
	throttle := strategy.Decision{Action: strategy.SetThrottle, Throttle: strategy.Throttle{Initial: 40, Increment: 10, Max: 80},
		Reason: "downtime at the user's maximum: throttle the guest", At: 4200 * time.Millisecond}
	stats := func(at time.Duration, status string, iter, sent, rem uint64, dirty, tput float64, exp time.Duration, thr int) engine.Event {
		return engine.Event{Kind: engine.EventStats, Elapsed: at, Stats: &engine.Stats{
			Status: status, Iteration: iter, TransferredBytes: sent, RemainingBytes: rem, TotalBytes: 150 << 20,
			DirtyRate: dirty, Throughput: tput, ExpectedDowntime: exp, ThrottlePercent: thr,
			DowntimeLimit: 300 * time.Millisecond, StorageRemaining: 0, StorageTotal: 64 << 20,
		}}
	}
	events := []engine.Event{
		{Kind: engine.EventPhase, Elapsed: 0, Phase: engine.PhasePrepare},
		{Kind: engine.EventDisk, Elapsed: 150 * time.Millisecond, Disk: &blockmirror.Progress{Node: "disk0", Job: "qmigrate-mirror-disk0", Done: 16 << 20, Total: 64 << 20, Rate: 123456789.4}},
		{Kind: engine.EventDisk, Elapsed: 900 * time.Millisecond, Disk: &blockmirror.Progress{Node: "disk0", Job: "qmigrate-mirror-disk0", Done: 64 << 20, Total: 64 << 20, Rate: math.NaN(), Ready: true}},
		{Kind: engine.EventPhase, Elapsed: 1000 * time.Millisecond, Phase: engine.PhaseStart},
		{Kind: engine.EventPhase, Elapsed: 1010 * time.Millisecond, Phase: engine.PhaseConverge},
		stats(1200*time.Millisecond, "active", 1, 20<<20, 130<<20, 0, 104857600, 0, 0),
		stats(1400*time.Millisecond, "active", 1, 40<<20, 110<<20, 0, 104857600.6, 0, 0),
		{Kind: engine.EventDecision, Elapsed: 2100 * time.Millisecond, Decision: &setDowntime},
		stats(3300*time.Millisecond, "active", 3, 180<<20, 60<<20, 325058560, 209715200, 290*time.Millisecond, 0),
		{Kind: engine.EventDecision, Elapsed: 4200 * time.Millisecond, Decision: &throttle, DecisionErr: errors.New("qmp: migrate-set-parameters: Parameter 'cpu-throttle-initial' expects an integer (GenericError)")},
		stats(4400*time.Millisecond, "active", 4, 230<<20, 10<<20, 52428800, 209715200, 50*time.Millisecond, 40),
		stats(4600*time.Millisecond, "device", 5, 240<<20, 0, 0, 209715200, 0, 40),
		{Kind: engine.EventPhase, Elapsed: 4650 * time.Millisecond, Phase: engine.PhaseSwitchover},
		{Kind: engine.EventPhase, Elapsed: 4700 * time.Millisecond, Phase: engine.PhaseComplete},
	}
	res := &engine.Result{Status: engine.StatusCompleted, Total: 4712 * time.Millisecond, Downtime: 48 * time.Millisecond,
		MaxDowntime: 500 * time.Millisecond, DowntimeHeld: true, DowntimeLimit: 500 * time.Millisecond,
		TransferredBytes: 240 << 20, Decisions: []strategy.Decision{setDowntime, throttle}}
	events = append(events, engine.Event{Kind: engine.EventResult, Elapsed: 4712 * time.Millisecond, Result: res})
	return events, res
}

func failedResult() *engine.Result {
	err := &engine.Error{Phase: engine.PhaseConverge, Side: engine.SideSource, Op: "query-migrate",
		Err: errors.New("Migration failed: Unable to write to socket: Broken pipe")}
	return &engine.Result{Status: engine.StatusFailed, Total: 2 * time.Second, TransferredBytes: 1 << 20,
		Undone:     []string{"migrate_cancel on source", "restore source parameters"},
		UndoErrors: []string{"cont on source: qmp: cont: guest already running (GenericError)"}, Err: err}
}

func TestJSONLinesGolden(t *testing.T) {
	events, res := sampleRun()
	var out bytes.Buffer
	r := newJSONRenderer(&out)
	for _, ev := range events {
		r.Event(ev)
	}
	r.Result(res, nil)
	r.Result(failedResult(), nil)
	r.Result(resultOf(nil, cancelledErr()), nil)
	golden(t, "events.jsonl", out.String())

	// Every line is one object with a type; the result lines have every
	// documented field, arrays never null.
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	for _, l := range lines {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m), l)
		require.Contains(t, m, "type")
		if m["type"] == "result" {
			for _, k := range []string{"status", "total_ms", "downtime_ms", "transferred_bytes", "decisions", "undone", "undo_errors"} {
				assert.Contains(t, m, k)
			}
			assert.NotNil(t, m["decisions"])
			assert.NotNil(t, m["undone"])
			assert.NotNil(t, m["undo_errors"])
			if m["status"] == "completed" {
				assert.NotContains(t, m, "error")
			} else {
				assert.NotEmpty(t, m["error"])
			}
		}
	}
}

// cancelledErr is an engine-style cancellation error.
func cancelledErr() error {
	return &engine.Error{Phase: engine.PhaseConverge, Op: "wait", Err: errors.Join(engine.ErrCancelled, errors.New("context canceled"))}
}

func TestPlainRendererGolden(t *testing.T) {
	events, res := sampleRun()
	var out bytes.Buffer
	r := &plainRenderer{w: &out}
	for _, ev := range events {
		r.Event(ev)
	}
	r.Result(res, nil)
	r.Message("--")
	r.Result(failedResult(), nil)
	r.Message("-- nothing started:")
	(&plainRenderer{w: &out}).Result(failedResult(), nil)
	golden(t, "plain.txt", out.String())
}

func TestTermRendererGolden(t *testing.T) {
	events, res := sampleRun()
	var out bytes.Buffer
	r := &termRenderer{w: &out, width: 132}
	for _, ev := range events {
		r.Event(ev)
	}
	r.Result(res, nil)
	got := out.String()
	// Human-readable golden: each redraw on its own line.
	golden(t, "term.txt", strings.ReplaceAll(got, eraseLine, "<CR>\n"))
	// The live line never exceeds the terminal width.
	for _, seg := range strings.Split(got, eraseLine) {
		for _, l := range strings.Split(seg, "\n") {
			if !strings.HasPrefix(l, "[") { // decisions above the line may be long
				assert.LessOrEqual(t, len(l), 131, l)
			}
		}
	}
	assert.True(t, strings.HasSuffix(got, "the guest runs on the destination\n"))
}

func TestStatusLineNarrowTerminal(t *testing.T) {
	s := &engine.Stats{Status: "active", Iteration: 2, TransferredBytes: 75, RemainingBytes: 25, Throughput: 1 << 30}
	line := statusLine(engine.PhaseConverge, 1500*time.Millisecond, s, nil, 40)
	assert.Len(t, line, 39)
	assert.True(t, strings.HasPrefix(line, "converge   [===============>    ]  75%"), line)
	assert.Equal(t, "converge     1.5s", statusLine(engine.PhaseConverge, 1500*time.Millisecond, nil, nil, 80))
	disk := &blockmirror.Progress{Node: "disk0", Done: 1 << 30, Total: 4 << 30, Rate: 100 << 20}
	assert.Equal(t, "prepare    [=====>              ]  25%  disk disk0  100 MiB/s  rem 3.00 GiB  2s",
		statusLine(engine.PhasePrepare, 2*time.Second, nil, disk, 100))
}

func TestProgressBar(t *testing.T) {
	assert.Equal(t, "[          ]", progressBar(0, 100, 12))
	assert.Equal(t, "[=====>    ]", progressBar(50, 100, 12))
	assert.Equal(t, "[==========]", progressBar(100, 100, 12))
	assert.Equal(t, "[==========]", progressBar(200, 100, 12))
	assert.Equal(t, "[          ]", progressBar(5, 0, 12))
}

func TestFormatBytes(t *testing.T) {
	assert.Equal(t, "0 B", formatBytes(0))
	assert.Equal(t, "1023 B", formatBytes(1023))
	assert.Equal(t, "1.00 KiB", formatBytes(1024))
	assert.Equal(t, "1.50 GiB", formatBytes(3<<29))
	assert.Equal(t, "150 MiB", formatBytes(150<<20))
	assert.Equal(t, "12.5 MiB", formatBytes(25<<19))
	assert.Equal(t, "2048 TiB", formatBytes(2<<50))
	assert.Equal(t, "0 B/s", formatRate(math.Inf(-1)))
}

func TestResultOfAndExitCode(t *testing.T) {
	ok := resultOf(&engine.Result{Status: engine.StatusCompleted}, nil)
	assert.Equal(t, exitOK, exitCode(ok))

	bad := resultOf(nil, &engine.Error{Phase: engine.PhasePrepare, Side: engine.SideDestination, Op: "query-status",
		Err: errors.Join(engine.ErrBadInput, errors.New("destination is not waiting for an incoming migration (status running)"))})
	assert.Equal(t, engine.StatusFailed, bad.Status)
	assert.Equal(t, exitUsage, exitCode(bad))

	cfgErr := resultOf(nil, engine.ErrInvalidConfig)
	assert.Equal(t, exitUsage, exitCode(cfgErr))

	cancelled := resultOf(nil, cancelledErr())
	assert.Equal(t, engine.StatusCancelled, cancelled.Status)
	assert.Equal(t, exitFailed, exitCode(cancelled))

	// Cancelled while preparing: still exit 1, not 2.
	early := resultOf(nil, errors.Join(engine.ErrBadInput, cancelledErr()))
	assert.Equal(t, engine.StatusCancelled, early.Status)
	assert.Equal(t, exitFailed, exitCode(early))

	failed := resultOf(failedResult(), failedResult().Err)
	assert.Equal(t, exitFailed, exitCode(failed))

	// An error with a "completed" result is not a success.
	odd := resultOf(&engine.Result{Status: engine.StatusCompleted}, errors.New("boom"))
	assert.Equal(t, engine.StatusFailed, odd.Status)
	assert.Equal(t, exitFailed, exitCode(odd))
}

// An abort reads in words and ends with what would finish it, phrased with
// the flags; -v adds the arithmetic; --json keeps both apart.
func TestAbortDecisionRendered(t *testing.T) {
	d := strategy.Decision{Action: strategy.Abort, At: 9 * time.Second,
		Summary: "abort: the guest rewrites its 98.1 MiB faster than the link carries it, and no permitted lever can make it converge",
		Reason:  "auto: not converging: peaks ×1.00/iteration, last 98.6 MiB",
		Remedy:  &strategy.Remedy{Postcopy: true, MaxDowntime: 1600 * time.Millisecond}}
	assert.Equal(t, "abort: the guest rewrites its 98.1 MiB faster than the link carries it, and no permitted lever can make it converge; "+
		"would complete with --allow-postcopy, or with --max-downtime 1.6s", describeDecision(d, nil, false))
	assert.Contains(t, describeDecision(d, nil, true), "\n           auto: not converging")
	var out bytes.Buffer
	newJSONRenderer(&out).Event(engine.Event{Kind: engine.EventDecision, Elapsed: 9 * time.Second, Decision: &d})
	assert.JSONEq(t, `{"type":"decision","elapsed_ms":9000,"action":"abort","summary":"`+d.Summary+`","reason":"`+d.Reason+`",`+
		`"remedy":{"postcopy":true,"max_downtime_ms":1600,"text":"would complete with --allow-postcopy, or with --max-downtime 1.6s"}}`, out.String())
}
