package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

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
		{Kind: engine.EventLimits, Elapsed: 3000 * time.Millisecond, Limits: &engine.Limits{Bandwidth: 1 << 30,
			MaxDowntime: 800 * time.Millisecond, Budget: 2 * time.Minute, DowntimeLimit: 500 * time.Millisecond}},
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

// A limit changed mid-flight (engine.EventLimits) is a "limits" line with
// every field; an unlimited bandwidth and the default maximum downtime are
// written as the help says (0, 300).
func TestJSONLimitsLine(t *testing.T) {
	var out bytes.Buffer
	r := newJSONRenderer(&out)
	r.Event(engine.Event{Kind: engine.EventLimits, Elapsed: 1500 * time.Millisecond,
		Limits: &engine.Limits{Bandwidth: engine.UnlimitedBandwidth, DowntimeLimit: 100 * time.Millisecond}})
	r.Event(engine.Event{Kind: engine.EventLimits}) // no Limits: no line
	var m map[string]any
	require.NoError(t, json.Unmarshal(out.Bytes(), &m), out.String())
	assert.Equal(t, map[string]any{"type": "limits", "elapsed_ms": 1500.0, "bandwidth_bps": 0.0, "max_downtime_ms": 300.0,
		"budget_ms": 0.0, "downtime_limit_ms": 100.0}, m)
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

// The live line's text after each event (the bar is mpb's), with the
// lines printed above it, at full width and at a narrow one.
func TestLiveLineGolden(t *testing.T) {
	events, _ := sampleRun()
	var st liveState
	var b strings.Builder
	for _, ev := range events {
		if above := st.apply(ev); above != "" {
			b.WriteString(above + "\n")
		}
		if ev.Kind == engine.EventResult {
			continue
		}
		fmt.Fprintf(&b, "%s [bar] %s\n", st.head(), st.tail(0))
		narrow := st.tail(30)
		assert.LessOrEqual(t, len(narrow), 30, narrow)
		fmt.Fprintf(&b, "%s [bar] %s\n", st.head(), narrow)
	}
	golden(t, "term.txt", b.String())
	// A disk said ready once, however many polls repeat it.
	assert.Equal(t, 1, strings.Count(b.String(), "ready\n"))
}

// What fields go first when the line is narrow: the percent, rate and
// remaining stay longest.
func TestLiveTailNarrow(t *testing.T) {
	st := liveState{phase: engine.PhaseConverge, elapsed: 1500 * time.Millisecond, decisions: 2, stats: &engine.Stats{
		Iteration: 2, TransferredBytes: 75 << 20, RemainingBytes: 25 << 20, Throughput: 1 << 30,
		ExpectedDowntime: 300 * time.Millisecond, ThrottlePercent: 20}}
	assert.Equal(t, " 75%  1.00 GiB/s  rem 25.0 MiB  downtime ~300ms  pass 2  throttle 20%  2 decisions  1.5s", st.tail(0))
	assert.Equal(t, " 75%  1.00 GiB/s  rem 25.0 MiB  throttle 20%  2 decisions  1.5s", st.tail(63))
	assert.Equal(t, " 75%  1.00 GiB/s  rem 25.0 MiB", st.tail(31))
	assert.Equal(t, " 75%", st.tail(3), "the percent is kept even when nothing fits")
	assert.Equal(t, "1.5s", (&liveState{elapsed: 1500 * time.Millisecond}).tail(0))
	disk := &liveState{phase: engine.PhasePrepare, elapsed: 2 * time.Second,
		disk: &blockmirror.Progress{Node: "disk0", Done: 1 << 30, Total: 4 << 30, Rate: 100 << 20}}
	assert.Equal(t, " 25%  disk disk0  100 MiB/s  rem 3.00 GiB  2s", disk.tail(0))
}

// The renderer on a (fixed-width) terminal: decisions and notes above the
// live line, each once and in order; the live line drawn by mpb, never
// wider than the terminal; removed at the end, the summary last.
func TestTermRendererDraws(t *testing.T) {
	events, res := sampleRun()
	var out syncBuffer
	r := &termRenderer{w: &out, width: 100}
	r.Message("migrating a -> b")
	for _, ev := range events {
		r.Event(ev)
	}
	r.Result(res, nil)
	got := out.String()
	lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	assert.Equal(t, "completed in 4.7s: downtime 48ms, 240 MiB transferred, 2 decisions; the guest runs on the destination",
		lines[len(lines)-1])
	var above []string
	live := 0
	for _, l := range lines[:len(lines)-1] {
		switch {
		case strings.HasPrefix(l, "[") || strings.HasPrefix(l, "migrating"):
			above = append(above, l)
		default:
			live++
			assert.LessOrEqual(t, utf8.RuneCountInString(l), 100, l)
			assert.Regexp(t, `^(prepare|start|converge|switchover|complete) `, l)
		}
	}
	require.Len(t, above, 5, got)
	assert.Equal(t, "migrating a -> b", above[0])
	assert.Contains(t, above[1], "disk disk0 (qmigrate-mirror-disk0)")
	assert.Contains(t, above[2], "downtime limit 500ms")
	assert.Contains(t, above[3], "limits now: bandwidth 1.00 GiB/s, max downtime 800ms, budget 2m0s")
	assert.Contains(t, above[4], "decision set-throttle")
	assert.Positive(t, live, "the live line was drawn at least once")

	// Nothing started: no live line and no summary (the error on stderr
	// says it).
	var empty syncBuffer
	(&termRenderer{w: &empty, width: 80}).Result(failedResult(), nil)
	assert.Empty(t, empty.String())
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
