// Command qmbench benchmarks qmigrate's switchover policies against the
// anchors' (strategy presets qemu, kubevirt, nova, proxmox) on real QEMU:
// every policy migrates the same sweep guest, at several dirty rates
// relative to a tbf-shaped link between two network namespaces, under the
// same limits. It writes a Markdown report (a section per QEMU version) and,
// per scenario and profile, plots (PNG and SVG) of remaining RAM, of the
// throttle and downtime limit with the decisions marked, and of the guest's
// progress rate, over time. -render rewrites the whole report, its Findings
// computed from the raw results, and the plots from -json files:
//
//	go run ./cmd/qmbench -render docs/results/a.json,docs/results/b.json
//
//	go run ./cmd/qmbench                          # everything, ~30 min
//	go run ./cmd/qmbench -quick -scenarios 2x     # a smoke run
//
// It needs root (network namespaces) and QEMU (QMIGRATE_QEMU and
// QMIGRATE_QEMU_FIRMWARE pick the version, see internal/qemulab). It runs at
// most two QEMU processes at a time and removes its namespaces and QEMUs on
// every exit path (also on SIGINT).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/strategy"
)

type options struct {
	out, plots          string
	scenarios, policies string
	profiles, jsonOut   string
	render              string
	baseline            string // -baseline: earlier runs auto is compared with
	predict             string // -predict: TestPredictAccuracy's results
	rateMB              float64
	budget, maxDowntime time.Duration
	memMiB              int
	quick, verbose      bool
	noPreempt           bool // -no-preempt: postcopy-preempt off (engine.Config.NoPostcopyPreempt)
	noPlots             bool // render only the report (tests)
}

func main() {
	var o options
	flag.StringVar(&o.out, "out", defaultOut, "Markdown report to write (a run replaces its QEMU version's section; -render rewrites the whole file)")
	flag.StringVar(&o.plots, "plots", defaultPlots, "folder for the plots (PNG and SVG)")
	flag.StringVar(&o.scenarios, "scenarios", "idle,converging,borderline,2x,10x", "scenarios to run (comma-separated); also unthrottled: the sweep guest with no spin (the issue's anchor, with -rate 268.435456)")
	flag.StringVar(&o.policies, "policies", strings.Join(strategy.Policies(), ","), "policies to run (comma-separated)")
	flag.StringVar(&o.profiles, "profiles", "throttle,postcopy", "limit profiles to run: throttle (no postcopy), postcopy")
	flag.Float64Var(&o.rateMB, "rate", 32, "link rate in MB/s (tbf, each direction)")
	flag.DurationVar(&o.budget, "budget", 60*time.Second, "budget of every migration (the presets' clocks scale with it)")
	flag.DurationVar(&o.maxDowntime, "max-downtime", defaultMaxDowntime, "downtime ceiling of every migration")
	flag.IntVar(&o.memMiB, "mem", qemulab.DefaultMemMiB, "guest RAM in MiB")
	flag.BoolVar(&o.quick, "quick", false, "smoke run: 30 s budget, one calibration round, short baselines")
	flag.BoolVar(&o.verbose, "v", false, "log QEMU command lines")
	flag.BoolVar(&o.noPreempt, "no-preempt", false, "keep postcopy-preempt off (it is on by default where both QEMUs are 8.0+): its own section of the report, to compare")
	flag.StringVar(&o.jsonOut, "json", "", "also write every run's raw results (samples, decisions) to this JSON file")
	flag.StringVar(&o.baseline, "baseline", "", "with -render: -json files of earlier runs (comma-separated) that the Findings compare auto's runs with, section by section")
	flag.StringVar(&o.predict, "predict", "", "with -render: TestPredictAccuracy's JSON files (comma-separated), rendered as check --predict against real migrations")
	flag.StringVar(&o.render, "render", "", "run nothing: rewrite the whole report (its Findings computed from the runs) and the plots from -json files (comma-separated; one section per QEMU version and configuration; a scenario, profile and policy found in several files of a section is taken from the first)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "qmbench:", err)
		os.Exit(1)
	}
}

func pick[T any](all []T, name func(T) string, list, what string) ([]T, error) {
	var out []T
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		i := slices.IndexFunc(all, func(t T) bool { return name(t) == n })
		if i < 0 {
			var names []string
			for _, t := range all {
				names = append(names, name(t))
			}
			return nil, fmt.Errorf("unknown %s %q (valid: %s)", what, n, strings.Join(names, ", "))
		}
		out = append(out, all[i])
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no %s selected", what)
	}
	return out, nil
}

func run(ctx context.Context, o options) error {
	if o.render != "" {
		return render(o)
	}
	if o.maxDowntime <= 0 || o.maxDowntime > strategy.QEMUMaxDowntime {
		return fmt.Errorf("-max-downtime %v: want more than 0 and at most QEMU's %v", o.maxDowntime, strategy.QEMUMaxDowntime)
	}
	scs, err := pick(allScenarios, func(s scenario) string { return s.Name }, o.scenarios, "scenario")
	if err != nil {
		return err
	}
	profs, err := pick(allProfiles, func(p profile) string { return p.Name }, o.profiles, "profile")
	if err != nil {
		return err
	}
	pols, err := pick(strategy.Policies(), func(s string) string { return s }, o.policies, "policy")
	if err != nil {
		return err
	}
	q, err := qemulab.FindQEMU()
	if err != nil {
		return err
	}
	v, err := q.Version(ctx)
	if err != nil {
		return err
	}
	version := v.String()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
	logf("QEMU %s (%s)", version, q.Binary)

	rate := o.rateMB * 1e6
	r := &runner{q: q, memMiB: o.memMiB, budget: o.budget, maxDowntime: o.maxDowntime, noPreempt: o.noPreempt, warmup: 8 * time.Second, base: 3 * time.Second, logf: logf, verbose: o.verbose, waits: map[int]time.Duration{}}
	rounds := 5
	if o.quick {
		r.budget, r.warmup, r.base, rounds = 30*time.Second, 4*time.Second, 1500*time.Millisecond, 1
	}
	net, err := qemulab.NewNetwork(ctx, uint64(rate))
	if err != nil {
		return err
	}
	defer func() {
		if err := net.Close(); err != nil {
			logf("network close: %v", err)
		}
	}()
	r.net = net
	if err := os.MkdirAll(o.plots, 0o755); err != nil {
		return err
	}

	rp := &report{
		Version: version, Command: "go run ./cmd/qmbench " + strings.Join(os.Args[1:], " "), Date: time.Now(),
		Rate: rate, Budget: r.budget, MaxDowntime: o.maxDowntime, NoPreempt: o.noPreempt, MemMiB: o.memMiB, Calib: map[string]float64{},
		RAMKiB: q.RAMBytes(qemulab.Config{MemMiB: o.memMiB}) >> 10,
		Host:   fmt.Sprintf("%d cores, %s/%s", runtime.NumCPU(), runtime.GOOS, runtime.GOARCH),
	}
	rp.PlotsRel = plotsRel(o)
	for _, sc := range scs {
		spin, got, err := r.calibrate(ctx, sc.Ratio*rate, rounds)
		if err != nil {
			return fmt.Errorf("calibrate %s: %w", sc.Name, err)
		}
		rp.Calib[sc.Name] = got
		for _, pf := range profs {
			for _, pol := range pols {
				if err := ctx.Err(); err != nil {
					return err
				}
				logf("run %s / %s / %s", sc.Name, pf.Name, pol)
				res := r.run(ctx, sc, pf, pol, spin)
				logf("  %s in %s, downtime %v, sent %.0f MB, dirty rate before %s, slowdown %s, %s, %s",
					outcome(res), secs(res.Total), res.Downtime.Round(time.Millisecond), float64(res.Sent)/1e6,
					rateStr(res.BeforeRate), slowdown(res), levers(res.Decisions), integrity(res))
				if res.Err != "" {
					logf("  error: %s", res.Err)
				}
				if res.IntactErr != "" {
					logf("  integrity: %s", res.IntactErr)
				}
				rp.Runs = append(rp.Runs, res)
			}
			if err := plotRuns(o.plots, rp, sc, pf); err != nil {
				return err
			}
			// Write the report as it grows, so an interrupted run keeps its results.
			if err := mergeSection(o.out, rp.sectionID(), rp.section(scs, profs)); err != nil {
				return err
			}
			if o.jsonOut != "" {
				b, err := json.MarshalIndent(rp.forJSON(), "", "  ")
				if err != nil {
					return err
				}
				if err := os.WriteFile(o.jsonOut, b, 0o644); err != nil {
					return err
				}
			}
		}
	}
	logf("wrote %s and plots in %s", o.out, o.plots)
	return nil
}

// plotRuns writes the plots of one scenario and profile, for every policy
// run there in the order they ran: remaining RAM over time; the throttle and
// downtime limit over time with the decisions marked; and the guest's
// progress rate over time when the runs recorded it. Each as PNG and SVG.
func plotRuns(dir string, rp *report, sc scenario, pf profile) error {
	var ss []series
	for _, r := range rp.runs(sc.Name, pf.Name) {
		ss = append(ss, seriesOf(r))
	}
	title := fmt.Sprintf("%s, %s profile: QEMU %s, link %s, downtime ceiling %d ms", sc.Title, pf.Name, rp.Version, rateStr(rp.Rate), rp.maxDowntime().Milliseconds())
	base := filepath.Join(dir, rp.plotBase(sc.Name, pf.Name))
	p, err := plotRemaining(title, ss)
	if err != nil {
		return err
	}
	if err := writeImages(base, p); err != nil {
		return err
	}
	ps, err := plotLevers(title, ss)
	if err != nil {
		return err
	}
	if err := writeImages(base+"-levers", ps...); err != nil {
		return err
	}
	if !hasGuest(ss) {
		return nil
	}
	if p, err = plotGuest(title, ss); err != nil {
		return err
	}
	return writeImages(base+"-guest", p)
}

// plotsRel is the plots folder relative to the Markdown report.
func plotsRel(o options) string {
	rel, err := filepath.Rel(filepath.Dir(o.out), o.plots)
	if err != nil {
		return o.plots
	}
	return filepath.ToSlash(rel)
}

// defaultOut and defaultPlots are -out's and -plots' defaults.
const (
	defaultOut   = "docs/benchmarks.md"
	defaultPlots = "docs/plots"
)

// renderCommand is the command line that re-renders what o renders.
func renderCommand(o options) string {
	cmd := "go run ./cmd/qmbench -render " + o.render
	if o.baseline != "" {
		cmd += " -baseline " + o.baseline
	}
	if o.predict != "" {
		cmd += " -predict " + o.predict
	}
	if o.out != defaultOut {
		cmd += " -out " + o.out
	}
	if o.plots != defaultPlots {
		cmd += " -plots " + o.plots
	}
	return cmd
}

// render rewrites the whole report (its Findings computed from the runs)
// and the plots from -json files. The files are grouped into sections by
// QEMU version and configuration (link rate, downtime ceiling, budget, guest
// RAM), in the order first listed. Within a section, a run (scenario,
// profile, policy) that an earlier file has too is left out, and so is the
// calibration of a scenario an earlier file has: a re-run of some
// scenarios, listed first, replaces them in a full run.
func render(o options) error {
	groups, err := loadGroups(strings.Split(o.render, ","))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.plots, 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString(docHeaderFor(renderCommand(o)))
	b.WriteString(findings(groups))
	b.WriteString(preemptFindings(groups))
	if o.baseline != "" {
		base, err := loadGroups(strings.Split(o.baseline, ","))
		if err != nil {
			return fmt.Errorf("-baseline: %w", err)
		}
		b.WriteString(baselineFindings(groups, base))
	}
	if o.predict != "" {
		s, err := predictFindings(strings.Split(o.predict, ","))
		if err != nil {
			return fmt.Errorf("-predict: %w", err)
		}
		b.WriteString(s)
	}
	for _, rp := range groups {
		rp.PlotsRel = plotsRel(o) // where this render writes them, not where the run did
		scs, profs := rp.scenarios()
		for _, sc := range scs {
			for _, pf := range profs {
				if o.noPlots || len(rp.runs(sc.Name, pf.Name)) == 0 {
					continue
				}
				if err := plotRuns(o.plots, rp, sc, pf); err != nil {
					return err
				}
			}
		}
		fmt.Fprintf(&b, "\n<!-- qmbench QEMU %s begin -->\n%s<!-- qmbench QEMU %s end -->\n", rp.sectionID(), rp.section(scs, profs), rp.sectionID())
	}
	return os.WriteFile(o.out, []byte(b.String()), 0o644)
}

// loadGroups reads -json files into one report per QEMU version and
// configuration, in the order first seen, each merged as render says,
// then sorted by version (stable: configurations keep their order).
func loadGroups(names []string) ([]*report, error) {
	var groups []*report
	type key struct{ sc, pf, pol string }
	seen := map[*report]map[key]bool{}
	for _, name := range names {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		b, err := os.ReadFile(name)
		if err != nil {
			return nil, err
		}
		var one report
		if err := json.Unmarshal(b, &one); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		one.fromJSON()
		i := slices.IndexFunc(groups, func(g *report) bool { return g.sameConfig(&one) })
		var rp *report
		if i < 0 {
			rp = &report{}
			*rp = one
			rp.Runs, rp.Calib = nil, map[string]float64{}
			groups = append(groups, rp)
			seen[rp] = map[key]bool{}
		} else {
			rp = groups[i]
			rp.Command += "; " + one.Command
		}
		rp.Files = append(rp.Files, sourceFile{Name: filepath.ToSlash(name), Command: one.Command, Date: one.Date})
		for sc, v := range one.Calib {
			if _, ok := rp.Calib[sc]; !ok {
				rp.Calib[sc] = v
			}
		}
		for _, r := range one.Runs {
			r.File = filepath.Base(name)
			rp.All = append(rp.All, r)
			k := key{r.Scenario, r.Profile, r.Policy}
			if !seen[rp][k] {
				seen[rp][k] = true
				rp.Runs = append(rp.Runs, r)
			}
		}
	}
	if len(groups) == 0 {
		return nil, errors.New("-render: no files")
	}
	slices.SortStableFunc(groups, func(a, b *report) int {
		switch {
		case versionLess(a.Version, b.Version):
			return -1
		case versionLess(b.Version, a.Version):
			return 1
		}
		return 0
	})
	return groups, nil
}

// scenarios are the scenarios and profiles that have runs, in the
// benchmark's order.
func (rp *report) scenarios() ([]scenario, []profile) {
	has := func(sc, pf string) bool { return len(rp.runs(sc, pf)) > 0 }
	var scs []scenario
	var profs []profile
	for _, sc := range allScenarios {
		for _, pf := range allProfiles {
			if has(sc.Name, pf.Name) && !slices.Contains(scs, sc) {
				scs = append(scs, sc)
			}
		}
	}
	for _, pf := range allProfiles {
		for _, sc := range scs {
			if has(sc.Name, pf.Name) && !slices.Contains(profs, pf) {
				profs = append(profs, pf)
			}
		}
	}
	return scs, profs
}
