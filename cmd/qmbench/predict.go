package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// predictResults is what integration's TestPredictAccuracy writes
// (QMIGRATE_PREDICT_JSON): qmigrate check --predict's verdict beside the
// migration that followed, per guest.
type predictResults struct {
	Version, Command string
	Date             time.Time
	Link             float64
	Rows             []struct {
		Guest                 string
		SweepBps, MeasuredBps float64
		WorkingSet            uint64
		PredLever             string
		PredThrottle          int
		PredTime              time.Duration
		PredConverges         bool
		Lever                 string
		Throttle              int
		Status                string
		Time, Downtime        time.Duration
	}
	file string
}

// predictFindings renders the -predict files: predicted against measured
// lever, throttle and time, and the errors, every figure from the files.
func predictFindings(names []string) (string, error) {
	var docs []*predictResults
	for _, name := range names {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		b, err := os.ReadFile(name)
		if err != nil {
			return "", err
		}
		d := &predictResults{file: filepath.Base(name)}
		if err := json.Unmarshal(b, d); err != nil {
			return "", fmt.Errorf("%s: %w", name, err)
		}
		docs = append(docs, d)
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("### check --predict against real migrations\n\n")
	w("`qmigrate check --predict` on a pair (its bandwidth: the link), then the migration it predicts, with the auto policy and default limits, the guest a sweep tuned to a multiple of the link (raw results: ")
	for i, d := range docs {
		if i > 0 {
			w(", ")
		}
		w("`%s` (%s, QEMU %s)", d.file, d.Date.UTC().Format("2006-01-02"), d.Version)
	}
	w("; one run per row; see docs/predict.md for what the model measures and assumes). Time error: predicted / measured − 1.\n\n")
	w("| QEMU | guest | guest rate (sweep / calc-dirty-rate) | predicted | measured | lever | time error |\n|---|---|---|---|---|---|---|\n")
	n, right := 0, 0
	maxPts := 0
	var errs []float64
	for _, d := range docs {
		for _, r := range d.Rows {
			n++
			same := r.PredLever == r.Lever
			if same {
				right++
				maxPts = max(maxPts, abs(r.PredThrottle-r.Throttle))
			}
			verdict := "right"
			if !same {
				verdict = "**wrong**"
			}
			pred := fmt.Sprintf("%s, %.1f s", leverText(r.PredLever, r.PredThrottle), r.PredTime.Seconds())
			if !r.PredConverges {
				pred = "does not finish: " + pred
			}
			meas := fmt.Sprintf("%s %s, %.1f s, down %d ms", r.Status, leverText(r.Lever, r.Throttle), r.Time.Seconds(), r.Downtime.Milliseconds())
			te := "–"
			if r.Status == "completed" && r.Time > 0 {
				e := r.PredTime.Seconds()/r.Time.Seconds() - 1
				te = fmt.Sprintf("%+.0f %%", 100*e)
				if r.SweepBps > 0 {
					errs = append(errs, e)
				} else {
					te = "upper bound (idle)"
				}
			}
			w("| %s | %s | %.0f / %.0f MB/s | %s | %s | %s | %s |\n", d.Version, r.Guest, r.SweepBps/1e6, r.MeasuredBps/1e6, pred, meas, verdict, te)
		}
	}
	w("\nThe lever was right in %s rows (the throttle within %d points where it was)", pct(right, n), maxPts)
	if len(errs) > 0 {
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, e := range errs {
			lo, hi = math.Min(lo, e), math.Max(hi, e)
		}
		w("; the time error of the guests that dirty memory ranged %+.0f %% to %+.0f %% (an idle guest's RAM is zero pages, which QEMU sends almost for free: its predicted time is an upper bound)", 100*lo, 100*hi)
	}
	w(".\n\n")
	return b.String(), nil
}

func leverText(lever string, throttle int) string {
	if lever == "throttle" {
		return fmt.Sprintf("throttle %d %%", throttle)
	}
	if lever == "none" || lever == "" {
		return "no lever"
	}
	return lever
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}
