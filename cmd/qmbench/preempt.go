package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/strategy"
)

// preemptFindings compares, for each section run with -no-preempt, the
// section of the same QEMU version and configuration run without it: per
// scenario, profile and policy, the medians over every run in their files
// that went to postcopy (a section's tables show only one run per cell).
// "" when no section was run with -no-preempt.
func preemptFindings(groups []*report) string {
	var b strings.Builder
	for _, off := range groups {
		if !off.NoPreempt {
			continue
		}
		i := slices.IndexFunc(groups, func(g *report) bool {
			on := *g
			on.NoPreempt = true
			return !g.NoPreempt && on.sameConfig(off)
		})
		if i < 0 {
			continue
		}
		on := groups[i]
		if b.Len() == 0 {
			b.WriteString("\n## What postcopy-preempt changes\n\n")
			b.WriteString("Every run that went to postcopy, in the files of a section with postcopy-preempt (the default where both QEMUs are 8.0+) and of the same configuration run with `-no-preempt`; medians, with the runs' range in brackets. Postcopy phase: from the start-postcopy decision to the end. Work lost: the guest's slowdown × the migration's time, in seconds of its normal progress.\n\n")
		}
		fmt.Fprintf(&b, "QEMU %s: %d and %d runs in postcopy.\n\n", on.sectionID(), len(postcopyRuns(on.All)), len(postcopyRuns(off.All)))
		b.WriteString("| scenario / profile | policy | runs on / off | total | postcopy phase | guest slowdown | work lost | downtime |\n|---|---|---|---|---|---|---|---|\n")
		for _, sc := range allScenarios {
			for _, pf := range allProfiles {
				for _, pol := range strategy.Policies() {
					a := postcopyRuns(matching(on.All, sc.Name, pf.Name, pol))
					z := postcopyRuns(matching(off.All, sc.Name, pf.Name, pol))
					if len(a) == 0 || len(z) == 0 {
						continue
					}
					fmt.Fprintf(&b, "| %s / %s | %s | %d / %d | %s | %s | %s | %s | %s |\n", sc.Name, pf.Name, pol, len(a), len(z),
						onOff(a, z, func(r *runResult) float64 { return r.Total.Seconds() }, "%.1f s"),
						onOff(a, z, func(r *runResult) float64 { return postcopyPhase(r).Seconds() }, "%.1f s"),
						onOff(a, z, func(r *runResult) float64 { return 100 * (1 - r.speed()) }, "%.0f %%"),
						onOff(a, z, lostSecs, "%.1f s"),
						onOff(a, z, func(r *runResult) float64 { return float64(r.Downtime.Milliseconds()) }, "%.0f ms"))
				}
			}
		}
		b.WriteString("\nEach cell: with preempt / without.\n\n")
	}
	return b.String()
}

func matching(runs []*runResult, sc, pf, pol string) []*runResult {
	var out []*runResult
	for _, r := range runs {
		if r.Scenario == sc && r.Profile == pf && r.Policy == pol {
			out = append(out, r)
		}
	}
	return out
}

func postcopyRuns(runs []*runResult) []*runResult {
	var out []*runResult
	for _, r := range runs {
		if r.Postcopy && r.Status == "completed" {
			out = append(out, r)
		}
	}
	return out
}

// postcopyPhase is the time from the start-postcopy decision to the end.
func postcopyPhase(r *runResult) time.Duration {
	for _, d := range r.Decisions {
		if d.Action == strategy.StartPostcopy {
			return r.Total - d.At
		}
	}
	return 0
}

// onOff is "median [min-max] / median [min-max]" of f over a and z.
func onOff(a, z []*runResult, f func(*runResult) float64, format string) string {
	return medianRange(a, f, format) + " / " + medianRange(z, f, format)
}

func medianRange(runs []*runResult, f func(*runResult) float64, format string) string {
	var vs []float64
	for _, r := range runs {
		if v := f(r); !math.IsNaN(v) {
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		return "–"
	}
	slices.Sort(vs)
	n := len(vs)
	med := vs[n/2]
	if n%2 == 0 {
		med = (vs[n/2-1] + vs[n/2]) / 2
	}
	s := fmt.Sprintf(format, med)
	if n > 1 {
		s += " [" + strings.TrimSpace(strings.Split(fmt.Sprintf(format, vs[0]), " ")[0]) + "–" + fmt.Sprintf(format, vs[n-1]) + "]"
	}
	return s
}
