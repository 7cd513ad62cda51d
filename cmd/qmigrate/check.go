package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// checkOptions are the flags of "qmigrate check".
type checkOptions struct {
	src, dst       string
	allowPostcopy  bool
	copyStorage    bool
	disks          stringList
	connectTimeout duration
	timeout        duration
	jsonOut        bool
	verbose        bool
	qmp            qmpOptions
	srcEP, dstEP   engine.Endpoint // check() builds them

	// --predict and the migration's limits it predicts under.
	predict        bool
	bandwidth      byteSize
	maxDowntime    duration
	budget         duration
	allowPause     bool
	noAutoConverge bool
}

const defaultCheckTimeout = 30 * time.Second

func (o *checkOptions) flagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("qmigrate check", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	o.connectTimeout = duration(defaultConnectTimeout)
	o.timeout = duration(defaultCheckTimeout)
	fs.StringVar(&o.src, "src", "", "QMP socket `ADDR` of the source QEMU: unix:/path or tcp:host:port (required)")
	fs.StringVar(&o.dst, "dst", "", "QMP socket `ADDR` of the destination QEMU, started with -incoming defer: unix:/path or tcp:host:port (required)")
	fs.BoolVar(&o.allowPostcopy, "allow-postcopy", false, "the migration may use postcopy: check what postcopy needs (devices that forbid it, userfaultfd for the destination QEMU); what forbids it is a warning (the migration runs without postcopy)")
	fs.BoolVar(&o.copyStorage, "copy-storage", false, "the disks (all writable, non-shared ones) are copied: they must exist on the destination with the same size, writable")
	fs.Var(&o.disks, "disk", "the disk of block `NODE` is copied (repeatable, or comma-separated); the others must be on shared storage")
	fs.Var(&o.connectTimeout, "connect-timeout", "bound on connecting to each QMP socket, a `duration`")
	fs.Var(&o.timeout, "timeout", "bound on the whole check, a `duration`")
	o.qmp.register(fs)
	o.maxDowntime = duration(defaultMaxDowntime)
	fs.BoolVar(&o.predict, "predict", false, "also measure the guest's own dirty rate on the source (calc-dirty-rate, read-only) and predict what the auto policy will need to migrate it over --bandwidth: converges as is, a downtime, a throttle, postcopy or a pause, or nothing permitted (a failed check, with what would)")
	fs.Var(&o.bandwidth, "bandwidth", "with --predict (required): the `rate` the migration will get, bytes per second (the link, or migrate's --bandwidth when lower), as migrate's --bandwidth: 256MiB, 1GiB, 500MB")
	fs.Var(&o.maxDowntime, "max-downtime", "with --predict: migrate's --max-downtime, a `duration`")
	fs.Var(&o.budget, "budget", "with --predict: migrate's --timeout (the budget of the whole migration), a `duration` (default none)")
	fs.BoolVar(&o.allowPause, "allow-pause", false, "with --predict: migrate's --allow-pause")
	fs.BoolVar(&o.noAutoConverge, "no-auto-converge", false, "with --predict: migrate's --no-auto-converge")
	fs.BoolVar(&o.jsonOut, "json", false, "write one JSON object per line on stdout (see JSON OUTPUT below); human messages go to stderr")
	fs.BoolVar(&o.verbose, "v", false, "")
	fs.BoolVar(&o.verbose, "verbose", false, "write debug logs (every QMP step) to stderr")
	return fs
}

func (o *checkOptions) check() error {
	src, err := checkAddress("--src", o.src)
	if err != nil {
		return err
	}
	dst, err := checkAddress("--dst", o.dst)
	if err != nil {
		return err
	}
	if o.srcEP, err = o.qmp.endpoint("--src", o.src, src); err != nil {
		return err
	}
	if o.dstEP, err = o.qmp.endpoint("--dst", o.dst, dst); err != nil {
		return err
	}
	if qmp.SameSocket(src, dst) {
		return fmt.Errorf("--src and --dst are the same socket (%q, %q)", o.src, o.dst)
	}
	if o.connectTimeout == 0 {
		return errors.New("--connect-timeout must be more than 0")
	}
	if o.timeout == 0 {
		return errors.New("--timeout must be more than 0")
	}
	if !o.predict {
		if o.bandwidth != 0 || o.budget != 0 || o.allowPause || o.noAutoConverge || o.maxDowntime != duration(defaultMaxDowntime) {
			return errors.New("--bandwidth, --max-downtime, --budget, --allow-pause and --no-auto-converge need --predict")
		}
		return nil
	}
	if o.bandwidth == 0 {
		return errors.New("--predict needs --bandwidth, the rate the migration will get")
	}
	if o.maxDowntime == 0 {
		return errors.New("--max-downtime must be more than 0")
	}
	if time.Duration(o.maxDowntime) > strategy.QEMUMaxDowntime {
		return fmt.Errorf("--max-downtime %s is more than QEMU's maximum of %s", time.Duration(o.maxDowntime), strategy.QEMUMaxDowntime)
	}
	return nil
}

// limits are the migration's limits --predict predicts under, as migrate
// builds them from the same flags.
func (o *checkOptions) limits() strategy.Limits {
	return strategy.Limits{
		MaxDowntime:   time.Duration(o.maxDowntime),
		Budget:        time.Duration(o.budget),
		NoThrottle:    o.noAutoConverge,
		AllowPostcopy: o.allowPostcopy,
		AllowPause:    o.allowPause,
	}
}

func (o *checkOptions) options() preflight.Options {
	var opts preflight.Options
	if o.allowPostcopy {
		opts.Postcopy = preflight.PostcopyAllowed
	}
	if o.copyStorage || len(o.disks) > 0 {
		opts.Storage = &preflight.Storage{Disks: append([]string(nil), o.disks...)}
	}
	return opts
}

func checkFlagOrder() []string {
	return []string{"src", "dst", "allow-postcopy", "copy-storage", "disk", "connect-timeout", "timeout", "qmp-tls-x509", "insecure-qmp",
		"predict", "bandwidth", "max-downtime", "budget", "allow-pause", "no-auto-converge", "json", "verbose"}
}

const checkUsage = `Usage: qmigrate check --src ADDR --dst ADDR [--allow-postcopy] [--copy-storage|--disk NODE]
                      [--predict --bandwidth RATE [--max-downtime D] [--budget D] [--allow-pause]
                      [--no-auto-converge]] [--json]

Checks, without changing anything on either QEMU, whether the guest of the
source QEMU can migrate live to the destination QEMU (started with
"-incoming defer"), and lists every reason why not. It only sends queries.

Checks: run-state, machine-type (with the -machine to start the destination
with when an alias such as "pc" resolved differently), ram-size, cpu-model
(type, vendor, family, model, stepping, model-id, CPUID levels),
cpu-features (every CPUID feature word of every vCPU; differences named
feature by feature), vcpu-topology (count, sockets/cores/threads, hotpluggable
slots), devices (ids and types), pci-addresses, block-devices (every disk on
the destination with the same size), migration-blockers (QEMU's own reasons),
postcopy-devices and postcopy-userfaultfd (with --allow-postcopy).

With --predict, one more check, predict: it measures the guest's own dirty
rate on the source (calc-dirty-rate, twice: 200 ms and 1 s, or 1 s and 2 s
before QEMU 8.2; read-only, harmless to the guest) and says what the auto
policy will need to migrate it at --bandwidth within the limits given as
migrate takes them (--max-downtime, --budget for migrate's --timeout,
--allow-postcopy, --allow-pause, --no-auto-converge): "converges as is in
about N s", "needs a downtime of D / a throttle of about X % / postcopy / a
pause", or "cannot finish with what is permitted" (a fail) and what would.
The model assumes every RAM page holds data and the rate stays as measured;
docs/predict.md gives its measured error.

ADDR is a QMP socket: unix:/path or tcp:host:port. The userfaultfd check
reads the destination QEMU's process when its socket is a local unix socket;
otherwise it is a warning.

Flags:
`

const checkUsageTail = `
OUTPUT
  A table on stdout: check, result (pass, warn, fail) and detail, each reason
  on a line of its own, then one line saying whether the migration can run.

JSON OUTPUT (--json)
  One JSON object per line on stdout and nothing else:
    {"type":"check","check":NAME,"result":"pass"|"warn"|"fail","detail":TEXT}
        one per check, in the order above (predict last, with --predict)
    {"type":"predict","converges":BOOL,"time_ms":N,"lever":LEVER,
     "throttle_pct":N,"downtime_limit_ms":N,"downtime_ms":N,"budget_ms":N,
     "ram_bytes":N,"bandwidth_bps":N,"dirty_rate_bps":N,"measured_bps":N,
     "measured_ms":N,"working_set_bytes":N,"remedy":{...}|null,
     "summary":TEXT,"reason":TEXT}
        with --predict, before the result: LEVER is none, downtime,
        throttle, postcopy or pause; time_ms the predicted migration time;
        remedy (when converges is false) what would finish it: postcopy,
        pause, throttle (BOOL), max_downtime_ms, bandwidth_bps; budget_ms the
        --budget it would need (0 = the budget is not what stops it);
        dirty_rate_bps the rate modelled, measured_* the measurement
    {"type":"result","status":"pass"|"fail"|"error","failed":[NAME,...],
     "warnings":[NAME,...],"postcopy":BOOL,"total_ms":N[,"error":TEXT]}
        always the last line; status pass: the migration can run; fail: it
        cannot (failed names the checks); error: nothing could be checked
        (bad usage, an address that cannot be reached); postcopy: postcopy
        was permitted and nothing seen forbids it

EXIT STATUS
  0  the migration can run (warnings may be listed)
  1  it cannot: every failed check is listed; also a QEMU that stopped
     answering during the check
  2  bad usage or bad input: a bad flag, an address that cannot be reached or
     does not answer QMP within --connect-timeout

EXAMPLES
  qmigrate check --src unix:/run/vm1-src.qmp --dst unix:/run/vm1-dst.qmp
  qmigrate check --src tcp:10.0.0.1:4000 --dst tcp:10.0.0.2:4000 --copy-storage --json
  qmigrate check --src unix:/run/vm1-src.qmp --dst unix:/run/vm1-dst.qmp --predict --bandwidth 1GiB --max-downtime 500ms
`

// checkLine is one JSON line of "qmigrate check --json".
type checkLine struct {
	Type string `json:"type"`
	preflight.Result
}

type checkResultLine struct {
	Type     string           `json:"type"`
	Status   string           `json:"status"`
	Failed   []preflight.Name `json:"failed"`
	Warnings []preflight.Name `json:"warnings"`
	Postcopy bool             `json:"postcopy"`
	TotalMS  int64            `json:"total_ms"`
	Error    string           `json:"error,omitempty"`
}

func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o checkOptions
	fs := o.flagSet()
	start := time.Now()
	fail := func(code int, jsonOut bool, err error) int {
		printError(stderr, "qmigrate check", err)
		var ue *usageError
		if errors.As(err, &ue) {
			fmt.Fprintln(stderr, "Run 'qmigrate check --help' for usage.")
		}
		if jsonOut {
			status := "error"
			if code == exitFailed {
				status = "fail"
			}
			writeJSON(stdout, checkResultLine{Type: "result", Status: status, Failed: []preflight.Name{}, Warnings: []preflight.Name{},
				TotalMS: time.Since(start).Milliseconds(), Error: err.Error()})
		}
		return code
	}
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, checkUsage)
			printFlags(stdout, fs, checkFlagOrder())
			fmt.Fprint(stdout, checkUsageTail)
			return exitOK
		}
		return fail(exitUsage, wantsJSON(args), err)
	}
	if err := o.check(); err != nil {
		return fail(exitUsage, o.jsonOut, &usageError{msg: err.Error()})
	}
	var log *slog.Logger
	if o.verbose {
		log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	bound := connectBound{timeout: time.Duration(o.connectTimeout), flag: "--connect-timeout"}
	var (
		src, dst       *qmp.Client
		dstPID         int
		srcErr, dstErr error
		wg             sync.WaitGroup
	)
	wg.Go(func() { src, _, srcErr = dialPeer(ctx, "--src", o.src, o.srcEP.TLS, bound, log) })
	wg.Go(func() { dst, dstPID, dstErr = dialPeer(ctx, "--dst", o.dst, o.dstEP.TLS, bound, log) })
	wg.Wait()
	for _, c := range []*qmp.Client{src, dst} {
		if c != nil {
			defer c.Close()
		}
	}
	if err := errors.Join(srcErr, dstErr); err != nil {
		code := exitUsage
		if errors.Is(err, engine.ErrCancelled) {
			code = exitFailed
		}
		return fail(code, o.jsonOut, err)
	}
	opts := o.options()
	opts.DestinationPID = dstPID
	rctx, cancel := context.WithTimeout(ctx, time.Duration(o.timeout))
	defer cancel()
	rep, err := preflight.Run(rctx, src, dst, opts)
	if err != nil {
		if rctx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("no answer within --timeout %v: %w", time.Duration(o.timeout), err)
		}
		return fail(exitFailed, o.jsonOut, err)
	}
	var pred *predictLine
	if o.predict {
		pl, r := o.runPredict(rctx, src, log)
		if rctx.Err() != nil && ctx.Err() == nil {
			return fail(exitFailed, o.jsonOut, fmt.Errorf("no answer within --timeout %v: predict", time.Duration(o.timeout)))
		}
		rep.Results = append(rep.Results, r)
		pred = pl
	}
	res := checkResultLine{Type: "result", Status: "pass", Failed: []preflight.Name{}, Warnings: []preflight.Name{},
		Postcopy: rep.Postcopy, TotalMS: time.Since(start).Milliseconds()}
	for _, r := range rep.Results {
		switch r.Status {
		case preflight.Fail:
			res.Failed = append(res.Failed, r.Check)
		case preflight.Warn:
			res.Warnings = append(res.Warnings, r.Check)
		}
	}
	if len(res.Failed) > 0 {
		res.Status = "fail"
	}
	if o.jsonOut {
		for _, r := range rep.Results {
			writeJSON(stdout, checkLine{Type: "check", Result: r})
		}
		if pred != nil {
			writeJSON(stdout, pred)
		}
		writeJSON(stdout, res)
	} else {
		printReport(stdout, rep)
	}
	if len(res.Failed) > 0 {
		if o.jsonOut {
			// The reasons are in the lines; stderr says it in one line.
			fmt.Fprintf(stderr, "qmigrate check: the migration cannot run: %s failed\n", joinNames(res.Failed))
		}
		return exitFailed
	}
	return exitOK
}

// predictName is the check --predict adds.
const predictName preflight.Name = "predict"

// Dirty-rate measurements of --predict: a short one for the rate and a
// longer one that shows the working set (strategy.EstimateWorkingSet).
const (
	predictShort = 200 * time.Millisecond
	predictLong  = time.Second
)

// predictLine is the --json line of --predict.
type predictLine struct {
	Type            string        `json:"type"`
	Converges       bool          `json:"converges"`
	TimeMS          int64         `json:"time_ms"`
	Lever           string        `json:"lever"`
	ThrottlePct     int           `json:"throttle_pct"`
	DowntimeLimitMS int64         `json:"downtime_limit_ms"`
	DowntimeMS      int64         `json:"downtime_ms"`
	BudgetMS        int64         `json:"budget_ms"`
	RAM             uint64        `json:"ram_bytes"`
	Bandwidth       uint64        `json:"bandwidth_bps"`
	DirtyRate       float64       `json:"dirty_rate_bps"`
	Measured        float64       `json:"measured_bps"`
	MeasuredMS      int64         `json:"measured_ms"`
	WorkingSet      uint64        `json:"working_set_bytes"`
	Remedy          *remedyFields `json:"remedy"`
	Summary         string        `json:"summary"`
	Reason          string        `json:"reason"`
}

type remedyFields struct {
	Postcopy      bool    `json:"postcopy"`
	Pause         bool    `json:"pause"`
	Throttle      bool    `json:"throttle"`
	MaxDowntimeMS int64   `json:"max_downtime_ms"`
	Bandwidth     float64 `json:"bandwidth_bps"`
}

// runPredict measures the source guest and predicts its migration. It
// only queries: calc-dirty-rate reads guest RAM in a thread of QEMU's own.
// What cannot be measured is a warn row (nil line); a prediction that
// cannot finish with what is permitted, a fail.
func (o *checkOptions) runPredict(ctx context.Context, src *qmp.Client, log *slog.Logger) (*predictLine, preflight.Result) {
	warn := func(err error) (*predictLine, preflight.Result) {
		return nil, preflight.Result{Check: predictName, Status: preflight.Warn, Detail: "no prediction: " + err.Error()}
	}
	var mem struct {
		Base uint64 `json:"base-memory"`
	}
	if err := src.Execute(ctx, "query-memory-size-summary", nil, &mem); err != nil {
		return warn(fmt.Errorf("query-memory-size-summary: %w", err))
	}
	short, err := engine.MeasureDirtyRate(ctx, src, predictShort, 0)
	if err != nil {
		return warn(err)
	}
	long, err := engine.MeasureDirtyRate(ctx, src, max(predictLong, 2*short.Period), 0)
	if err != nil {
		return warn(err)
	}
	if log != nil {
		log.Debug("guest dirty rate", "short", short.Rate, "short-period", short.Period, "long", long.Rate, "long-period", long.Period)
	}
	v := src.Version()
	plan := strategy.Plan{
		RAM: mem.Base, DirtyRate: short.Rate, DirtyPeriod: short.Period,
		WorkingSet: strategy.EstimateWorkingSet(short.Rate, short.Period, long.Rate, long.Period),
		Bandwidth:  float64(o.bandwidth), Limits: o.limits(), QEMUMajor: v.Major, QEMUMinor: v.Minor,
	}
	p, err := strategy.Predict(plan)
	if err != nil {
		return warn(err)
	}
	line := &predictLine{Type: "predict", Converges: p.Converges, TimeMS: p.Time.Milliseconds(), Lever: string(p.Lever),
		ThrottlePct: p.Throttle, DowntimeLimitMS: p.DowntimeLimit.Milliseconds(), DowntimeMS: p.Downtime.Milliseconds(),
		BudgetMS: p.Budget.Milliseconds(), RAM: plan.RAM, Bandwidth: uint64(o.bandwidth), DirtyRate: p.DirtyRate,
		Measured: short.Rate, MeasuredMS: short.Period.Milliseconds(), WorkingSet: uint64(p.WorkingSet),
		Summary: p.Summary, Reason: p.Reason}
	res := preflight.Result{Check: predictName, Status: preflight.Pass, Detail: p.Summary}
	if r := p.Remedy; r != nil {
		line.Remedy = &remedyFields{Postcopy: r.Postcopy, Pause: r.Pause, Throttle: r.Throttle,
			MaxDowntimeMS: r.MaxDowntime.Milliseconds(), Bandwidth: r.Bandwidth}
	}
	if !p.Converges {
		res.Status = preflight.Fail
	}
	return line, res
}

func joinNames(names []preflight.Name) string {
	s := make([]string, len(names))
	for i, n := range names {
		s[i] = string(n)
	}
	return strings.Join(s, ", ")
}

func writeJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

// printReport writes the table: one row per check, each reason of a detail
// ("; "-separated) on a line of its own, then the verdict.
func printReport(w io.Writer, rep *preflight.Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tRESULT\tDETAIL")
	for _, r := range rep.Results {
		for i, part := range strings.Split(r.Detail, "; ") {
			if i == 0 {
				fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Check, r.Status, part)
			} else {
				fmt.Fprintf(tw, "\t\t%s\n", part)
			}
		}
	}
	_ = tw.Flush()
	if f := rep.Failed(); len(f) > 0 {
		names := make([]preflight.Name, len(f))
		for i, r := range f {
			names[i] = r.Check
		}
		fmt.Fprintf(w, "the migration cannot run: %s failed\n", joinNames(names))
		return
	}
	fmt.Fprintln(w, "the migration can run")
}

// dialPeer connects to one QMP socket and, for a unix socket, also
// returns the process at its other end (the QEMU, 0 when unknown), for the
// userfaultfd check. A failure says what is wrong as migrate does.
func dialPeer(ctx context.Context, flagName, address string, tlsCfg *tls.Config, bound connectBound, log *slog.Logger) (*qmp.Client, int, error) {
	a, err := qmp.ParseAddress(address) // check() parsed it
	if err != nil {
		return nil, 0, &inputError{flag: flagName, address: address, err: err}
	}
	dctx, cancel := context.WithTimeout(ctx, bound.timeout)
	defer cancel()
	side := engine.SideSource
	if flagName == "--dst" {
		side = engine.SideDestination
	}
	var opts []qmp.Option
	if log != nil {
		opts = append(opts, qmp.WithLogger(log.With("side", string(side))))
	}
	if tlsCfg != nil {
		opts = append(opts, qmp.WithTLS(tlsCfg))
	}
	var c *qmp.Client
	pid := 0
	if a.Network == qmp.Unix && tlsCfg == nil {
		var d net.Dialer
		var conn net.Conn
		if conn, err = d.DialContext(dctx, "unix", a.Path); err == nil {
			if p, perr := preflight.PeerPID(conn); perr == nil {
				pid = p
			}
			c, err = qmp.NewClient(dctx, conn, opts...)
		}
	} else {
		c, err = qmp.DialAddress(dctx, a, opts...)
	}
	if err == nil {
		return c, pid, nil
	}
	ce := &engine.ConnectError{Side: side, Address: a, Err: err}
	switch {
	case ctx.Err() != nil:
		ce.Err = ctx.Err()
	case dctx.Err() != nil:
		ce.Timeout = bound.timeout
	default:
		ce.Path = engine.PathKindOf(a, err)
	}
	return nil, 0, connectMessage(ce, ctx.Err() != nil, flagName, address, bound)
}
