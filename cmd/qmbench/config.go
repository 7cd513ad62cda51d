package main

import (
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/strategy"
)

// scenario is a guest workload: its dirty rate as a multiple of the link.
type scenario struct {
	Name  string
	Title string
	Ratio float64 // dirty rate / link rate; 0 = idle, +Inf = no spin at all
}

var allScenarios = []scenario{
	{"idle", "idle guest", 0},
	{"converging", "converging (dirty rate 0.5 × link)", 0.5},
	{"borderline", "borderline (dirty rate ≈ link)", 1},
	{"2x", "2 × the link", 2},
	{"10x", "10 × the link", 10},
	// The measured anchor: QEMU's own auto-converge ramp moves the
	// unthrottled guest over 256 MiB/s in about 15 s. Not in the default
	// run: -rate 268.435456 -scenarios unthrottled.
	{"unthrottled", "unthrottled sweep (no spin)", math.Inf(1)},
}

// hard reports whether pre-copy alone cannot converge.
func (s scenario) hard() bool { return s.Ratio >= 1 }

// profile is what the user permits; every policy runs under the same one.
type profile struct {
	Name  string
	Title string
	// Postcopy permits postcopy (the presets then use it the way their
	// anchors do when their operators enable it).
	Postcopy bool
}

var allProfiles = []profile{
	{"throttle", "CPU throttling permitted, no postcopy, no pause", false},
	{"postcopy", "CPU throttling and postcopy permitted, no pause", true},
}

// defaultMaxDowntime is every run's downtime ceiling unless -max-downtime
// says otherwise: Nova's default target, so Nova's ramp runs unchanged.
const defaultMaxDowntime = 500 * time.Millisecond

// Preset scaling. The anchors' timers are per GiB of guest and sized for
// real guests on real links; on a 150 MiB guest over a 32 MB/s link they
// would not act within minutes. Each preset's clock is scaled so that its
// completion timeout lands at half the run budget, keeping the ratios
// between its own timers (KubeVirt: progress timeout = completion budget of
// a 1 GB guest; Nova: 10 downtime steps then the timeout at 16/15 of the
// ramp, as with its defaults).
const (
	kubeVirtGB = 1 // a 150 MiB guest counts as ceil(0.157 GB) = 1 GB
	novaDataGB = 2 // max(RAM GiB, 2)
)

func anchorScale(budget time.Duration) (kubevirt, nova float64) {
	half := budget.Seconds() / 2
	return half / (150 * kubeVirtGB), half / (800 * novaDataGB)
}

func scaleDur(d time.Duration, f float64) time.Duration {
	return time.Duration(float64(d) * f).Round(time.Millisecond)
}

// strategyConfig is the strategy of one run.
func strategyConfig(policy string, prof profile, budget, maxDowntime time.Duration) strategy.Config {
	kv, nv := anchorScale(budget)
	return strategy.Config{
		Policy: policy,
		Limits: strategy.Limits{
			MaxDowntime:   maxDowntime,
			Budget:        budget,
			AllowPostcopy: prof.Postcopy,
		},
		KubeVirt: strategy.KubeVirtConfig{
			ProgressTimeout:         scaleDur(150*time.Second, kv),
			CompletionTimeoutPerGiB: scaleDur(150*time.Second, kv),
			AllowAutoConverge:       true, // throttling is permitted
		},
		Nova: strategy.NovaConfig{
			DelayPerGiB:             scaleDur(75*time.Second, nv),
			CompletionTimeoutPerGiB: scaleDur(800*time.Second, nv),
			TimeoutAction:           "force_complete", // postcopy when permitted, else (no pause) abort
			PermitAutoConverge:      true,
		},
	}
}

// scalingNote describes the preset scaling for the report.
func scalingNote(budget, maxDowntime time.Duration) string {
	kv, nv := anchorScale(budget)
	var b strings.Builder
	fmt.Fprintf(&b, "Every run has the same limits: budget %v (then the engine aborts), downtime ceiling %v, CPU throttling permitted; "+
		"postcopy only in the `postcopy` profile; pause never.\n\n", budget, maxDowntime)
	fmt.Fprintf(&b, "Preset clocks are scaled so that each anchor's completion timeout lands at half the budget (%v), keeping the ratios between its own timers:\n\n", budget/2)
	fmt.Fprintf(&b, "- `kubevirt` (×%.3g): completionTimeoutPerGiB 150 s → %v (× 1 GB for this guest), progressTimeout 150 s → %v; allowAutoConverge on; "+
		"postcopy at the completion timeout when permitted (allowPostCopy, allowWorkloadDisruption), else abort.\n",
		kv, scaleDur(150*time.Second, kv), scaleDur(150*time.Second, kv))
	fmt.Fprintf(&b, "- `nova` (×%.3g): live_migration_downtime_delay 75 s → %v per GiB (× 2 GiB, Nova's floor: a step every %v), "+
		"completion_timeout 800 s → %v per GiB (timeout at %v); timeout_action force_complete (postcopy when permitted, else abort: pause is not permitted); "+
		"permit_auto_converge on (Nova ignores it when postcopy is on); downtime 50 → 500 ms in 10 steps%s.\n",
		nv, scaleDur(75*time.Second, nv), scaleDur(75*time.Second, nv)*novaDataGB, scaleDur(800*time.Second, nv), scaleDur(800*time.Second, nv)*novaDataGB, heldAt(maxDowntime))
	fmt.Fprintf(&b, "- `proxmox`: unscaled (100 ms, doubling after 5 bad 1 s polls, up to the %d ms ceiling; QEMU's auto-converge ramp); no timeout of its own.\n", maxDowntime.Milliseconds())
	fmt.Fprintf(&b, "- `qemu`: QEMU alone (%d ms, no lever) until the budget.\n", min(300*time.Millisecond, maxDowntime).Milliseconds())
	b.WriteString("- `auto`: defaults.\n")
	return b.String()
}

// heldAt notes where a ceiling below Nova's 500 ms holds its ramp.
func heldAt(maxDowntime time.Duration) string {
	if maxDowntime >= defaultMaxDowntime {
		return ""
	}
	return fmt.Sprintf(", held at the %d ms ceiling", maxDowntime.Milliseconds())
}
