package main

import (
	"fmt"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/strategy"
)

// baselineFindings compares auto's runs with its own runs in the baseline
// files (-baseline: runs made before a change of auto, here the downtime
// headroom), section by section (same QEMU version and configuration),
// scenario and profile: what the change cost in completions and time, and
// what it did to the downtime against the ceiling. Like the rest of the
// Findings, every figure is computed from the runs.
func baselineFindings(groups, base []*report) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("### auto against its baseline runs\n\n")
	var files []string
	for _, bp := range base {
		for _, f := range bp.Files {
			files = append(files, "`"+path.Base(f.Name)+"`")
		}
	}
	w("auto's run of each scenario and profile against auto's run of the same in the baseline files (%s; a run found in several is taken from the first), made with the code before auto's downtime limits kept the learned headroom below the ceiling: what the headroom cost in completions and time, and what it did to the downtime.\n\n", strings.Join(files, ", "))
	w("| section | scenario / profile | baseline | now | time now / baseline | guests (now / baseline) |\n|---|---|---|---|---|---|\n")
	pairs, doneBase, doneNow := 0, 0, 0
	var ratios []float64
	var added time.Duration
	bothPre := 0
	overBase, overNow, preBase, preNow := 0, 0, 0, 0
	for _, rp := range groups {
		var bp *report
		for _, g := range base {
			if g.sameConfig(rp) {
				bp = g
			}
		}
		if bp == nil {
			continue
		}
		scs, profs := rp.scenarios()
		for _, sc := range scs {
			for _, pf := range profs {
				now := policyRun(rp.runs(sc.Name, pf.Name), strategy.PolicyAuto)
				old := policyRun(bp.runs(sc.Name, pf.Name), strategy.PolicyAuto)
				if now == nil || old == nil {
					continue
				}
				pairs++
				if old.Status == "completed" {
					doneBase++
				}
				if now.Status == "completed" {
					doneNow++
				}
				for _, x := range []struct {
					r         *runResult
					over, pre *int
				}{{old, &overBase, &preBase}, {now, &overNow, &preNow}} {
					if x.r.Status == "completed" && !x.r.Postcopy {
						*x.pre++
						if x.r.Downtime > rp.maxDowntime() {
							*x.over++
						}
					}
				}
				tm := "–"
				if old.Status == "completed" && now.Status == "completed" {
					ratios = append(ratios, now.Total.Seconds()/old.Total.Seconds())
					tm = fmt.Sprintf("%.2f×", now.Total.Seconds()/old.Total.Seconds())
					if !old.Postcopy && !now.Postcopy {
						bothPre++
						added += now.Total - old.Total
					}
				}
				w("| %s | %s / %s | %s | %s | %s | %s |\n", rp.sectionID(), sc.Name, pf.Name, runCell(old), runCell(now), tm, guestPair(now, old))
			}
		}
	}
	if pairs == 0 {
		w("\nNo section of the baseline has the configuration of a section above: nothing compared.\n\n")
		return b.String()
	}
	w("\nauto completed %s pairs in the baseline and %s now.", pct(doneBase, pairs), pct(doneNow, pairs))
	if len(ratios) > 0 {
		sort.Float64s(ratios)
		w(" Where both completed, time now / baseline ranged %.2f×–%.2f× (median %.2f×)", ratios[0], ratios[len(ratios)-1], ratios[len(ratios)/2])
		if bothPre > 0 {
			w("; the %d pairs that both completed in pre-copy took %+.1f s in all now", bothPre, added.Seconds())
		}
		w(".")
	}
	w(" Pre-copy completions over the ceiling: %s in the baseline, %s now.\n\n", pct(overBase, preBase), pct(overNow, preNow))
	for _, bp := range base {
		if c := bp.tcgCaveat(); c != "" {
			w("**Caveat, baseline QEMU %s**: %s.\n\n", bp.sectionID(), c)
		}
	}
	return b.String()
}

// policyRun is the run of policy among runs (nil when none).
func policyRun(runs []*runResult, policy string) *runResult {
	for _, r := range runs {
		if r.Policy == policy {
			return r
		}
	}
	return nil
}
