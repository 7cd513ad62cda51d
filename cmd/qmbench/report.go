package main

import (
	"fmt"
	"math"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/strategy"
)

func rateStr(bps float64) string {
	switch {
	case math.IsNaN(bps):
		return "?"
	case bps >= 1e9:
		return fmt.Sprintf("%.2f GB/s", bps/1e9)
	case bps >= 1e6:
		return fmt.Sprintf("%.1f MB/s", bps/1e6)
	}
	return fmt.Sprintf("%.0f kB/s", bps/1e3)
}

func secs(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }

// slowdown is the share of the guest's work lost during the migration, as
// text ("–" for an idle guest).
func slowdown(r *runResult) string {
	s := r.speed()
	if math.IsNaN(s) {
		return "–"
	}
	return fmt.Sprintf("%.0f %%", 100*(1-s))
}

// lostSecs is the guest's work lost to the migration, in seconds of its
// normal progress: slowdown × total time. Unlike the slowdown (a rate), it
// does not favour a slow migration that spreads the same loss thinly.
func lostSecs(r *runResult) float64 { return (1 - r.speed()) * r.Total.Seconds() }

func lost(r *runResult) string {
	if math.IsNaN(r.speed()) {
		return "–"
	}
	return fmt.Sprintf("%.1f s", lostSecs(r))
}

// levers summarises the decisions: runs of the same action are merged.
func levers(ds []strategy.Decision) string {
	var parts []string
	for i := 0; i < len(ds); {
		j := i
		for j+1 < len(ds) && ds[j+1].Action == ds[i].Action {
			j++
		}
		d, e := ds[i], ds[j]
		at := fmt.Sprintf("%.1f s", d.At.Seconds())
		if j > i {
			at = fmt.Sprintf("%.1f–%.1f s", d.At.Seconds(), e.At.Seconds())
		}
		var what string
		switch d.Action {
		case strategy.SetDowntime:
			what = fmt.Sprintf("downtime %d ms", d.DowntimeLimit.Milliseconds())
			if j > i {
				what = fmt.Sprintf("downtime %d→%d ms ×%d", d.DowntimeLimit.Milliseconds(), e.DowntimeLimit.Milliseconds(), j-i+1)
			}
		case strategy.SetThrottle:
			what = fmt.Sprintf("throttle %d %%", d.Throttle.Max)
			if j > i {
				what = fmt.Sprintf("throttle %d→%d %%", d.Throttle.Max, e.Throttle.Max)
			}
		case strategy.StartPostcopy:
			what = "postcopy"
		case strategy.PauseSource:
			what = "pause"
		case strategy.Abort:
			what = "abort"
		default:
			what = string(d.Action)
		}
		parts = append(parts, what+" @"+at)
		i = j + 1
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func outcome(r *runResult) string {
	switch {
	case r.Status == "completed" && r.Postcopy:
		return "completed (postcopy)"
	case r.Status == "error":
		return "error"
	case r.MovedAnyway:
		return r.Status + ", yet the guest moved"
	}
	return r.Status
}

func integrity(r *runResult) string {
	if r.Status == "error" {
		return "–"
	}
	where := "destination"
	if r.Status != "completed" && !r.MovedAnyway {
		where = "source"
	}
	if r.Intact {
		return "intact (" + where + ")"
	}
	return "**BROKEN** (" + where + ")"
}

// goalRatio is the goal: auto in at most this share of the best
// anchor's time on the hard scenarios.
const (
	goalRatio     = 0.5
	goalRatioText = "half"
)

// noiseBar is the share by which two runs' guests may differ in rate and
// still be compared: TCG speed on shared cores drifts by about this much.
const noiseBar = 0.20

// verdict compares auto with the best anchor preset on one scenario and profile.
type verdict struct {
	Auto, Best *runResult
	Met        bool // the goal: completes, ≤ goalRatio of the time, less slowdown (rate)
	MetLost    bool // the same with less guest work lost instead of a lower slowdown rate
	Why        string
}

func judge(runs []*runResult) verdict {
	var v verdict
	for _, r := range runs {
		if r.Policy == strategy.PolicyAuto {
			v.Auto = r
			continue
		}
		if r.Status == "completed" && (v.Best == nil || r.Total < v.Best.Total) {
			v.Best = r
		}
	}
	switch {
	case v.Auto == nil:
		v.Why = "auto not run"
	case v.Auto.Status != "completed":
		v.Why = "auto did not complete"
	case v.Best == nil:
		v.Met, v.MetLost, v.Why = true, true, "auto completes, no anchor preset does"
	default:
		ratio := v.Auto.Total.Seconds() / v.Best.Total.Seconds()
		as, bs := v.Auto.speed(), v.Best.speed()
		faster := ratio <= goalRatio
		lessSlow := math.IsNaN(as) || math.IsNaN(bs) || as >= bs
		lessLost := math.IsNaN(as) || math.IsNaN(bs) || lostSecs(v.Auto) <= lostSecs(v.Best)
		v.Met, v.MetLost = faster && lessSlow, faster && lessLost
		v.Why = fmt.Sprintf("auto takes %.2f× the time of %s (%s)", ratio, v.Best.Policy, timeVerdict(v.Auto.Total, v.Best.Total))
		if !math.IsNaN(as) && !math.IsNaN(bs) {
			v.Why += fmt.Sprintf(", guest slowdown %.0f %% vs %.0f %% (guest work lost %.1f s vs %.1f s)",
				100*(1-as), 100*(1-bs), lostSecs(v.Auto), lostSecs(v.Best))
		}
	}
	return v
}

// goalText is a goal verdict for a table cell.
func (v verdict) goalText(sc scenario, ok bool) string {
	switch {
	case !sc.hard() && v.Auto != nil && v.Auto.Status == "completed":
		return "n/a (completes)"
	case !ok:
		return "**no**"
	}
	return "yes"
}

// timeVerdict says whether a took less or more time than b, and by how much.
func timeVerdict(a, b time.Duration) string {
	d := a.Seconds() - b.Seconds()
	switch {
	case math.Abs(d) < 0.05:
		return "the same time to 0.1 s"
	case d < 0:
		return fmt.Sprintf("faster by %.1f s", -d)
	}
	return fmt.Sprintf("slower by %.1f s", d)
}

// guestRate is the guest's wall-clock dirty rate around a run: the mean of
// the rates measured just before and just after it (NaN: neither).
func guestRate(r *runResult) float64 {
	var sum float64
	n := 0
	for _, v := range []float64{r.BeforeRate, r.AfterRate} {
		if v > 0 && !math.IsNaN(v) && !math.IsInf(v, 0) {
			sum += v
			n++
		}
	}
	if n == 0 {
		return math.NaN()
	}
	return sum / float64(n)
}

// guestStr is a run's guest rate as text ("idle" for an idle guest).
func guestStr(r *runResult) string {
	if math.IsNaN(r.speed()) {
		return "idle"
	}
	return rateStr(guestRate(r))
}

// rateGap is by how much the faster of two guests outran the slower
// (max/min - 1), NaN when either is unknown.
func rateGap(a, b float64) float64 {
	if !(a > 0) || !(b > 0) {
		return math.NaN()
	}
	return max(a, b)/min(a, b) - 1
}

// guestPair gives two runs' guest rates and flags them when they differ by
// more than the noise bar.
func guestPair(a, b *runResult) string {
	if a == nil || b == nil {
		if a != nil {
			return guestStr(a) + " / –"
		}
		return "–"
	}
	ra, rb := guestRate(a), guestRate(b)
	s := guestStr(a) + " / " + guestStr(b)
	if g := rateGap(ra, rb); g > noiseBar {
		s += fmt.Sprintf(" ⚠ differ by %.0f %%", 100*g)
	}
	return s
}

// report is one benchmark invocation's results.
type report struct {
	Version string
	Command string
	Date    time.Time
	Rate    float64
	Budget  time.Duration
	// MaxDowntime is every run's downtime ceiling (0 in files written
	// before -max-downtime: defaultMaxDowntime).
	MaxDowntime time.Duration `json:",omitempty"`
	// NoPreempt: run with -no-preempt (postcopy-preempt kept off).
	NoPreempt bool `json:",omitempty"`
	MemMiB    int
	// RAMKiB is the guest RAM QEMU was given (-m): qemulab adds 8 KiB to
	// a TCG guest on QEMU before 9.0 (0 in files written before it was
	// recorded).
	RAMKiB   int64              `json:",omitempty"`
	Calib    map[string]float64 // scenario → calibrated dirty rate
	Runs     []*runResult
	PlotsRel string // plots folder relative to the Markdown file
	Host     string // the host's cores and OS (its load is per run: runResult.Host)
	// Files are the -json files a render read into this section, and All
	// every run in them (Runs leaves out those an earlier file replaced).
	Files []sourceFile `json:"-"`
	All   []*runResult `json:"-"`
}

// sourceFile is one -json file read into a rendered section.
type sourceFile struct {
	Name, Command string
	Date          time.Time
}

// sameConfig reports whether o ran with rp's QEMU version and configuration,
// so that their runs belong in one section.
func (rp *report) sameConfig(o *report) bool {
	return rp.Version == o.Version && rp.Rate == o.Rate && rp.maxDowntime() == o.maxDowntime() &&
		rp.Budget == o.Budget && rp.MemMiB == o.MemMiB && rp.NoPreempt == o.NoPreempt
}

// defaultRate is -rate's default, in bytes/s.
const defaultRate = 32e6

// configSuffix tells a section of a non-default configuration apart ("" for
// the default one).
func (rp *report) configSuffix() string {
	pre := ""
	if rp.NoPreempt {
		pre = "-nopreempt"
	}
	if rp.Rate == defaultRate && rp.maxDowntime() == defaultMaxDowntime && rp.Budget == time.Minute {
		return pre
	}
	return fmt.Sprintf("-%.0fMBps-%dms-%.0fs%s", rp.Rate/1e6, rp.maxDowntime().Milliseconds(), rp.Budget.Seconds(), pre)
}

// sectionID names the section in the report's markers.
func (rp *report) sectionID() string {
	pre := ""
	if rp.NoPreempt {
		pre = ", postcopy-preempt off"
	}
	if rp.Rate == defaultRate && rp.maxDowntime() == defaultMaxDowntime && rp.Budget == time.Minute {
		return rp.Version + pre
	}
	return fmt.Sprintf("%s, link %s, ceiling %d ms, budget %v%s", rp.Version, rateStr(rp.Rate), rp.maxDowntime().Milliseconds(), rp.Budget, pre)
}

// plotBase is the file name, without extension, of a scenario's and
// profile's plot.
func (rp *report) plotBase(sc, prof string) string {
	return fmt.Sprintf("%s-%s-%s%s", rp.Version, sc, prof, rp.configSuffix())
}

func (rp *report) maxDowntime() time.Duration {
	if rp.MaxDowntime == 0 {
		return defaultMaxDowntime
	}
	return rp.MaxDowntime
}

func (rp *report) runs(sc, prof string) []*runResult {
	var out []*runResult
	for _, r := range rp.Runs {
		if r.Scenario == sc && r.Profile == prof {
			out = append(out, r)
		}
	}
	return out
}

// section renders the Markdown section of one QEMU version and
// configuration.
func (rp *report) section(scs []scenario, profs []profile) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("## QEMU %s\n\n", rp.sectionID())
	if len(rp.Files) > 0 {
		w("- raw results:")
		for i, f := range rp.Files {
			sep := ","
			if i == 0 {
				sep = ""
			}
			w("%s `%s` (%s)", sep, f.Name, f.Date.UTC().Format("2006-01-02 15:04 MST"))
		}
		w("; a run found in several is taken from the first\n")
		for _, f := range rp.Files {
			w("- `%s` made by: `%s`\n", path.Base(f.Name), f.Command)
		}
	} else {
		w("- command: `%s`\n", rp.Command)
		w("- date: %s\n", rp.Date.UTC().Format("2006-01-02 15:04 MST"))
	}
	w("- link: two network namespaces joined by a veth pair shaped by tc tbf to %s each way; migration over TCP, max-bandwidth unlimited\n", rateStr(rp.Rate))
	w("- guest: the boot-sector sweep guest, %d MiB RAM, TCG, `-cpu max`; it rewrites a %.0f MiB range page by page, and its spin count is calibrated per scenario so its dirty rate is the scenario's multiple of the link\n", rp.MemMiB, float64(sweep.RangeSize)/(1<<20))
	if c := rp.tcgCaveat(); c != "" {
		w("- **caveat**: %s\n", c)
	}
	host := rp.Host
	if host == "" {
		host = "cores not recorded"
	}
	w("- host: %s; %s\n", host, rp.hostLoadLine())
	w("- guest slowdown: share of the guest's own progress (sweep passes, read from its serial port and its memory) lost during the migration, against the mean of its rates just before and just after it. Rates are over the time the guest's vCPU threads ran or were stopped: the time they were ready but waited for a host core taken by other processes (their schedstat runqueue wait) is left out, so that the other work on the shared cores does not count. Throttling, downtime and postcopy page faults do count\n")
	w("- guest work lost: slowdown × total time, in seconds of the guest's normal progress (a short migration that stalls the guest hard and a long one that slows it a little can lose the same work)\n")
	w("- guest dirty rate: wall-clock rate of page writes just before and just after the migration (what the link faces); a comparison's \"guest\" rate is their mean, and ⚠ flags two runs whose guests differ by more than the noise bar (%.0f %%)\n", 100*noiseBar)
	w("- integrity: the sweep invariant checked from a memory dump of the guest where it runs after the migration (destination when completed, source when aborted)\n\n")
	w("%s\n", scalingNote(rp.Budget, rp.maxDowntime()))

	w("### Summary: auto against the best anchor preset\n\n")
	w("Goal (issue): auto completes every scenario, and on the hard ones (dirty rate ≥ link) in at most %s the time of the best anchor preset that completes, with less guest slowdown. ", goalRatioText)
	w("The last column judges the guest's loss by the work it lost (slowdown × time) instead of the slowdown rate.\n\n")
	w("| scenario | profile | auto | best anchor | guests (auto / best) | goal met | why | goal met, by work lost |\n|---|---|---|---|---|---|---|---|\n")
	for _, sc := range scs {
		for _, pf := range profs {
			runs := rp.runs(sc.Name, pf.Name)
			if len(runs) == 0 {
				continue
			}
			v := judge(runs)
			auto, best := "–", "none completes"
			if v.Auto != nil {
				auto = fmt.Sprintf("%s %s", outcome(v.Auto), secs(v.Auto.Total))
			}
			if v.Best != nil {
				best = fmt.Sprintf("%s %s", v.Best.Policy, secs(v.Best.Total))
			}
			w("| %s | %s | %s | %s | %s | %s | %s | %s |\n", sc.Name, pf.Name, auto, best, guestPair(v.Auto, v.Best), v.goalText(sc, v.Met), v.Why, v.goalText(sc, v.MetLost))
		}
	}
	w("\n")

	for _, sc := range scs {
		w("### %s\n\n", sc.Title)
		if r, ok := rp.Calib[sc.Name]; ok && math.IsInf(sc.Ratio, 1) {
			w("The guest sweeps with no spin, as fast as TCG runs it; calibration measured %s on its own vCPU time (%.0f × %s).\n\n", rateStr(r), r/rp.Rate, rateStr(rp.Rate))
		} else if ok && sc.Ratio > 0 {
			w("Target dirty rate %s (%.1f × %s); calibration measured %s on the guest's own vCPU time (the rates the link faced in each run are in the table).\n\n", rateStr(sc.Ratio*rp.Rate), sc.Ratio, rateStr(rp.Rate), rateStr(r))
		} else if sc.Ratio == 0 {
			w("The guest is booted and idle (it writes nothing after boot).\n\n")
		}
		for _, pf := range profs {
			runs := rp.runs(sc.Name, pf.Name)
			if len(runs) == 0 {
				continue
			}
			w("#### %s profile: %s\n\n", pf.Name, pf.Title)
			w("| policy | outcome | total | downtime | sent | guest dirty rate before / after | guest slowdown | guest work lost | max throttle | levers | integrity |\n")
			w("|---|---|---|---|---|---|---|---|---|---|---|\n")
			for _, r := range runs {
				dt := "–"
				if r.Status == "completed" {
					dt = fmt.Sprintf("%d ms", r.Downtime.Milliseconds())
				}
				w("| %s | %s | %s | %s | %.0f MB | %s | %s | %s | %d %% | %s | %s |\n",
					r.Policy, outcome(r), secs(r.Total), dt, float64(r.Sent)/1e6, rateStr(r.BeforeRate)+" / "+rateStr(r.AfterRate), slowdown(r), lost(r), r.MaxThrottle, levers(r.Decisions), integrity(r))
			}
			base := path.Join(rp.PlotsRel, rp.plotBase(sc.Name, pf.Name))
			w("\n![remaining RAM over time, %s, %s profile](%s.png)\n\n", sc.Name, pf.Name, base)
			w("![throttle and downtime limit over time, decisions marked, %s, %s profile](%s-levers.png)\n\n", sc.Name, pf.Name, base)
			gs := 0
			for _, r := range runs {
				if len(r.Guest) > 0 {
					gs++
				}
			}
			if gs > 0 {
				w("![guest progress rate over time, %s, %s profile](%s-guest.png)\n\n", sc.Name, pf.Name, base)
			} else {
				w("The guest's progress rate over time was not recorded in these runs (qmbench records it since this report's renderer was written): its plot appears once the scenario is re-run.\n\n")
			}
			w("Plots also as SVG: [remaining](%s.svg), [levers](%s-levers.svg)", base, base)
			if gs > 0 {
				w(", [guest](%s-guest.svg)", base)
			}
			w(".\n\n")
			w("<details><summary>decisions and errors</summary>\n\n")
			for _, r := range runs {
				w("- **%s**", r.Policy)
				if r.Err != "" {
					w(" (error: %s)", oneLine(r.Err))
				}
				if r.IntactErr != "" {
					w(" (integrity: %s)", oneLine(r.IntactErr))
				}
				if len(r.UndoErrors) > 0 {
					w(" (rollback errors: %s)", oneLine(strings.Join(r.UndoErrors, "; ")))
				}
				w("\n")
				for _, d := range r.Decisions {
					w("  - %.1f s %s: %s\n", d.At.Seconds(), d.Action, oneLine(d.Reason))
				}
			}
			w("\n</details>\n\n")
		}
	}
	return b.String()
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	return strings.ReplaceAll(s, "|", "\\|")
}

const docTitle = "# Benchmarks: qmigrate's switchover policies against the anchors'\n\n"

const docAbout = `Every policy (auto, and the presets qemu, kubevirt, nova, proxmox that reproduce QEMU alone, KubeVirt,
OpenStack Nova and Proxmox; see strategy/doc.go) migrates the same guests over the same shaped link with
the same limits. Each QEMU version and configuration has its own section.

Measured elsewhere, each page with the command that measures it again: what ` + "`qmigrate check --predict`" + `
foretells against real migrations (docs/predict.md), many migrations at once under shared limits
(docs/benchmarks-fleet.md), and what the preflight checks add to prepare (docs/upgrade.md).

`

// docHeader starts a report written by a run (see mergeSection).
const docHeader = docTitle + "Written by `go run ./cmd/qmbench` (see `go run ./cmd/qmbench -h`), a new run replacing its version's\n" +
	"section; re-render the whole report, its Findings included, from the runs' -json files with -render.\n\n" + docAbout

// docHeaderFor starts a rendered report: the command that re-renders it
// first.
func docHeaderFor(cmd string) string {
	return docTitle + "Rendered from the raw results in `docs/results` by the command below; on a clean checkout it reproduces\n" +
		"this file byte for byte, and the plots (do not edit this file by hand):\n\n" +
		"```\n" + cmd + "\n```\n\n" + docAbout
}

// mergeSection writes section into the Markdown file at path between the
// version's markers, replacing an older one and keeping the other versions.
func mergeSection(path, version, section string) error {
	begin := fmt.Sprintf("<!-- qmbench QEMU %s begin -->\n", version)
	end := fmt.Sprintf("<!-- qmbench QEMU %s end -->\n", version)
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	doc := string(old)
	if doc == "" {
		doc = docHeader
	}
	block := begin + section + end
	if i := strings.Index(doc, begin); i >= 0 {
		if j := strings.Index(doc[i:], end); j >= 0 {
			doc = doc[:i] + block + doc[i+j+len(end):]
			return os.WriteFile(path, []byte(doc), 0o644)
		}
	}
	// Keep versions in order: insert before the first later version.
	type sec struct {
		at int
		v  string
	}
	var secs []sec
	for rest, off := doc, 0; ; {
		i := strings.Index(rest, "<!-- qmbench QEMU ")
		if i < 0 {
			break
		}
		k := strings.Index(rest[i:], " begin -->")
		if k < 0 {
			break
		}
		secs = append(secs, sec{off + i, rest[i+len("<!-- qmbench QEMU ") : i+k]})
		off += i + k
		rest = rest[i+k:]
	}
	at := len(doc)
	if i := slices.IndexFunc(secs, func(s sec) bool { return versionLess(version, s.v) }); i >= 0 {
		at = secs[i].at
	}
	if at == len(doc) && !strings.HasSuffix(doc, "\n\n") {
		doc += "\n"
	}
	doc = doc[:at] + block + "\n" + doc[at:]
	return os.WriteFile(path, []byte(doc), 0o644)
}

// versionLess compares dotted versions numerically.
func versionLess(a, b string) bool {
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(pa) && i < len(pb); i++ {
		var x, y int
		fmt.Sscan(pa[i], &x)
		fmt.Sscan(pb[i], &y)
		if x != y {
			return x < y
		}
	}
	return len(pa) < len(pb)
}

// forJSON returns a copy with NaN rates (not measured) as -1: JSON has no NaN.
func (rp *report) forJSON() *report {
	c := *rp
	c.Runs = make([]*runResult, len(rp.Runs))
	for i, r := range rp.Runs {
		cr := *r
		for _, f := range []*float64{&cr.BaseRate, &cr.DuringRate, &cr.BeforeRate, &cr.AfterRate} {
			if math.IsNaN(*f) || math.IsInf(*f, 0) {
				*f = -1
			}
		}
		c.Runs[i] = &cr
	}
	return &c
}

// fromJSON turns the -1 of forJSON back into NaN.
func (rp *report) fromJSON() {
	for _, r := range rp.Runs {
		for _, f := range []*float64{&r.BaseRate, &r.DuringRate, &r.BeforeRate, &r.AfterRate} {
			if *f < 0 {
				*f = math.NaN()
			}
		}
	}
}
