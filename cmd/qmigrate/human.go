package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/strategy"
)

// renderer shows a migration to the user as it runs.
type renderer interface {
	// Event shows one engine event (the result event is ignored: Result
	// shows the outcome).
	Event(engine.Event)
	// Message shows a human note (the demo's steps).
	Message(string)
	// Result shows the outcome, last. demo is nil outside the demo.
	Result(res *engine.Result, demo *demoVerdict)
}

// demoVerdict is what the demo's check of the destination guest found.
type demoVerdict struct {
	OK   bool
	Text string
}

// newRenderer picks the output: JSON lines, a live line on a terminal, or
// plain log lines. With verbose debug logs on stderr there is no live line:
// on a terminal the logs would be written into it.
func newRenderer(jsonOut, verbose bool, stdout, stderr io.Writer) renderer {
	if jsonOut {
		r := newJSONRenderer(stdout)
		r.notes = stderr
		return r
	}
	if width, ok := terminalWidth(stdout); ok && !verbose {
		return &termRenderer{w: stdout, width: width, resize: true}
	}
	return &plainRenderer{w: stdout, verbose: verbose}
}

// formatBytes renders a byte count with binary units: "512 B", "1.5 GiB".
func formatBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		v /= unit
		if v < unit || u == "TiB" {
			if v < 10 {
				return fmt.Sprintf("%.2f %s", v, u)
			}
			if v < 100 {
				return fmt.Sprintf("%.1f %s", v, u)
			}
			return fmt.Sprintf("%.0f %s", v, u)
		}
	}
	return fmt.Sprintf("%d B", n) // not reached
}

func formatRate(bps float64) string { return formatBytes(rate(bps)) + "/s" }

// formatDuration rounds for display: 45ms, 1.2s, 2m3s.
func formatDuration(d time.Duration) string {
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	default:
		return d.Round(time.Second).String()
	}
}

func formatElapsed(d time.Duration) string {
	return fmt.Sprintf("[%7.1fs]", d.Seconds())
}

// describeDecision is one line for a decision in words: the strategy's
// Summary ("throttle 95%: the guest rewrites its 99 MiB faster than the link
// carries it"), on an abort what would finish it in flags, and with verbose
// the arithmetic (its Reason) on the next line. A decision without a Summary
// reads "decision set-downtime 500ms: reason".
func describeDecision(d strategy.Decision, err error, verbose bool) string {
	if d.Summary == "" {
		return describeDecisionReason(d, err)
	}
	var b strings.Builder
	b.WriteString(d.Summary)
	if r := remedyFlags(d.Remedy); r != "" {
		b.WriteString("; ")
		b.WriteString(r)
	}
	if err != nil {
		fmt.Fprintf(&b, " (failed: %v)", err)
	}
	if verbose && d.Reason != "" {
		b.WriteString("\n           ")
		b.WriteString(d.Reason)
	}
	return b.String()
}

// remedyFlags phrases an abort's remedy with the flags that give it:
// "would complete with --allow-postcopy, or with --max-downtime 1.6s".
func remedyFlags(r *strategy.Remedy) string {
	if r == nil {
		return ""
	}
	var alts []string
	if r.Postcopy {
		alts = append(alts, "--allow-postcopy")
	}
	if r.MaxDowntime > 0 {
		alts = append(alts, "--max-downtime "+formatDuration(r.MaxDowntime))
	}
	if r.Throttle {
		alts = append(alts, "CPU throttling (without --no-auto-converge)")
	}
	if r.Bandwidth > 0 {
		alts = append(alts, "--bandwidth "+strings.ReplaceAll(formatRate(r.Bandwidth), " ", "")+" on a link that carries it")
	}
	if r.Pause {
		alts = append(alts, "--allow-pause (the guest stops for the rest of the copy)")
	}
	if r.WriteBlocking {
		alts = append(alts, "write-blocking disk mirrors permitted")
	}
	if len(alts) == 0 {
		return ""
	}
	return "would complete with " + strings.Join(alts, ", or with ")
}

// describeDecisionReason is the line of a decision without words: its
// action, its values and its reason.
func describeDecisionReason(d strategy.Decision, err error) string {
	var b strings.Builder
	b.WriteString("decision ")
	b.WriteString(string(d.Action))
	switch d.Action {
	case strategy.SetDowntime:
		fmt.Fprintf(&b, " %s", formatDuration(d.DowntimeLimit))
	case strategy.SetThrottle:
		fmt.Fprintf(&b, " initial %d%% +%d%% max %d%%", d.Throttle.Initial, d.Throttle.Increment, d.Throttle.Max)
	}
	if d.Reason != "" {
		b.WriteString(": ")
		b.WriteString(d.Reason)
	}
	if err != nil {
		fmt.Fprintf(&b, " (failed: %v)", err)
	}
	return b.String()
}

func describeStats(s *engine.Stats) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: pass %d, %s sent, %s remaining of %s, %s, dirty %s, expected downtime %s (limit %s), throttle %d%%",
		s.Status, s.Iteration, formatBytes(s.TransferredBytes), formatBytes(s.RemainingBytes),
		formatBytes(s.TotalBytes), formatRate(s.Throughput), formatRate(s.DirtyRate),
		formatDuration(s.ExpectedDowntime), formatDuration(s.DowntimeLimit), s.ThrottlePercent)
	if s.StorageTotal > 0 {
		fmt.Fprintf(&b, ", disks %s remaining of %s", formatBytes(s.StorageRemaining), formatBytes(s.StorageTotal))
	}
	return b.String()
}

// describeLimits is the line for a change of the limits in force.
func describeLimits(l *engine.Limits) string {
	bw := "unlimited"
	if l.Bandwidth > 0 && l.Bandwidth < engine.UnlimitedBandwidth {
		bw = formatRate(float64(l.Bandwidth))
	}
	budget := "none"
	if l.Budget > 0 {
		budget = formatDuration(l.Budget)
	}
	return fmt.Sprintf("limits now: bandwidth %s, max downtime %s, budget %s, downtime limit %s",
		bw, formatDuration(maxDowntimeOf(l)), budget, formatDuration(l.DowntimeLimit))
}

func describeDisk(p *blockmirror.Progress) string {
	state := "mirroring"
	if p.Ready {
		state = "ready"
	}
	pct := 0.0
	if p.Total > 0 {
		pct = 100 * float64(p.Done) / float64(p.Total)
	}
	return fmt.Sprintf("disk %s (%s): %s of %s (%.0f%%), %s, %s", p.Node, p.Job,
		formatBytes(p.Done), formatBytes(p.Total), pct, formatRate(p.Rate), state)
}

// summary is the closing lines for a result.
func summary(r *engine.Result, demo *demoVerdict) []string {
	var lines []string
	plural := "s"
	if len(r.Decisions) == 1 {
		plural = ""
	}
	switch r.Status {
	case engine.StatusCompleted:
		lines = append(lines, fmt.Sprintf("completed in %s: downtime %s, %s transferred, %d decision%s; the guest runs on the destination",
			formatDuration(r.Total), formatDuration(r.Downtime), formatBytes(r.TransferredBytes), len(r.Decisions), plural))
		if r.Recoveries > 0 {
			lines = append(lines, fmt.Sprintf("postcopy's link was lost and recovered %d time(s); the guest stalled %s in all", r.Recoveries, formatDuration(r.PostcopyStall)))
		}
	default:
		// The error itself goes to stderr (see finish).
		lines = append(lines, fmt.Sprintf("%s after %s", r.Status, formatDuration(r.Total)))
		if len(r.Undone) > 0 {
			lines = append(lines, "rolled back: "+strings.Join(r.Undone, "; "))
		}
		if len(r.UndoErrors) > 0 {
			lines = append(lines, "rollback problems: "+strings.Join(r.UndoErrors, "; "))
		}
		switch {
		case r.StateUnknown:
			lines = append(lines, "where the guest runs is unknown: check both QEMUs")
		case r.Lost == engine.GuestLost:
			lines = append(lines, "GUEST LOST: the destination QEMU went away in postcopy; the source's stale copy is left paused (never resume it)")
		case r.Lost == engine.PagesLost:
			lines = append(lines, "GUEST'S MISSING PAGES LOST: the source QEMU went away in postcopy; the destination holds the guest, stalled on them")
		case r.Lost == engine.PostcopyPaused:
			lines = append(lines, "postcopy paused, not recovered: both QEMUs left in postcopy-paused (the destination holds the guest, the source its missing pages); qmigrate adopt can retry the recovery")
		case errors.Is(r.Err, engine.ErrPostcopyFailed):
			lines = append(lines, "the failure came during postcopy: the guest's state is split between source and destination")
		case !isBadInput(r.Err):
			lines = append(lines, "the guest runs on the source")
		}
	}
	if demo != nil {
		lines = append(lines, demo.Text)
	}
	return lines
}
