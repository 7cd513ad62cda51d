package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
)

// exitUnknown: some guest's state is unknown or lost (evacuate).
const exitUnknown = 3

// evacuateOptions are the flags of "qmigrate evacuate".
type evacuateOptions struct {
	plan                                         string
	maxParallel, maxPerSource, maxPerDestination int
	jsonOut, verbose                             bool
	metricsAddr                                  string
	settings                                     []string // the migrate flags given, as given
}

func (o *evacuateOptions) flagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("qmigrate evacuate", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.plan, "plan", "", "the plan `FILE`: YAML, or JSON with the same keys (required; see PLAN below)")
	fs.IntVar(&o.maxParallel, "max-parallel", -1, "at most `N` migrations in flight in all (overrides the plan's limits.max_parallel; 0: no limit)")
	fs.IntVar(&o.maxPerSource, "max-per-source", -1, "at most `N` migrations out of each source host (overrides limits.max_per_source; 0: no limit)")
	fs.IntVar(&o.maxPerDestination, "max-per-destination", -1, "at most `N` migrations into each destination host (overrides limits.max_per_destination; 0: no limit)")
	registerMigrationFlags(fs, &o.settings)
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "serve Prometheus metrics of every migration on http://`ADDR`/metrics while the evacuation runs (each labelled name=<the migration's name>): host:port, or :port (port 0 picks a free one, said on stderr)")
	fs.BoolVar(&o.jsonOut, "json", false, "write one JSON object per line on stdout (see JSON OUTPUT in qmigrate evacuate --help); human messages go to stderr")
	fs.BoolVar(&o.verbose, "v", false, "")
	fs.BoolVar(&o.verbose, "verbose", false, "write debug logs (every QMP step of every migration) to stderr")
	return fs
}

const evacuateUsage = `Usage: qmigrate evacuate --plan FILE [flags]

Runs the migrations of a plan at once, under the plan's limits: how many in
flight in all, out of each source host and into each destination host, and a
bandwidth budget per source host shared by the migrations running there (split
among them as they start, split again as they end). Each migration is as
"qmigrate migrate" runs it; its settings are, lowest first, the plan's
defaults, the flags below, and the migration's own keys.

Flags:
`

const evacuateUsageTail = `
PLAN
  YAML, or JSON with the same keys; an unknown key is an error. The keys of
  defaults and of a migration are the migrate flags with "_" for "-" (disks
  for --disk), values written as on the command line:

    limits:                       # 0 or absent: no limit
      max_parallel: 3
      max_per_source: 2
      max_per_destination: 2
      host_bandwidth: {hostA: 64MiB}   # per source host, shared
    order: plan                   # or smallest-first; priority: higher first
    defaults: {policy: auto, max_downtime: 300ms, bandwidth: unlimited,
               timeout: 10m, allow_postcopy: false}
    migrations:
      - name: vm1
        source_host: hostA
        destination_host: hostB
        src: unix:/run/vm1-src.qmp
        dst: unix:/run/vm1-dst.qmp
        uri: unix:/run/vm1.sock
        # optional: priority, and any key of defaults, copy_storage, disks,
        # nbd, write_blocking, tls_*

OUTPUT
  Plain lines, each with the migration's name: phases, decisions, bandwidth
  changes, the end of each migration, and a closing summary.

JSON OUTPUT (--json)
  One JSON object per line on stdout. Every line of "qmigrate migrate --json"
  of every migration, each with "name"; besides them:
    {"type":"start","name","attempt","source_host","destination_host",
     "bandwidth_bps"}        an attempt starts (bandwidth_bps: its share of
                             the source host's budget, 0 without one)
    {"type":"limits","name","elapsed_ms","bandwidth_bps","max_downtime_ms",
     "budget_ms"}            a limit changed (the budget re-split)
  then one result line per migration (the migrate result with "name",
  "outcome" and "attempts"; outcome is completed, rolled-back, failed,
  unknown or not-started), the guests whose state is unknown first, and last:
    {"type":"fleet","completed","rolled_back","failed","unknown",
     "not_started","total_ms","transferred_bytes","downtime_ms",
     "max_downtime_ms","unknown_names":[...]}

EXIT STATUS
  0  every migration completed
  1  some did not, and every guest is on a known side (its source)
  2  bad usage or a bad plan (the message names the entry and the key)
  3  some guest's state is unknown or lost (named on stderr): check both QEMUs

SIGNALS
  SIGINT or SIGTERM cancels the fleet: nothing new starts, the running
  migrations roll back (those past their switchover finish).
`

func evacuateFlagOrder() []string {
	order := []string{"plan", "max-parallel", "max-per-source", "max-per-destination"}
	for _, f := range migrateFlagOrder() {
		switch f {
		case "src", "dst", "uri", "listen", "metrics-addr", "json", "verbose":
			// per migration in the plan, or placed below
		default:
			order = append(order, f)
		}
	}
	return append(order, "metrics-addr", "json", "verbose")
}

func runEvacuate(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o evacuateOptions
	fs := o.flagSet()
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, evacuateUsage)
			printFlags(stdout, fs, evacuateFlagOrder())
			fmt.Fprint(stdout, evacuateUsageTail)
			return exitOK
		}
		return evacuateUsageFailure(stderr, err)
	}
	if o.plan == "" {
		return evacuateUsageFailure(stderr, &usageError{msg: "--plan is required"})
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"--max-parallel", o.maxParallel}, {"--max-per-source", o.maxPerSource}, {"--max-per-destination", o.maxPerDestination}} {
		if f.v < -1 {
			return evacuateUsageFailure(stderr, &usageError{msg: fmt.Sprintf("%s %d is negative", f.name, f.v)})
		}
	}
	data, err := os.ReadFile(o.plan)
	if err != nil {
		return evacuateUsageFailure(stderr, fmt.Errorf("--plan: %w", err))
	}
	pf, err := readPlan(data)
	if err != nil {
		return evacuateUsageFailure(stderr, err)
	}
	if o.maxParallel >= 0 {
		pf.Limits.MaxParallel = o.maxParallel
	}
	if o.maxPerSource >= 0 {
		pf.Limits.MaxPerSource = o.maxPerSource
	}
	if o.maxPerDestination >= 0 {
		pf.Limits.MaxPerDestination = o.maxPerDestination
	}
	plan, err := buildPlan(pf, o.settings)
	if err != nil {
		return evacuateUsageFailure(stderr, err)
	}
	var d fleetDisplay
	if o.jsonOut {
		d = newFleetJSON(stdout)
	} else if _, ok := terminalWidth(stdout); ok && !o.verbose {
		// One live line per running migration and a fleet line (mpb);
		// with -v the debug logs would be written into them.
		d = newFleetTerm(stdout, 0, len(plan.Migrations))
	} else {
		d = &fleetPlain{w: stdout}
	}
	log := (&limitOptions{verbose: o.verbose}).logger(stderr)
	for i := range plan.Migrations {
		plan.Migrations[i].Config.Logger = log
	}
	plan.Observer = d.Event
	if o.metricsAddr != "" {
		ms, err := serveMetrics(o.metricsAddr)
		if err != nil {
			return evacuateUsageFailure(stderr, err)
		}
		defer ms.close()
		fmt.Fprintf(stderr, "serving metrics on http://%s/metrics\n", ms.addr())
		plan.Observer = metricsObserver(ms, d.Event)
	}
	lim := plan.Limits
	fmt.Fprintf(stderr, "qmigrate: evacuating %d guests (in flight %s, per source %s, per destination %s%s)\n",
		len(plan.Migrations), limitText(lim.MaxParallel), limitText(lim.MaxPerSource), limitText(lim.MaxPerDestination), budgetText(lim.HostBandwidth))
	rep, err := fleet.Run(ctx, plan)
	if err != nil {
		return evacuateUsageFailure(stderr, err) // a bad plan: buildPlan validated it
	}
	d.Report(rep)
	code, unknown := fleetExitCode(rep)
	for _, r := range rep.Results {
		if r.Err != nil && r.Outcome != fleet.Completed {
			printError(stderr, "qmigrate: "+r.Name, r.Err)
		}
	}
	if len(unknown) > 0 {
		fmt.Fprintf(stderr, "qmigrate: where these guests run is unknown or their state is lost: %s: check both QEMUs of each\n", strings.Join(unknown, ", "))
	}
	return code
}

// fleetExitCode is evacuate's exit status for a report, and the names of
// the guests whose state is unknown.
func fleetExitCode(rep *fleet.Report) (int, []string) {
	code := exitOK
	var unknown []string
	for _, r := range rep.Results {
		switch r.Outcome {
		case fleet.Completed:
		case fleet.Unknown:
			unknown = append(unknown, r.Name)
		default:
			code = exitFailed
		}
	}
	if len(unknown) > 0 {
		code = exitUnknown
	}
	return code, unknown
}

func evacuateUsageFailure(stderr io.Writer, err error) int {
	printError(stderr, "qmigrate evacuate", err)
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintln(stderr, "Run 'qmigrate evacuate --help' for usage.")
	}
	return exitUsage
}

func limitText(n int) string {
	if n == 0 {
		return "unlimited"
	}
	return fmt.Sprint(n)
}

func budgetText(m map[string]uint64) string {
	if len(m) == 0 {
		return ""
	}
	var parts []string
	for h, bw := range m {
		parts = append(parts, h+" "+formatBytes(bw)+"/s")
	}
	slices.Sort(parts)
	return ", bandwidth " + strings.Join(parts, ", ")
}

// fleetDisplay shows a fleet as it runs. The fleet serialises the events.
type fleetDisplay interface {
	Event(fleet.Event)
	Report(*fleet.Report)
}

// fleetPlain writes plain lines, each with the migration's name.
type fleetPlain struct {
	w io.Writer
}

func (d *fleetPlain) Event(ev fleet.Event) {
	switch ev.Kind {
	case fleet.EventStart:
		bw := ""
		if ev.Bandwidth > 0 {
			bw = ", bandwidth " + formatBytes(ev.Bandwidth) + "/s"
		}
		try := ""
		if ev.Attempt > 1 {
			try = fmt.Sprintf(" (attempt %d)", ev.Attempt)
		}
		fmt.Fprintf(d.w, "%s: starting %s -> %s%s%s\n", ev.Name, ev.SourceHost, ev.DestinationHost, try, bw)
	case fleet.EventRetry:
		fmt.Fprintf(d.w, "%s: failed (%v); retrying on a fresh destination\n", ev.Name, ev.Err)
	case fleet.EventEnd:
		r := ev.Result
		fmt.Fprintf(d.w, "%s: %s\n", ev.Name, outcomeText(r))
	case fleet.EventEngine:
		e := ev.Engine
		switch e.Kind {
		case engine.EventPhase:
			fmt.Fprintf(d.w, "%s %s: phase %s\n", formatElapsed(e.Elapsed), ev.Name, e.Phase)
		case engine.EventDecision:
			fmt.Fprintf(d.w, "%s %s: %s\n", formatElapsed(e.Elapsed), ev.Name, describeDecision(*e.Decision, e.DecisionErr, false))
		case engine.EventLimits:
			fmt.Fprintf(d.w, "%s %s: bandwidth now %s\n", formatElapsed(e.Elapsed), ev.Name, byteSize(e.Limits.Bandwidth).rate())
		}
	}
}

func outcomeText(r *fleet.Result) string {
	switch r.Outcome {
	case fleet.Completed:
		return fmt.Sprintf("completed in %s: downtime %s, %s transferred; the guest runs on the destination",
			formatDuration(r.Time), formatDuration(r.Downtime), formatBytes(r.Bytes))
	case fleet.RolledBack:
		return "rolled back: the guest runs on the source"
	case fleet.Failed:
		return "failed: the guest runs on the source"
	case fleet.NotStarted:
		return "not started: the guest was not touched"
	}
	return "state unknown or lost: check both QEMUs"
}

func (d *fleetPlain) Report(rep *fleet.Report) { fmt.Fprintln(d.w, fleetSummary(rep)) }

// fleetSummary is the last line of an evacuation, in words.
func fleetSummary(rep *fleet.Report) string {
	s := rep.Summary
	return fmt.Sprintf("fleet: %d completed, %d rolled back, %d failed, %d unknown, %d not started in %s; %s transferred, downtime total %s, longest %s",
		s.Completed, s.RolledBack, s.Failed, s.Unknown, s.NotStarted, formatDuration(s.Total), formatBytes(s.Bytes),
		formatDuration(s.Downtime), formatDuration(s.MaxDowntime))
}

// fleetJSON writes the JSON lines.
type fleetJSON struct {
	mu  sync.Mutex
	w   io.Writer
	enc *json.Encoder
}

func newFleetJSON(w io.Writer) *fleetJSON {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return &fleetJSON{w: w, enc: enc}
}

type jsonStart struct {
	Type            string `json:"type"`
	Name            string `json:"name"`
	Attempt         int    `json:"attempt"`
	SourceHost      string `json:"source_host"`
	DestinationHost string `json:"destination_host"`
	BandwidthBPS    uint64 `json:"bandwidth_bps"`
}

type jsonFleetResult struct {
	Name string `json:"name"`
	jsonResult
	Outcome  string `json:"outcome"`
	Attempts int    `json:"attempts"`
}

type jsonFleet struct {
	Type             string   `json:"type"`
	Completed        int      `json:"completed"`
	RolledBack       int      `json:"rolled_back"`
	Failed           int      `json:"failed"`
	Unknown          int      `json:"unknown"`
	NotStarted       int      `json:"not_started"`
	TotalMS          int64    `json:"total_ms"`
	TransferredBytes uint64   `json:"transferred_bytes"`
	DowntimeMS       int64    `json:"downtime_ms"`
	MaxDowntimeMS    int64    `json:"max_downtime_ms"`
	Retries          int      `json:"retries"`
	UnknownNames     []string `json:"unknown_names"`
}

func (d *fleetJSON) Event(ev fleet.Event) {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch ev.Kind {
	case fleet.EventStart:
		_ = d.enc.Encode(jsonStart{Type: "start", Name: ev.Name, Attempt: ev.Attempt, SourceHost: ev.SourceHost,
			DestinationHost: ev.DestinationHost, BandwidthBPS: ev.Bandwidth})
	case fleet.EventEngine:
		e := ev.Engine
		v := jsonEvent(e)
		if v == nil {
			return
		}
		b, err := json.Marshal(v)
		if err != nil || len(b) < 2 || b[0] != '{' {
			return
		}
		name, _ := json.Marshal(ev.Name)
		line := append([]byte(`{"name":`), name...)
		line = append(line, ',')
		line = append(line, b[1:]...)
		line = append(line, '\n')
		_, _ = d.w.Write(line)
	}
}

func (d *fleetJSON) Report(rep *fleet.Report) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := rep.Summary
	f := jsonFleet{Type: "fleet", Completed: s.Completed, RolledBack: s.RolledBack, Failed: s.Failed, Unknown: s.Unknown,
		NotStarted: s.NotStarted, TotalMS: ms(s.Total), TransferredBytes: s.Bytes, DowntimeMS: ms(s.Downtime),
		MaxDowntimeMS: ms(s.MaxDowntime), Retries: s.Retries, UnknownNames: []string{}}
	for _, r := range rep.Results {
		res := &engine.Result{Status: engine.StatusFailed}
		if r.Engine != nil {
			c := *r.Engine
			res = &c
		}
		if r.Outcome == fleet.NotStarted {
			res.Status = engine.StatusCancelled
		}
		res.Err = r.Err
		res.TransferredBytes = r.Bytes
		res.Total = r.Time
		j := jsonFleetResult{Name: r.Name, jsonResult: jsonResultOf(res), Outcome: string(r.Outcome), Attempts: r.Attempts}
		_ = d.enc.Encode(j)
		if r.Outcome == fleet.Unknown {
			f.UnknownNames = append(f.UnknownNames, r.Name)
		}
	}
	_ = d.enc.Encode(f)
}

// metricsObserver feeds every migration's engine events to the metrics,
// labelled with the migration's name, then to next.
func metricsObserver(ms *metricsServer, next func(fleet.Event)) func(fleet.Event) {
	var mu sync.Mutex
	observers := map[string]func(engine.Event){}
	return func(ev fleet.Event) {
		if ev.Kind == fleet.EventEngine {
			mu.Lock()
			obs := observers[ev.Name]
			if obs == nil {
				obs = ms.collector.Observe(ev.Name)
				observers[ev.Name] = obs
			}
			mu.Unlock()
			obs(ev.Engine)
		}
		next(ev)
	}
}
