package main

import (
	"encoding/json"
	"fmt"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gonum.org/v1/plot/plotter"

	"github.com/qmigrate/qmigrate/strategy"
)

func TestParseXP(t *testing.T) {
	b, err := parseXP("0000000000100000: 0x2a\r\n")
	require.NoError(t, err)
	assert.Equal(t, byte(42), b)
	_, err = parseXP("Cannot access memory")
	assert.Error(t, err)
	_, err = parseXP("0000000000100000: 0x1ff")
	assert.Error(t, err)
}

func TestResolvePasses(t *testing.T) {
	for _, c := range []struct {
		low  byte
		est  int
		want int
	}{
		{0, 0, 0}, {5, 5, 5}, {6, 5, 6}, {4, 5, 4},
		{0, 255, 256}, {255, 256, 255}, {3, 300, 259},
		{250, 0, 0}, // never negative
	} {
		assert.Equal(t, c.want, resolvePasses(c.low, c.est), "low %d est %d", c.low, c.est)
	}
}

func TestLevers(t *testing.T) {
	ds := []strategy.Decision{
		{Action: strategy.SetDowntime, DowntimeLimit: 50 * time.Millisecond, At: time.Second},
		{Action: strategy.SetDowntime, DowntimeLimit: 95 * time.Millisecond, At: 2 * time.Second},
		{Action: strategy.SetThrottle, Throttle: strategy.Throttle{Max: 75}, At: 3 * time.Second},
		{Action: strategy.StartPostcopy, At: 4 * time.Second},
	}
	assert.Equal(t, "downtime 50→95 ms ×2 @1.0–2.0 s, throttle 75 % @3.0 s, postcopy @4.0 s", levers(ds))
	assert.Equal(t, "none", levers(nil))
}

func TestJudge(t *testing.T) {
	run := func(pol, status string, total time.Duration, base, during float64) *runResult {
		return &runResult{Policy: pol, Status: status, Total: total, BaseRate: base, DuringRate: during}
	}
	v := judge([]*runResult{
		run("auto", "completed", 10*time.Second, 100e6, 60e6),
		run("qemu", "aborted", 60*time.Second, 100e6, 100e6),
		run("proxmox", "completed", 25*time.Second, 100e6, 30e6),
		run("nova", "completed", 40*time.Second, 100e6, 90e6),
	})
	assert.True(t, v.Met, v.Why)
	assert.Equal(t, "proxmox", v.Best.Policy)
	v = judge([]*runResult{run("auto", "completed", 15*time.Second, 100e6, 60e6), run("proxmox", "completed", 25*time.Second, 100e6, 30e6)})
	assert.False(t, v.Met, "0.6× is not half")
	v = judge([]*runResult{run("auto", "completed", 15*time.Second, 100e6, 60e6), run("qemu", "aborted", 60*time.Second, 1, 1)})
	assert.True(t, v.Met)
	assert.Equal(t, "auto completes, no anchor preset does", v.Why)
	v = judge([]*runResult{run("auto", "completed", 7*time.Second, 100e6, 63e6), run("kubevirt", "completed", 32*time.Second, 100e6, 67e6)})
	assert.False(t, v.Met, "a higher slowdown rate")
	assert.True(t, v.MetLost, "2.6 s of work lost against 10.6 s")
	v = judge([]*runResult{run("auto", "aborted", 15*time.Second, 100e6, 60e6)})
	assert.False(t, v.Met)
}

func TestMergeSection(t *testing.T) {
	p := filepath.Join(t.TempDir(), "b.md")
	require.NoError(t, mergeSection(p, "10.0.2", "ten\n"))
	require.NoError(t, mergeSection(p, "7.2.22", "seven\n"))
	require.NoError(t, mergeSection(p, "10.0.2", "ten again\n"))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	doc := string(b)
	assert.True(t, strings.HasPrefix(doc, docHeader))
	assert.NotContains(t, doc, "ten\n")
	assert.Less(t, strings.Index(doc, "seven"), strings.Index(doc, "ten again"), "versions in order")
	assert.Equal(t, 1, strings.Count(doc, "<!-- qmbench QEMU 10.0.2 begin -->"))
	assert.True(t, versionLess("7.2.22", "10.0.2"))
	assert.False(t, versionLess("10.0.2", "10.0.2"))
}

func TestPlots(t *testing.T) {
	pts := func(end time.Duration, last uint64) []point {
		return []point{{At: 0, Remaining: 150e6}, {At: end / 2, Remaining: 80e6}, {At: end, Remaining: last}}
	}
	ss := []series{
		{Name: "auto", Color: policyColor("auto"), Points: pts(10*time.Second, 0), Outcome: "completed",
			Decisions: []strategy.Decision{{Action: strategy.SetThrottle, Throttle: strategy.Throttle{Max: 95}, At: 4 * time.Second}},
			Guest:     []guestSample{{At: time.Second, Rate: 60e6}, {At: 2 * time.Second, Rate: 20e6}}, BaseRate: 64e6},
		{Name: "qemu", Color: policyColor("qemu"), Points: pts(60*time.Second, 99e6), Outcome: "aborted",
			Decisions: []strategy.Decision{{Action: strategy.Abort, At: 60 * time.Second}}},
	}
	base := filepath.Join(t.TempDir(), "p")
	p, err := plotRemaining("2 × the link, throttle profile: QEMU 7.2.22", ss)
	require.NoError(t, err)
	require.NoError(t, writeImages(base, p))
	f, err := os.Open(base + ".png")
	require.NoError(t, err)
	defer f.Close()
	img, err := png.Decode(f)
	require.NoError(t, err)
	assert.Equal(t, 960, img.Bounds().Dx())
	assert.Equal(t, 540, img.Bounds().Dy())
	counts := map[[3]uint32]int{}
	for y := range img.Bounds().Dy() {
		for x := range img.Bounds().Dx() {
			r, g, b, _ := img.At(x, y).RGBA()
			counts[[3]uint32{r >> 8, g >> 8, b >> 8}]++
		}
	}
	for _, pol := range []string{"auto", "qemu"} {
		c := policyColor(pol)
		assert.Greater(t, counts[[3]uint32{uint32(c.R), uint32(c.G), uint32(c.B)}], 200, "%s's line is drawn", pol)
	}
	svg, err := os.ReadFile(base + ".svg")
	require.NoError(t, err)
	assert.Contains(t, string(svg), "<svg", "an SVG beside the PNG")

	ps, err := plotLevers("levers", ss)
	require.NoError(t, err)
	require.NoError(t, writeImages(base+"-levers", ps...))
	assert.True(t, hasGuest(ss))
	p, err = plotGuest("guest", ss)
	require.NoError(t, err)
	require.NoError(t, writeImages(base+"-guest", p))

	// An empty plot still renders.
	p, err = plotRemaining("empty", nil)
	require.NoError(t, err)
	require.NoError(t, writeImages(base+"-empty", p))
}

func TestLeverSteps(t *testing.T) {
	throttle := func(pt point) float64 { return float64(pt.Throttle) }
	decided := func(d strategy.Decision) (float64, bool) {
		return float64(d.Throttle.Max), d.Action == strategy.SetThrottle
	}
	// Without the values in force: a step line from the decisions to the end.
	s := series{Points: []point{{At: 0}, {At: 10 * time.Second}}, Decisions: []strategy.Decision{
		{Action: strategy.SetThrottle, Throttle: strategy.Throttle{Max: 50}, At: 2 * time.Second},
		{Action: strategy.SetDowntime, DowntimeLimit: time.Second, At: 3 * time.Second},
		{Action: strategy.SetThrottle, Throttle: strategy.Throttle{Max: 90}, At: 4 * time.Second},
	}}
	assert.Equal(t, plotter.XYs{{X: 2, Y: 50}, {X: 4, Y: 50}, {X: 4, Y: 90}, {X: 10, Y: 90}}, leverSteps(s, throttle, decided))
	assert.Equal(t, 50.0, valueAt(leverSteps(s, throttle, decided), 3))
	// With them: the samples.
	s.Points = []point{{At: 0, DowntimeLimit: 100 * time.Millisecond}, {At: 5 * time.Second, Throttle: 20, DowntimeLimit: 100 * time.Millisecond}}
	assert.Equal(t, plotter.XYs{{X: 0, Y: 0}, {X: 5, Y: 20}}, leverSteps(s, throttle, decided))
}

func TestStrategyConfigsValid(t *testing.T) {
	for _, p := range allProfiles {
		for _, pol := range strategy.Policies() {
			cfg := strategyConfig(pol, p, 60*time.Second, defaultMaxDowntime)
			require.NoError(t, cfg.Validate(), "%s/%s", pol, p.Name)
			assert.Equal(t, p.Postcopy, cfg.Limits.AllowPostcopy)
		}
	}
	kv, nv := anchorScale(60 * time.Second)
	assert.InDelta(t, 0.2, kv, 1e-9, "KubeVirt's 150 s completion for 1 GB lands at 30 s")
	assert.InDelta(t, 30.0/1600, nv, 1e-9, "Nova's 800 s × 2 GiB lands at 30 s")
}

func TestRenderFromJSON(t *testing.T) {
	dir := t.TempDir()
	nan := math.NaN()
	rp := &report{Version: "7.2.22", Command: "go run ./cmd/qmbench", Rate: 32e6, Budget: time.Minute, MemMiB: 150,
		Calib: map[string]float64{"2x": 64e6}, PlotsRel: "run-plots",
		Runs: []*runResult{
			{Scenario: "2x", Profile: "throttle", Policy: "auto", Status: "completed", Total: 12 * time.Second,
				BaseRate: 64e6, DuringRate: 40e6, BeforeRate: 60e6, AfterRate: nan, Intact: true,
				Points: []point{{At: 0, Remaining: 150e6}, {At: 12 * time.Second}}},
			{Scenario: "2x", Profile: "throttle", Policy: "qemu", Status: "aborted", Total: time.Minute,
				BaseRate: 64e6, DuringRate: nan, Intact: true, Points: []point{{At: 0, Remaining: 150e6}, {At: time.Minute, Remaining: 99e6}}},
		}}
	b, err := json.Marshal(rp.forJSON())
	require.NoError(t, err, "NaN rates are encoded")
	assert.True(t, math.IsNaN(rp.Runs[1].DuringRate), "the original is left alone")
	js := filepath.Join(dir, "r.json")
	require.NoError(t, os.WriteFile(js, b, 0o644))
	md := filepath.Join(dir, "b.md")
	require.NoError(t, run(t.Context(), options{render: js, out: md, plots: filepath.Join(dir, "plots")}), "the plots folder is created")
	doc, err := os.ReadFile(md)
	require.NoError(t, err)
	assert.Contains(t, string(doc), "| auto | completed | 12.0 s |")
	assert.Contains(t, string(doc), "| 2x | throttle | completed 12.0 s | none completes | 60.0 MB/s / – | yes | auto completes, no anchor preset does | yes |")
	_, err = os.Stat(filepath.Join(dir, "plots", "7.2.22-2x-throttle.png"))
	assert.NoError(t, err)
	// The image links point where this render wrote the plots, not where
	// the run that made the JSON did ("plots").
	assert.Contains(t, string(doc), "](plots/7.2.22-2x-throttle.png)")
	assert.Contains(t, string(doc), "downtime ceiling 500ms", "a file without MaxDowntime ran at the default ceiling")

	// A run with another ceiling (and the unthrottled scenario) renders
	// with it.
	rp.MaxDowntime = 300 * time.Millisecond
	rp.Calib = map[string]float64{"unthrottled": 50e9}
	for _, r := range rp.Runs {
		r.Scenario = "unthrottled"
	}
	b, err = json.Marshal(rp.forJSON())
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(js, b, 0o644))
	require.NoError(t, run(t.Context(), options{render: js, out: md, plots: filepath.Join(dir, "plots")}))
	doc, err = os.ReadFile(md)
	require.NoError(t, err)
	assert.Contains(t, string(doc), "downtime ceiling 300ms")
	assert.Contains(t, string(doc), "up to the 300 ms ceiling")
	assert.Contains(t, string(doc), "in 10 steps, held at the 300 ms ceiling")
	assert.Contains(t, string(doc), "The guest sweeps with no spin, as fast as TCG runs it; calibration measured 50.00 GB/s")
	assert.Contains(t, string(doc), "| unthrottled | throttle | completed 12.0 s | none completes | 60.0 MB/s / – | yes |")
}

func TestMaxDowntimeReachesTheStrategy(t *testing.T) {
	cfg := strategyConfig("auto", allProfiles[0], time.Minute, 300*time.Millisecond)
	assert.Equal(t, 300*time.Millisecond, cfg.Limits.MaxDowntime)
	for _, d := range []time.Duration{0, -time.Second, strategy.QEMUMaxDowntime + time.Millisecond} {
		err := run(t.Context(), options{maxDowntime: d, scenarios: "idle", profiles: "throttle", policies: "auto"})
		assert.ErrorContains(t, err, "-max-downtime", "checked before anything starts: %v", d)
	}
}

// A re-run of a scenario listed before the full run replaces that
// scenario's runs and calibration; the others come from the full run.
func TestRenderRerunReplaces(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, total time.Duration, calib float64, scs ...string) string {
		rp := &report{Version: "10.0.2", Command: "go run ./cmd/qmbench " + name, Rate: 32e6, Budget: time.Minute, MemMiB: 150,
			Calib: map[string]float64{}}
		for _, sc := range scs {
			rp.Calib[sc] = calib
			rp.Runs = append(rp.Runs, &runResult{Scenario: sc, Profile: "throttle", Policy: "auto", Status: "completed",
				Total: total, BaseRate: 32e6, DuringRate: 30e6, Intact: true, Points: []point{{At: 0, Remaining: 150e6}, {At: total}}})
		}
		b, err := json.Marshal(rp.forJSON())
		require.NoError(t, err)
		p := filepath.Join(dir, name+".json")
		require.NoError(t, os.WriteFile(p, b, 0o644))
		return p
	}
	rerun := mk("rerun", 10*time.Second, 31e6, "borderline")
	full := mk("full", 12*time.Second, 24e6, "borderline", "2x")
	md := filepath.Join(dir, "b.md")
	require.NoError(t, run(t.Context(), options{render: rerun + "," + full, out: md, plots: filepath.Join(dir, "plots")}))
	doc, err := os.ReadFile(md)
	require.NoError(t, err)
	assert.Contains(t, string(doc), "| borderline | throttle | completed 10.0 s |", "the re-run's borderline")
	assert.NotContains(t, string(doc), "| borderline | throttle | completed 12.0 s |", "the full run's borderline is left out")
	assert.Contains(t, string(doc), "| 2x | throttle | completed 12.0 s |", "the full run's 2x")
	assert.Contains(t, string(doc), "Target dirty rate 32.0 MB/s (1.0 × 32.0 MB/s); calibration measured 31.0 MB/s", "the re-run's calibration")
	assert.Contains(t, string(doc), "Target dirty rate 64.0 MB/s (2.0 × 32.0 MB/s); calibration measured 24.0 MB/s", "the full run's")
}

// The committed report is what its own first lines' command renders from
// the committed results, byte for byte, prose included.
func TestCommittedReportReproduces(t *testing.T) {
	for _, report := range []string{defaultOut, "docs/preempt.md"} {
		t.Run(report, func(t *testing.T) { committedReportReproduces(t, report) })
	}
}

func committedReportReproduces(t *testing.T, report string) {
	root, err := filepath.Abs("../..")
	require.NoError(t, err)
	want, err := os.ReadFile(filepath.Join(root, report))
	require.NoError(t, err)
	var cmd string
	for _, l := range strings.SplitN(string(want), "\n", 12) {
		if strings.HasPrefix(l, "go run ./cmd/qmbench -render ") {
			cmd = l
			break
		}
	}
	require.NotEmpty(t, cmd, "the report's first lines give the command that re-renders it")
	args := strings.Fields(strings.TrimPrefix(cmd, "go run ./cmd/qmbench "))
	require.True(t, len(args)%2 == 0 && args[0] == "-render", "-render FILES [-baseline FILES] [-predict FILES] [-out FILE -plots DIR]: %q", args)
	o := options{out: defaultOut, plots: defaultPlots, noPlots: true}
	for i := 0; i < len(args); i += 2 {
		switch args[i] {
		case "-render":
			o.render = args[i+1]
		case "-baseline":
			o.baseline = args[i+1]
		case "-predict":
			o.predict = args[i+1]
		case "-out":
			o.out = args[i+1]
		case "-plots":
			o.plots = args[i+1]
		default:
			t.Fatalf("the report's command has %s: only -render, -baseline, -predict, -out and -plots", args[i])
		}
	}
	require.Equal(t, report, o.out, "the command renders this report")

	// Render as that command would in a checkout: docs/results read from
	// this one, the report and plots written to a copy of its layout.
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "docs"), 0o755))
	require.NoError(t, os.Symlink(filepath.Join(root, "docs", "results"), filepath.Join(dir, "docs", "results")))
	t.Chdir(dir)
	// The plots take a minute under -race: drawn by TestPlots, here only
	// their links are checked against the committed ones.
	require.NoError(t, run(t.Context(), o))
	got, err := os.ReadFile(o.out)
	require.NoError(t, err)
	if string(got) != string(want) {
		t.Errorf("%s differs from what its command renders:\n%s", report, lineDiff(string(want), string(got)))
	}
	// Every plot the report links to is committed.
	links := regexp.MustCompile(`\]\((plots/[^)]+)\)`).FindAllStringSubmatch(string(got), -1)
	assert.NotEmpty(t, links)
	for _, m := range links {
		_, err := os.Stat(filepath.Join(root, "docs", m[1]))
		assert.NoError(t, err, "linked plot %s", m[1])
	}
}

// lineDiff lists the lines of want and got that differ (at most 20).
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	n := 0
	for i := 0; i < max(len(w), len(g)) && n < 20; i++ {
		var a, c string
		if i < len(w) {
			a = w[i]
		}
		if i < len(g) {
			c = g[i]
		}
		if a != c {
			fmt.Fprintf(&b, "line %d:\n- %s\n+ %s\n", i+1, a, c)
			n++
		}
	}
	return b.String()
}

// The preempt comparison: medians over every postcopy run of the two
// sections that differ only in -no-preempt; nothing without such a pair.
func TestPreemptFindings(t *testing.T) {
	run := func(total, at time.Duration, base, during float64) *runResult {
		return &runResult{Scenario: "10x", Profile: "postcopy", Policy: "auto", Status: "completed", Postcopy: true,
			Total: total, Downtime: 40 * time.Millisecond, BaseRate: base, DuringRate: during,
			Decisions: []strategy.Decision{{Action: strategy.StartPostcopy, At: at}}}
	}
	on := &report{Version: "10.0.2", Rate: 32e6, Budget: time.Minute, MemMiB: 150,
		All: []*runResult{run(7*time.Second, 3*time.Second, 100e6, 70e6), run(9*time.Second, 3*time.Second, 100e6, 50e6), {Scenario: "10x", Profile: "postcopy", Policy: "auto", Status: "aborted"}}}
	off := &report{Version: "10.0.2", Rate: 32e6, Budget: time.Minute, MemMiB: 150, NoPreempt: true,
		All: []*runResult{run(8*time.Second, 3*time.Second, 100e6, 60e6)}}
	assert.Empty(t, preemptFindings([]*report{on}))
	s := preemptFindings([]*report{on, off})
	t.Log(s)
	assert.Contains(t, s, "QEMU 10.0.2: 2 and 1 runs in postcopy.")
	assert.Contains(t, s, "| 10x / postcopy | auto | 2 / 1 | 8.0 s [7.0–9.0 s] / 8.0 s | 5.0 s [4.0–6.0 s] / 5.0 s | 40 % [30–50 %] / 40 % | 3.3 s [2.1–4.5 s] / 3.2 s | 40 ms [40–40 ms] / 40 ms |")
}
