package main

import (
	"fmt"
	"math"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/strategy"
)

// The Findings are computed from the runs: every figure, every comparison
// and its verdict. The hand-written text around them only says what a
// figure is; it states none.

// tcgCaveat warns when QEMU < 9.0's TCG dirty-logging bug may have touched
// the runs: a guest RAM of whole MiB is 256 KiB-aligned (commit 06a09e3:
// since then the testbed adds 8 KiB on those versions). Files that do not
// record the RAM QEMU got (RAMKiB) are judged by their date.
func (rp *report) tcgCaveat() string {
	var major int
	fmt.Sscan(strings.Split(rp.Version, ".")[0], &major)
	if major >= 9 || rp.MemMiB == 0 {
		return ""
	}
	aligned := rp.Date.Before(unalignedSince)
	if rp.RAMKiB > 0 {
		aligned = rp.RAMKiB%256 == 0
	}
	if !aligned {
		return ""
	}
	return fmt.Sprintf("QEMU before 9.0 under TCG may leave writes to a 256 KiB-aligned RAM block unlogged (commit 06a09e3), "+
		"and these runs' guest RAM (%d MiB) is so aligned: pages may have been lost that the integrity check does not see. Re-run before relying on them", rp.MemMiB)
}

// unalignedSince is when the testbed started giving TCG guests on QEMU
// before 9.0 8 KiB over whole MiB (commit 06a09e3).
var unalignedSince = time.Date(2026, 12, 5, 7, 28, 44, 0, time.UTC)

// hostLoadLine summarises the host's load over the section's runs.
func (rp *report) hostLoadLine() string {
	lo, hi := math.Inf(1), math.Inf(-1)
	others, rec := -1, 0
	for _, r := range rp.Runs {
		if r.Host == nil {
			continue
		}
		rec++
		for _, l := range []float64{r.Host.Load1Before, r.Host.Load1After} {
			if l >= 0 {
				lo, hi = math.Min(lo, l), math.Max(hi, l)
			}
		}
		others = max(others, r.Host.OtherQEMUs)
	}
	if rec == 0 {
		return "its load during the runs: not recorded (these runs were made before qmbench recorded it)"
	}
	s := "1-minute load average around the migrations "
	if lo <= hi {
		s += fmt.Sprintf("%.2f–%.2f", lo, hi)
	} else {
		s += "not readable"
	}
	if others >= 0 {
		s += fmt.Sprintf(", up to %d QEMU processes other than the run's own", others)
	}
	if rec < len(rp.Runs) {
		s += fmt.Sprintf(" (recorded for %d of %d runs)", rec, len(rp.Runs))
	}
	return s
}

// span formats a range of values ("3.4" or "3.4–5.2") with unit.
func span(vs []float64, format, unit string) string {
	if len(vs) == 0 {
		return "–"
	}
	lo, hi := slices.Min(vs), slices.Max(vs)
	a, b := fmt.Sprintf(format, lo), fmt.Sprintf(format, hi)
	if a == b {
		return a + unit
	}
	return a + "–" + b + unit
}

// row is one scenario and profile of one section.
type row struct {
	rp   *report
	sc   scenario
	pf   profile
	runs []*runResult
	v    verdict
}

func (r row) name() string { return r.sc.Name + " / " + r.pf.Name }

func allRows(groups []*report) []row {
	var rows []row
	for _, rp := range groups {
		scs, profs := rp.scenarios()
		for _, sc := range scs {
			for _, pf := range profs {
				runs := rp.runs(sc.Name, pf.Name)
				if len(runs) > 0 {
					rows = append(rows, row{rp, sc, pf, runs, judge(runs)})
				}
			}
		}
	}
	return rows
}

// runCell is a run in a comparison: its outcome, time, downtime and guest rate.
func runCell(r *runResult) string {
	s := fmt.Sprintf("%s %s", outcome(r), secs(r.Total))
	if r.Status == "completed" {
		s += fmt.Sprintf(", down %d ms", r.Downtime.Milliseconds())
	}
	return s + ", guest " + guestStr(r)
}

func pct(n, of int) string { return fmt.Sprintf("%d of %d", n, of) }

// findings renders the Findings section from every section's runs.
func findings(groups []*report) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	rows := allRows(groups)
	w("## Findings\n\n")
	w("Computed by the renderer from the runs in the sections below: every figure and every verdict here comes from\n")
	w("the raw results; the text only says what each one is. Every run is one sample on shared cores, where TCG\n")
	w("speed drifts from one minute to the next, so each comparison gives the rate each run's guest had (the mean\n")
	w("of its wall-clock dirty rates just before and just after the migration) and ⚠ flags a pair whose guests\n")
	w("differ by more than the noise bar of %.0f %%: such a pair compares the guests as much as the policies.\n\n", 100*noiseBar)

	w("### Sources\n\nThe raw results each section reads, in order: a run (scenario, profile, policy) found in several files is taken from the first, so a re-run listed first replaces the older runs, which only the downtime count below still reads.\n\n")
	w("| section | raw results | runs shown, of those read | host load |\n|---|---|---|---|\n")
	for _, rp := range groups {
		var fs []string
		for _, f := range rp.Files {
			fs = append(fs, fmt.Sprintf("`%s` (%s)", path.Base(f.Name), f.Date.UTC().Format("2006-01-02")))
		}
		w("| QEMU %s | %s | %d of %d | %s |\n", rp.sectionID(), strings.Join(fs, ", "), len(rp.Runs), len(rp.All), rp.hostLoadLine())
	}
	for _, rp := range groups {
		if c := rp.tcgCaveat(); c != "" {
			w("\n**Caveat, QEMU %s**: %s.\n", rp.sectionID(), c)
		}
	}
	w("\n")

	// Completions and integrity per policy and section.
	w("### Completions\n\nCompleted runs of each policy over the scenario/profile pairs of each section (postcopy completions included), and how many of its runs left the guest intact where it runs.\n\n")
	w("| policy |")
	for _, rp := range groups {
		w(" QEMU %s |", rp.sectionID())
	}
	w("\n|---|")
	for range groups {
		w("---|")
	}
	w("\n")
	for _, pol := range strategy.Policies() {
		w("| %s |", pol)
		for _, rp := range groups {
			n, done, intact := 0, 0, 0
			for _, r := range rp.Runs {
				if r.Policy != pol {
					continue
				}
				n++
				if r.Status == "completed" {
					done++
				}
				if r.Intact {
					intact++
				}
			}
			if n == 0 {
				w(" – |")
				continue
			}
			w(" %s completed, %s intact |", pct(done, n), pct(intact, n))
		}
		w("\n")
	}
	var notDone []string
	autoRuns := 0
	for _, r := range rows {
		if r.v.Auto == nil {
			continue
		}
		autoRuns++
		if r.v.Auto.Status != "completed" {
			notDone = append(notDone, fmt.Sprintf("%s on QEMU %s (%s at %s)", r.name(), r.rp.sectionID(), outcome(r.v.Auto), secs(r.v.Auto.Total)))
		}
	}
	w("\nauto completed %s of its runs", pct(autoRuns-len(notDone), autoRuns))
	if len(notDone) > 0 {
		w("; not: %s", strings.Join(notDone, "; "))
	}
	w(".")
	// Every run read, replaced ones too: more samples of a configuration.
	var parts []string
	for _, rp := range groups {
		n, done := 0, 0
		for _, r := range rp.All {
			if r.Policy == strategy.PolicyAuto {
				n++
				if r.Status == "completed" {
					done++
				}
			}
		}
		if n > len(rp.runsOf(strategy.PolicyAuto)) {
			parts = append(parts, fmt.Sprintf("%s on QEMU %s", pct(done, n), rp.sectionID()))
		}
	}
	if len(parts) > 0 {
		w(" Counting every run read, replaced ones included (older code among them), auto completed %s.", strings.Join(parts, "; "))
	}
	w("\n\n")

	// The goal, row by row.
	w("### auto against the best anchor preset\n\n")
	w("Per scenario and profile: auto's run against the fastest anchor preset's run that completed; the time ratio and its verdict; the guest work each lost (slowdown × time); and the goal of the issue (on the hard scenarios, dirty rate ≥ link: at most %s the time, with less guest slowdown; or, last column, less work lost).\n\n", goalRatioText)
	w("| section | scenario / profile | auto | best anchor | time | work lost (auto vs best) | guests | goal | goal by work lost |\n|---|---|---|---|---|---|---|---|---|\n")
	hard, met, metLost, flagged, compared := 0, 0, 0, 0, 0
	for _, r := range rows {
		v := r.v
		auto, best, tm, lostCmp := "not run", "none completes", "–", "–"
		if v.Auto != nil {
			auto = runCell(v.Auto)
		}
		if v.Best != nil {
			best = v.Best.Policy + ": " + runCell(v.Best)
		}
		if v.Auto != nil && v.Best != nil && v.Auto.Status == "completed" {
			tm = fmt.Sprintf("%.2f×, %s", v.Auto.Total.Seconds()/v.Best.Total.Seconds(), timeVerdict(v.Auto.Total, v.Best.Total))
			if la, lb := lostSecs(v.Auto), lostSecs(v.Best); !math.IsNaN(la) && !math.IsNaN(lb) {
				word := "less"
				if la > lb {
					word = "more"
				}
				lostCmp = fmt.Sprintf("%.1f s vs %.1f s: %s", la, lb, word)
			}
		}
		guests := "–"
		if v.Auto != nil && v.Best != nil {
			compared++
			guests = guestPair(v.Auto, v.Best)
			if rateGap(guestRate(v.Auto), guestRate(v.Best)) > noiseBar {
				flagged++
			}
		}
		if r.sc.hard() {
			hard++
			if v.Met {
				met++
			}
			if v.MetLost {
				metLost++
			}
		}
		w("| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.rp.sectionID(), r.name(), auto, best, tm, lostCmp, guests, v.goalText(r.sc, v.Met), v.goalText(r.sc, v.MetLost))
	}
	w("\nOn the hard scenarios auto met the goal in %s rows, judged by work lost in %s; %s comparisons are flagged ⚠.\n\n",
		pct(met, hard), pct(metLost, hard), pct(flagged, compared))

	// Work lost where auto and an anchor both completed, hard rows.
	w("### Guest work lost on the hard scenarios\n\n")
	less, both := 0, 0
	var more []string
	for _, r := range rows {
		v := r.v
		if !r.sc.hard() || v.Auto == nil || v.Best == nil || v.Auto.Status != "completed" {
			continue
		}
		la, lb := lostSecs(v.Auto), lostSecs(v.Best)
		if math.IsNaN(la) || math.IsNaN(lb) {
			continue
		}
		both++
		if la <= lb {
			less++
		} else {
			more = append(more, fmt.Sprintf("%s on QEMU %s (%.1f s vs %s's %.1f s; %s)", r.name(), r.rp.sectionID(), la, v.Best.Policy, lb, guestPair(v.Auto, v.Best)))
		}
	}
	w("Where auto and an anchor both completed, auto lost no more guest work than the best anchor in %s rows", pct(less, both))
	if len(more) > 0 {
		w("; more in: %s", strings.Join(more, "; "))
	}
	w(".\n\n")
	w("Guest work lost by each policy's postcopy completions on the hard scenarios (seconds of the guest's normal progress, range over the sections' rows):\n\n| policy | work lost | runs | guests |\n|---|---|---|---|\n")
	for _, pol := range strategy.Policies() {
		var lost, rates []float64
		for _, r := range rows {
			if !r.sc.hard() {
				continue
			}
			for _, x := range r.runs {
				if x.Policy == pol && x.Status == "completed" && x.Postcopy && !math.IsNaN(lostSecs(x)) {
					lost = append(lost, lostSecs(x))
					rates = append(rates, guestRate(x)/1e6)
				}
			}
		}
		if len(lost) > 0 {
			w("| %s | %s | %d | %s |\n", pol, span(lost, "%.1f", " s"), len(lost), span(rates, "%.1f", " MB/s"))
		}
	}
	w("\n")

	// Downtime against the ceiling, pre-copy completions.
	w("### Downtime against the ceiling\n\n")
	w("QEMU's own downtime figure of every pre-copy completion (postcopy's switchover pause is not comparable) against the section's downtime ceiling: how many exceeded it, and by how much at most.\n\n")
	w("| policy |")
	for _, rp := range groups {
		w(" QEMU %s (ceiling %d ms) |", rp.sectionID(), rp.maxDowntime().Milliseconds())
	}
	w("\n|---|")
	for range groups {
		w("---|")
	}
	w("\n")
	totalN, totalOver, autoOver := 0, 0, 0
	for _, pol := range strategy.Policies() {
		w("| %s |", pol)
		for _, rp := range groups {
			n, over := 0, 0
			var by []float64
			var downs []float64
			for _, r := range rp.Runs {
				if r.Policy != pol || r.Status != "completed" || r.Postcopy {
					continue
				}
				n++
				downs = append(downs, float64(r.Downtime.Milliseconds()))
				if d := r.Downtime - rp.maxDowntime(); d > 0 {
					over++
					by = append(by, float64(d.Milliseconds()))
				}
			}
			totalN += n
			totalOver += over
			if pol == strategy.PolicyAuto {
				autoOver += over
			}
			switch {
			case n == 0:
				w(" – |")
			case over == 0:
				w(" %s over; downtime %s |", pct(0, n), span(downs, "%.0f", " ms"))
			default:
				w(" %s over, by up to %.0f ms; downtime %s |", pct(over, n), slices.Max(by), span(downs, "%.0f", " ms"))
			}
		}
		w("\n")
	}
	w("\nOver all sections, %s pre-copy completions exceeded their ceiling, %d of them auto's.", pct(totalOver, totalN), autoOver)
	// Every run read, the replaced ones too: more samples of the same
	// configurations (older code among them).
	allN, allOver := 0, 0
	var autoParts []string
	for _, rp := range groups {
		an, ao := 0, 0
		for _, r := range rp.All {
			if r.Status != "completed" || r.Postcopy {
				continue
			}
			allN++
			over := r.Downtime > rp.maxDowntime()
			if over {
				allOver++
			}
			if r.Policy == strategy.PolicyAuto {
				an++
				if over {
					ao++
				}
			}
		}
		if an > 0 {
			autoParts = append(autoParts, fmt.Sprintf("%s on QEMU %s", pct(ao, an), rp.sectionID()))
		}
	}
	w(" Counting every run read, replaced ones included (older code among them): %s pre-copy completions over their ceiling; auto's: %s.\n\n",
		pct(allOver, allN), strings.Join(autoParts, ", "))
	return b.String()
}

// runsOf are the section's runs of one policy.
func (rp *report) runsOf(policy string) []*runResult {
	var out []*runResult
	for _, r := range rp.Runs {
		if r.Policy == policy {
			out = append(out, r)
		}
	}
	return out
}
