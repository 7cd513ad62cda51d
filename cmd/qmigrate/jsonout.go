package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/strategy"
)

// The --json output: one object per line, each with a "type". The field
// names below are a contract (see the migrate help text); add fields, never
// rename or remove them.

type jsonPhase struct {
	Type      string `json:"type"`
	Phase     string `json:"phase"`
	ElapsedMS int64  `json:"elapsed_ms"`
}

type jsonStats struct {
	Type                  string `json:"type"`
	ElapsedMS             int64  `json:"elapsed_ms"`
	Status                string `json:"status"`
	Iteration             uint64 `json:"iteration"`
	TransferredBytes      uint64 `json:"transferred_bytes"`
	RemainingBytes        uint64 `json:"remaining_bytes"`
	TotalBytes            uint64 `json:"total_bytes"`
	DirtyRateBPS          uint64 `json:"dirty_rate_bps"`
	GuestDirtyRateBPS     uint64 `json:"guest_dirty_rate_bps"` // calc-dirty-rate's measurement, 0 until measured
	ThroughputBPS         uint64 `json:"throughput_bps"`
	ExpectedDowntimeMS    int64  `json:"expected_downtime_ms"`
	ThrottlePct           int    `json:"throttle_pct"`
	DowntimeLimitMS       int64  `json:"downtime_limit_ms"`
	StorageRemainingBytes uint64 `json:"storage_remaining_bytes"`
	StorageTotalBytes     uint64 `json:"storage_total_bytes"`
}

type jsonThrottle struct {
	Initial   int `json:"initial"`
	Increment int `json:"increment"`
	Max       int `json:"max"`
}

// jsonRemedy is an abort's remedy: what would have finished the migration.
type jsonRemedy struct {
	Postcopy      bool   `json:"postcopy,omitempty"`
	Pause         bool   `json:"pause,omitempty"`
	Throttle      bool   `json:"throttle,omitempty"`
	WriteBlocking bool   `json:"write_blocking,omitempty"`
	MaxDowntimeMS int64  `json:"max_downtime_ms,omitempty"`
	BandwidthBPS  uint64 `json:"bandwidth_bps,omitempty"`
	Text          string `json:"text,omitempty"` // in words, with flag names
}

func remedyOf(r *strategy.Remedy) *jsonRemedy {
	if r == nil {
		return nil
	}
	return &jsonRemedy{Postcopy: r.Postcopy, Pause: r.Pause, Throttle: r.Throttle, WriteBlocking: r.WriteBlocking,
		MaxDowntimeMS: ms(r.MaxDowntime), BandwidthBPS: rate(r.Bandwidth), Text: remedyFlags(r)}
}

type jsonDecision struct {
	Type      string `json:"type"`
	ElapsedMS int64  `json:"elapsed_ms"`
	Action    string `json:"action"`
	// Summary is the decision in words; Reason its arithmetic.
	Summary         string        `json:"summary,omitempty"`
	Reason          string        `json:"reason"`
	Remedy          *jsonRemedy   `json:"remedy,omitempty"`
	DowntimeLimitMS *int64        `json:"downtime_limit_ms,omitempty"`
	Throttle        *jsonThrottle `json:"throttle,omitempty"`
	Error           string        `json:"error,omitempty"`
}

// jsonRecovery is a step of a postcopy recovery.
type jsonRecovery struct {
	Type      string `json:"type"` // "recovery"
	ElapsedMS int64  `json:"elapsed_ms"`
	Step      string `json:"step"` // link-lost, attempt, failed, recovered, gave-up
	Loss      int    `json:"loss"`
	Attempt   int    `json:"attempt"`
	Detail    string `json:"detail,omitempty"`
	StalledMS int64  `json:"stalled_ms"`
	BackoffMS int64  `json:"backoff_ms,omitempty"`
}

type jsonDisk struct {
	Type       string `json:"type"`
	Node       string `json:"node"`
	Job        string `json:"job"`
	DoneBytes  uint64 `json:"done_bytes"`
	TotalBytes uint64 `json:"total_bytes"`
	RateBPS    uint64 `json:"rate_bps"`
	Ready      bool   `json:"ready"`
}

// jsonLimits is a change of the limits in force (engine.EventLimits).
type jsonLimits struct {
	Type            string `json:"type"`
	ElapsedMS       int64  `json:"elapsed_ms"`
	BandwidthBPS    uint64 `json:"bandwidth_bps"` // 0: unlimited
	MaxDowntimeMS   int64  `json:"max_downtime_ms"`
	BudgetMS        int64  `json:"budget_ms"` // 0: none
	DowntimeLimitMS int64  `json:"downtime_limit_ms"`
}

// jsonResultDecision is one entry of the result's "decisions".
type jsonResultDecision struct {
	Action          string        `json:"action"`
	Summary         string        `json:"summary,omitempty"`
	Reason          string        `json:"reason"`
	Remedy          *jsonRemedy   `json:"remedy,omitempty"`
	AtMS            int64         `json:"at_ms"`
	DowntimeLimitMS *int64        `json:"downtime_limit_ms,omitempty"`
	Throttle        *jsonThrottle `json:"throttle,omitempty"`
}

type jsonResult struct {
	Type       string `json:"type"`
	Status     string `json:"status"`
	TotalMS    int64  `json:"total_ms"`
	DowntimeMS int64  `json:"downtime_ms"` // QEMU's figure (engine.Result.Downtime)
	// The user's maximum and whether the downtime held within it
	// (completed migrations only).
	MaxDowntimeMS    int64                `json:"max_downtime_ms,omitempty"`
	DowntimeHeld     *bool                `json:"downtime_held,omitempty"`
	TransferredBytes uint64               `json:"transferred_bytes"`
	Decisions        []jsonResultDecision `json:"decisions"`
	Error            string               `json:"error,omitempty"`
	Undone           []string             `json:"undone"`
	UndoErrors       []string             `json:"undo_errors"`
	// Only when the engine could not tell where the guest runs.
	StateUnknown bool `json:"state_unknown,omitempty"`
	// Only for a postcopy that could not be finished: "guest_lost" (the
	// destination QEMU went away), "pages_lost" (the source QEMU went
	// away), "postcopy_paused" (not recovered in time, both left paused).
	State string `json:"state,omitempty"`
	// Postcopy recoveries after a lost link, and how long the guest
	// stalled for them.
	Recoveries      int   `json:"recoveries,omitempty"`
	PostcopyStallMS int64 `json:"postcopy_stall_ms,omitempty"`
	// Demo only: what the check of the guest on the destination found.
	Verified *bool  `json:"verified,omitempty"`
	Verdict  string `json:"verdict,omitempty"`
}

func ms(d time.Duration) int64 { return d.Milliseconds() }

// rate turns a float rate into a whole number, 0 for NaN, negatives and
// infinities (encoding/json refuses NaN).
func rate(f float64) uint64 {
	if math.IsNaN(f) || f <= 0 {
		return 0
	}
	if f >= math.MaxUint64 {
		return math.MaxUint64
	}
	return uint64(math.Round(f))
}

func decisionDetails(d strategy.Decision) (*int64, *jsonThrottle) {
	var dl *int64
	var th *jsonThrottle
	if d.Action == strategy.SetDowntime || d.DowntimeLimit > 0 {
		v := ms(d.DowntimeLimit)
		dl = &v
	}
	if d.Action == strategy.SetThrottle || d.Throttle != (strategy.Throttle{}) {
		th = &jsonThrottle{Initial: d.Throttle.Initial, Increment: d.Throttle.Increment, Max: d.Throttle.Max}
	}
	return dl, th
}

// jsonEvent returns the line object for an event, or nil for events that have
// no line of their own (the result is written by jsonResultOf).
func jsonEvent(ev engine.Event) any {
	switch ev.Kind {
	case engine.EventPhase:
		return jsonPhase{Type: "phase", Phase: string(ev.Phase), ElapsedMS: ms(ev.Elapsed)}
	case engine.EventStats:
		if ev.Stats == nil {
			return nil
		}
		s := ev.Stats
		return jsonStats{
			Type: "stats", ElapsedMS: ms(ev.Elapsed), Status: s.Status, Iteration: s.Iteration,
			TransferredBytes: s.TransferredBytes, RemainingBytes: s.RemainingBytes, TotalBytes: s.TotalBytes,
			DirtyRateBPS: rate(s.DirtyRate), GuestDirtyRateBPS: rate(s.GuestDirtyRate), ThroughputBPS: rate(s.Throughput),
			ExpectedDowntimeMS: ms(s.ExpectedDowntime), ThrottlePct: s.ThrottlePercent,
			DowntimeLimitMS:       ms(s.DowntimeLimit),
			StorageRemainingBytes: s.StorageRemaining, StorageTotalBytes: s.StorageTotal,
		}
	case engine.EventDecision:
		if ev.Decision == nil {
			return nil
		}
		d := ev.Decision
		dl, th := decisionDetails(*d)
		j := jsonDecision{Type: "decision", ElapsedMS: ms(ev.Elapsed), Action: string(d.Action), Summary: d.Summary, Reason: d.Reason,
			Remedy: remedyOf(d.Remedy), DowntimeLimitMS: dl, Throttle: th}
		if ev.DecisionErr != nil {
			j.Error = ev.DecisionErr.Error()
		}
		return j
	case engine.EventDisk:
		if ev.Disk == nil {
			return nil
		}
		p := ev.Disk
		return jsonDisk{Type: "disk", Node: p.Node, Job: p.Job, DoneBytes: p.Done, TotalBytes: p.Total,
			RateBPS: rate(p.Rate), Ready: p.Ready}
	case engine.EventLimits:
		if ev.Limits == nil {
			return nil
		}
		l := ev.Limits
		bw := l.Bandwidth
		if bw >= engine.UnlimitedBandwidth {
			bw = 0
		}
		return jsonLimits{Type: "limits", ElapsedMS: ms(ev.Elapsed), BandwidthBPS: bw, MaxDowntimeMS: ms(maxDowntimeOf(l)),
			BudgetMS: ms(l.Budget), DowntimeLimitMS: ms(l.DowntimeLimit)}
	case engine.EventRecovery:
		if ev.Recovery == nil {
			return nil
		}
		rc := ev.Recovery
		return jsonRecovery{Type: "recovery", ElapsedMS: ms(ev.Elapsed), Step: string(rc.Step), Loss: rc.Loss,
			Attempt: rc.Attempt, Detail: rc.Detail, StalledMS: ms(rc.Stalled), BackoffMS: ms(rc.Backoff)}
	}
	return nil
}

// maxDowntimeOf is the maximum downtime in force (0 means the default).
func maxDowntimeOf(l *engine.Limits) time.Duration {
	if l.MaxDowntime == 0 {
		return defaultMaxDowntime
	}
	return l.MaxDowntime
}

// jsonResultOf builds the result line. r is never nil (see resultOf).
func jsonResultOf(r *engine.Result) jsonResult {
	j := jsonResult{
		Type: "result", Status: r.Status, TotalMS: ms(r.Total), DowntimeMS: ms(r.Downtime),
		TransferredBytes: r.TransferredBytes,
		Decisions:        make([]jsonResultDecision, 0, len(r.Decisions)),
		Undone:           append(make([]string, 0, len(r.Undone)), r.Undone...),
		UndoErrors:       append(make([]string, 0, len(r.UndoErrors)), r.UndoErrors...),
		StateUnknown:     r.StateUnknown,
		State:            string(r.Lost),
		Recoveries:       r.Recoveries,
		PostcopyStallMS:  ms(r.PostcopyStall),
	}
	for _, d := range r.Decisions {
		dl, th := decisionDetails(d)
		j.Decisions = append(j.Decisions, jsonResultDecision{Action: string(d.Action), Summary: d.Summary, Reason: d.Reason,
			Remedy: remedyOf(d.Remedy), AtMS: ms(d.At), DowntimeLimitMS: dl, Throttle: th})
	}
	if r.Status == engine.StatusCompleted && r.MaxDowntime > 0 {
		held := r.DowntimeHeld
		j.MaxDowntimeMS, j.DowntimeHeld = ms(r.MaxDowntime), &held
	}
	if r.Status != engine.StatusCompleted && r.Err != nil {
		j.Error = r.Err.Error()
	}
	return j
}

// jsonRenderer writes one JSON object per line and nothing else.
type jsonRenderer struct {
	enc   *json.Encoder
	notes io.Writer // human messages go here (stderr), never to stdout
}

func newJSONRenderer(w io.Writer) *jsonRenderer {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return &jsonRenderer{enc: enc}
}

func (r *jsonRenderer) Event(ev engine.Event) {
	if v := jsonEvent(ev); v != nil {
		_ = r.enc.Encode(v)
	}
}

func (r *jsonRenderer) Message(s string) {
	if r.notes != nil {
		fmt.Fprintln(r.notes, s)
	}
}

func (r *jsonRenderer) Result(res *engine.Result, demo *demoVerdict) {
	j := jsonResultOf(res)
	if demo != nil {
		ok := demo.OK
		j.Verified = &ok
		j.Verdict = demo.Text
		if !ok && j.Error == "" {
			j.Error = demo.Text
		}
	}
	_ = r.enc.Encode(j)
}
