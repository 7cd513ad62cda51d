package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qmp"
)

// statusOptions are the flags of "qmigrate status".
type statusOptions struct {
	src, dst       string
	connectTimeout duration
	jsonOut        bool
	qmp            qmpOptions
}

func (o *statusOptions) flagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("qmigrate status", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	o.connectTimeout = duration(defaultConnectTimeout)
	fs.StringVar(&o.src, "src", "", "QMP socket `ADDR` of the source QEMU: unix:/path or tcp:host:port (required)")
	fs.StringVar(&o.dst, "dst", "", "QMP socket `ADDR` of the destination QEMU: unix:/path or tcp:host:port (optional)")
	fs.Var(&o.connectTimeout, "connect-timeout", "bound on connecting to each QMP socket and on every answer, a `duration`")
	fs.BoolVar(&o.jsonOut, "json", false, "write one JSON object per line on stdout (see JSON OUTPUT below)")
	o.qmp.register(fs)
	return fs
}

const statusUsage = `Usage: qmigrate status --src ADDR [--dst ADDR] [--json]

Shows what each QEMU is doing, changing nothing (it sends only query-*
commands, qom-list and qom-get): its run state, its migration's status and
statistics (query-migrate), the migration parameters and capabilities in
force, and the leftovers qmigrate recognises as its own (every id qmigrate
creates on a QEMU starts with "qmigrate-"): its journal (what the QEMU's
capabilities and parameters were before the migration, with the migration's
token and start time), TLS credentials, disk mirror jobs, NBD client nodes and
exports. A migration of qmigrate's in flight, or its leftovers, are what
'qmigrate adopt' takes over.

ADDR is a QMP socket: unix:/path or tcp:host:port. A QEMU monitor serves one
client at a time: status cannot read a QEMU a running qmigrate holds through
the same socket.

Flags:
`

const statusUsageTail = `
JSON OUTPUT (--json)
  One JSON object per line on stdout, each with a "type":
    {"type":"qemu","side","address","run_state","migration_status",
     "total_ms","setup_ms","downtime_ms","expected_downtime_ms","iteration",
     "transferred_bytes","remaining_bytes","total_bytes","dirty_rate_bps",
     "throughput_bps","throttle_pct"[,"error"],"downtime_limit_ms",
     "max_bandwidth_bps","capabilities":[enabled, ...],"objects":[...],
     "journals":[{"id","token","started","source_running","tls","storage"}]}
        one per QEMU read (source, then destination)
    {"type":"storage","jobs":[...],"nbd_nodes":[...],"exports":[...]}
        qmigrate's mirror jobs and NBD client nodes on the source, exports
        on the destination
  The last line is the result:
    {"type":"result","status","in_flight","leftovers","token","total_ms"
     [,"error"]}
        status is "ok" once both QEMUs were read, "error" otherwise;
        in_flight is true while the source's migration is neither none nor
        ended; leftovers is true when anything of qmigrate's is on either QEMU;
        token is the journal's (the migration qmigrate adopt would take over)

EXIT STATUS
  0  the status was read
  2  bad usage, or a QEMU that cannot be reached or does not answer
`

type jsonStatusJournal struct {
	ID            string `json:"id"`
	Token         string `json:"token"`
	Started       string `json:"started"`
	SourceRunning bool   `json:"source_running"`
	TLS           bool   `json:"tls"`
	Storage       bool   `json:"storage"`
}

type jsonStatusQEMU struct {
	Type               string              `json:"type"`
	Side               string              `json:"side"`
	Address            string              `json:"address"`
	RunState           string              `json:"run_state"`
	MigrationStatus    string              `json:"migration_status"`
	TotalMS            int64               `json:"total_ms"`
	SetupMS            int64               `json:"setup_ms"`
	DowntimeMS         int64               `json:"downtime_ms"`
	ExpectedDowntimeMS int64               `json:"expected_downtime_ms"`
	Iteration          uint64              `json:"iteration"`
	TransferredBytes   uint64              `json:"transferred_bytes"`
	RemainingBytes     uint64              `json:"remaining_bytes"`
	TotalBytes         uint64              `json:"total_bytes"`
	DirtyRateBPS       uint64              `json:"dirty_rate_bps"`
	ThroughputBPS      uint64              `json:"throughput_bps"`
	ThrottlePct        int                 `json:"throttle_pct"`
	Error              string              `json:"error,omitempty"`
	DowntimeLimitMS    int64               `json:"downtime_limit_ms"`
	MaxBandwidthBPS    uint64              `json:"max_bandwidth_bps"`
	Capabilities       []string            `json:"capabilities"`
	Objects            []string            `json:"objects"`
	Journals           []jsonStatusJournal `json:"journals"`
}

type jsonStatusStorage struct {
	Type     string   `json:"type"`
	Jobs     []string `json:"jobs"`
	NBDNodes []string `json:"nbd_nodes"`
	Exports  []string `json:"exports"`
}

type jsonStatusResult struct {
	Type      string `json:"type"`
	Status    string `json:"status"`
	InFlight  bool   `json:"in_flight"`
	Leftovers bool   `json:"leftovers"`
	Token     string `json:"token"`
	TotalMS   int64  `json:"total_ms"`
	Error     string `json:"error,omitempty"`
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// statusQEMU is one QEMU's line.
func statusQEMU(s *engine.SideStatus, address string) jsonStatusQEMU {
	j := jsonStatusQEMU{Type: "qemu", Side: string(s.Side), Address: address, RunState: s.RunState,
		MigrationStatus: "none", Objects: nonNil(s.Objects), Journals: []jsonStatusJournal{}, Capabilities: []string{}}
	if m := s.Migration; m != nil {
		if m.Status != "" {
			j.MigrationStatus = string(m.Status)
		}
		j.TotalMS, j.SetupMS, j.DowntimeMS, j.ExpectedDowntimeMS = ms(m.TotalTime), ms(m.SetupTime), ms(m.Downtime), ms(m.ExpectedDowntime)
		j.ThrottlePct, j.Error = m.CPUThrottlePercentage, m.ErrorDesc
		if r := m.RAM; r != nil {
			j.Iteration, j.TransferredBytes, j.RemainingBytes, j.TotalBytes = r.DirtySyncCount, r.Transferred, r.Remaining, r.Total
			j.DirtyRateBPS, j.ThroughputBPS = rate(r.DirtyRate()), rate(r.Throughput())
		}
	}
	if p := s.Parameters; p != nil {
		j.DowntimeLimitMS = ms(p.DowntimeLimitDuration())
		if p.MaxBandwidth != nil {
			j.MaxBandwidthBPS = *p.MaxBandwidth
		}
	}
	for name, on := range s.Capabilities {
		if on {
			j.Capabilities = append(j.Capabilities, name)
		}
	}
	sort.Strings(j.Capabilities)
	for _, jr := range s.Journals {
		j.Journals = append(j.Journals, jsonStatusJournal{ID: jr.ID, Token: jr.Token, Started: jr.Started.UTC().Format(time.RFC3339),
			SourceRunning: jr.SourceRunning, TLS: jr.TLS, Storage: jr.Storage})
	}
	return j
}

// statusVerdict sums the status up.
func statusVerdict(st *engine.Status) (inFlight, leftovers bool, token string) {
	if m := st.Source.Migration; m != nil && m.Status != qmp.StatusNone && !m.Status.Terminal() {
		inFlight = true
	}
	leftovers = !st.Storage.Empty()
	for _, s := range []*engine.SideStatus{&st.Source, st.Destination} {
		if s == nil {
			continue
		}
		if len(s.Objects) > 0 {
			leftovers = true
		}
		for _, j := range s.Journals {
			if token == "" {
				token = j.Token
			}
		}
	}
	return inFlight, leftovers, token
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o statusOptions
	fs := o.flagSet()
	start := time.Now()
	fail := func(jsonOut bool, err error) int {
		printError(stderr, "qmigrate status", err)
		var ue *usageError
		if errors.As(err, &ue) {
			fmt.Fprintln(stderr, "Run 'qmigrate status --help' for usage.")
		}
		if jsonOut {
			writeJSON(stdout, jsonStatusResult{Type: "result", Status: "error", TotalMS: ms(time.Since(start)), Error: err.Error()})
		}
		return exitUsage
	}
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, statusUsage)
			printFlags(stdout, fs, []string{"src", "dst", "connect-timeout", "qmp-tls-x509", "insecure-qmp", "json"})
			fmt.Fprint(stdout, statusUsageTail)
			return exitOK
		}
		return fail(wantsJSON(args), err)
	}
	cfg := engine.InspectConfig{ConnectTimeout: time.Duration(o.connectTimeout)}
	src, err := checkAddress("--src", o.src)
	if err != nil {
		return fail(o.jsonOut, &usageError{msg: err.Error()})
	}
	if cfg.Source, err = o.qmp.endpoint("--src", o.src, src); err != nil {
		return fail(o.jsonOut, &usageError{msg: err.Error()})
	}
	if o.dst != "" {
		dst, err := checkAddress("--dst", o.dst)
		if err != nil {
			return fail(o.jsonOut, &usageError{msg: err.Error()})
		}
		if qmp.SameSocket(src, dst) {
			return fail(o.jsonOut, &usageError{msg: fmt.Sprintf("--src and --dst are the same socket (%q, %q)", o.src, o.dst)})
		}
		if cfg.Destination, err = o.qmp.endpoint("--dst", o.dst, dst); err != nil {
			return fail(o.jsonOut, &usageError{msg: err.Error()})
		}
	}
	if o.connectTimeout == 0 {
		return fail(o.jsonOut, &usageError{msg: "--connect-timeout must be more than 0"})
	}
	st, err := engine.Inspect(ctx, cfg)
	if err != nil {
		mo := migrateOptions{src: o.src, dst: o.dst}
		if cerr := mo.connectFailure(err, connectBound{timeout: cfg.ConnectTimeout, flag: "--connect-timeout"}); cerr != nil {
			err = cerr
		}
		return fail(o.jsonOut, err)
	}
	inFlight, leftovers, token := statusVerdict(st)
	sides := []*engine.SideStatus{&st.Source}
	addrs := []string{o.src}
	if st.Destination != nil {
		sides, addrs = append(sides, st.Destination), append(addrs, o.dst)
	}
	if o.jsonOut {
		for i, s := range sides {
			writeJSON(stdout, statusQEMU(s, addrs[i]))
		}
		writeJSON(stdout, jsonStatusStorage{Type: "storage", Jobs: nonNil(st.Storage.Jobs), NBDNodes: nonNil(st.Storage.NBDNodes),
			Exports: nonNil(st.Storage.Exports)})
		writeJSON(stdout, jsonStatusResult{Type: "result", Status: "ok", InFlight: inFlight, Leftovers: leftovers, Token: token,
			TotalMS: ms(time.Since(start))})
		return exitOK
	}
	printStatus(stdout, st, sides, addrs, inFlight, leftovers, token)
	return exitOK
}

// printStatus writes the table: one column per QEMU, then the storage
// leftovers and a verdict.
func printStatus(w io.Writer, st *engine.Status, sides []*engine.SideStatus, addrs []string, inFlight, leftovers bool, token string) {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	js := make([]jsonStatusQEMU, len(sides))
	for i, s := range sides {
		js[i] = statusQEMU(s, addrs[i])
	}
	row := func(name string, f func(j jsonStatusQEMU) string) {
		cells := []string{name}
		some := false
		for _, j := range js {
			c := f(j)
			if c != "" {
				some = true
			} else {
				c = "-"
			}
			cells = append(cells, c)
		}
		if some || name == "" {
			fmt.Fprintln(tw, strings.Join(cells, "\t"))
		}
	}
	row("", func(j jsonStatusQEMU) string { return strings.ToUpper(j.Side) })
	row("address", func(j jsonStatusQEMU) string { return j.Address })
	row("run state", func(j jsonStatusQEMU) string { return j.RunState })
	row("migration", func(j jsonStatusQEMU) string {
		if j.TotalMS > 0 {
			return fmt.Sprintf("%s (%s)", j.MigrationStatus, formatDuration(time.Duration(j.TotalMS)*time.Millisecond))
		}
		return j.MigrationStatus
	})
	when := func(f func(j jsonStatusQEMU) string) func(j jsonStatusQEMU) string {
		return func(j jsonStatusQEMU) string {
			if j.TotalBytes == 0 && j.TransferredBytes == 0 {
				return ""
			}
			return f(j)
		}
	}
	row("pass", when(func(j jsonStatusQEMU) string { return fmt.Sprint(j.Iteration) }))
	row("sent", when(func(j jsonStatusQEMU) string { return formatBytes(j.TransferredBytes) }))
	row("remaining", when(func(j jsonStatusQEMU) string {
		return fmt.Sprintf("%s of %s", formatBytes(j.RemainingBytes), formatBytes(j.TotalBytes))
	}))
	row("throughput", when(func(j jsonStatusQEMU) string { return formatRate(float64(j.ThroughputBPS)) }))
	row("dirty rate", when(func(j jsonStatusQEMU) string { return formatRate(float64(j.DirtyRateBPS)) }))
	row("expected downtime", when(func(j jsonStatusQEMU) string {
		return formatDuration(time.Duration(j.ExpectedDowntimeMS) * time.Millisecond)
	}))
	row("throttle", func(j jsonStatusQEMU) string {
		if j.ThrottlePct == 0 {
			return ""
		}
		return fmt.Sprintf("%d%%", j.ThrottlePct)
	})
	row("error", func(j jsonStatusQEMU) string { return j.Error })
	row("downtime limit", func(j jsonStatusQEMU) string {
		return formatDuration(time.Duration(j.DowntimeLimitMS) * time.Millisecond)
	})
	row("max bandwidth", func(j jsonStatusQEMU) string {
		if j.MaxBandwidthBPS == 0 || j.MaxBandwidthBPS >= engine.UnlimitedBandwidth {
			return "unlimited"
		}
		return formatRate(float64(j.MaxBandwidthBPS))
	})
	row("capabilities on", func(j jsonStatusQEMU) string { return strings.Join(j.Capabilities, ", ") })
	row("qmigrate objects", func(j jsonStatusQEMU) string { return strings.Join(j.Objects, ", ") })
	row("journal", func(j jsonStatusQEMU) string {
		var out []string
		for _, jr := range j.Journals {
			out = append(out, fmt.Sprintf("token %s, started %s", jr.Token, jr.Started))
		}
		return strings.Join(out, "; ")
	})
	_ = tw.Flush()
	l := st.Storage
	if !l.Empty() {
		var parts []string
		if len(l.Jobs) > 0 {
			parts = append(parts, "mirror jobs "+strings.Join(l.Jobs, ", "))
		}
		if len(l.NBDNodes) > 0 {
			parts = append(parts, "NBD nodes "+strings.Join(l.NBDNodes, ", "))
		}
		if len(l.Exports) > 0 {
			parts = append(parts, "destination exports "+strings.Join(l.Exports, ", "))
		}
		fmt.Fprintf(w, "disk leftovers: %s\n", strings.Join(parts, "; "))
	}
	switch {
	case inFlight && token != "":
		fmt.Fprintf(w, "a migration of qmigrate's is in flight (token %s): 'qmigrate adopt' takes it over\n", token)
	case inFlight:
		fmt.Fprintln(w, "a migration is in flight that qmigrate did not start (no journal)")
	case leftovers:
		fmt.Fprintln(w, "no migration in flight, but qmigrate's leftovers are on the QEMUs: 'qmigrate adopt' cleans them up")
	default:
		fmt.Fprintln(w, "nothing of qmigrate's on these QEMUs")
	}
}
