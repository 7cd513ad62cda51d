package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/metrics"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// limitOptions are the flags that shape a migration, shared by migrate and
// demo.
type limitOptions struct {
	maxDowntime     duration
	bandwidth       byteSize
	timeout         duration
	progressTimeout duration
	policy          policyName
	allowPostcopy   bool
	allowPause      bool
	noAutoConverge  bool
	multifd         channelCount
	connectTimeout  duration
	unresponsive    duration
	jsonOut         bool
	verbose         bool
}

const (
	defaultMaxDowntime    = 300 * time.Millisecond
	defaultConnectTimeout = 10 * time.Second
)

func (o *limitOptions) register(fs *flag.FlagSet) {
	o.maxDowntime = duration(defaultMaxDowntime)
	o.connectTimeout = duration(defaultConnectTimeout)
	o.unresponsive = duration(engine.DefaultUnresponsiveTimeout)
	o.policy = strategy.PolicyAuto
	fs.Var(&o.maxDowntime, "max-downtime", "longest pause of the guest allowed at switchover, a `duration`; no policy ever sets a larger downtime limit")
	fs.Var(&o.bandwidth, "bandwidth", "migration bandwidth limit, a `rate` in bytes per second: 256MiB, 1GiB, 500MB, 100K, a plain number is bytes, \"/s\" is optional; K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000; 0 is unlimited")
	fs.Var(&o.timeout, "timeout", "budget for the whole migration, a `duration`; when nothing permitted can finish within it the migration is aborted and the guest stays on the source (default none)")
	fs.Var(&o.progressTimeout, "progress-timeout", "abort when the migration makes no progress for this `duration` (default: the policy's)")
	fs.Var(&o.policy, "policy", "switchover `policy`: "+strings.Join(strategy.Policies(), ", "))
	fs.BoolVar(&o.allowPostcopy, "allow-postcopy", false, "permit switching to postcopy when pre-copy cannot converge (a failure after that point cannot be rolled back)")
	fs.BoolVar(&o.allowPause, "allow-pause", false, "permit pausing the guest to finish the copy (stop-and-copy) when nothing else converges")
	fs.BoolVar(&o.noAutoConverge, "no-auto-converge", false, "refuse CPU throttling of the guest (auto-converge), which is permitted by default")
	fs.Var(&o.multifd, "multifd", "use `N` parallel multifd channels for RAM, 1 to 255 (default: none, a single stream)")
	fs.Var(&o.connectTimeout, "connect-timeout", "bound on connecting to each QMP socket and on QEMU's first answers, a `duration` (a shorter --timeout bounds them too)")
	fs.Var(&o.unresponsive, "unresponsive-timeout", "how long a QEMU that stops answering QMP during the migration is waited for before the migration ends (rolled back before the switchover), a `duration` (a shorter --timeout bounds it too)")
	fs.BoolVar(&o.jsonOut, "json", false, "write one JSON object per line on stdout (see JSON OUTPUT in qmigrate migrate --help); human messages go to stderr")
	fs.BoolVar(&o.verbose, "v", false, "")
	fs.BoolVar(&o.verbose, "verbose", false, "write debug logs (every QMP step) to stderr")
}

// check validates what flag parsing alone cannot.
func (o *limitOptions) check() error {
	if o.maxDowntime == 0 {
		return errors.New("--max-downtime must be more than 0")
	}
	if time.Duration(o.maxDowntime) > strategy.QEMUMaxDowntime {
		return fmt.Errorf("--max-downtime %s is more than QEMU's maximum of %s", time.Duration(o.maxDowntime), strategy.QEMUMaxDowntime)
	}
	if o.connectTimeout == 0 {
		return errors.New("--connect-timeout must be more than 0")
	}
	if o.unresponsive == 0 {
		return errors.New("--unresponsive-timeout must be more than 0")
	}
	return nil
}

func (o *limitOptions) strategy() strategy.Config {
	return strategy.Config{
		Policy: string(o.policy),
		Limits: strategy.Limits{
			MaxDowntime:     time.Duration(o.maxDowntime),
			Budget:          time.Duration(o.timeout),
			ProgressTimeout: time.Duration(o.progressTimeout),
			NoThrottle:      o.noAutoConverge,
			AllowPostcopy:   o.allowPostcopy,
			AllowPause:      o.allowPause,
		},
	}
}

func (o *limitOptions) logger(stderr io.Writer) *slog.Logger {
	if !o.verbose {
		return nil
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// migrateOptions are the flags of "qmigrate migrate".
type migrateOptions struct {
	limitOptions
	src, dst, uri string
	listen        string
	copyStorage   bool
	disks         stringList
	nbd           string
	writeBlocking bool
	tls           tlsOptions
	qmp           qmpOptions
	metricsAddr   string
}

func (o *migrateOptions) flagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("qmigrate migrate", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.src, "src", "", "QMP socket `ADDR` of the source QEMU: unix:/path or tcp:host:port (required)")
	fs.StringVar(&o.dst, "dst", "", "QMP socket `ADDR` of the destination QEMU, started with -incoming defer: unix:/path or tcp:host:port (required)")
	fs.StringVar(&o.uri, "uri", "", "`URI` where the destination listens for the migration stream: unix:/path (absolute) or tcp:host:port (port 0 lets QEMU pick) (required)")
	fs.StringVar(&o.listen, "listen", "", "`URI` where the destination binds, when it differs from where the source connects (--uri): tcp:0.0.0.0:4444 or tcp:[::]:4444 behind a host address, NAT or a proxy; a postcopy recovery listens there too (default: --uri)")
	o.limitOptions.register(fs)
	fs.BoolVar(&o.copyStorage, "copy-storage", false, "also migrate the disks (all writable, non-shared ones) over NBD, for hosts that do not share storage")
	fs.Var(&o.disks, "disk", "migrate the disk of block `NODE` (repeatable, or comma-separated); implies --copy-storage for just those nodes")
	fs.StringVar(&o.nbd, "nbd", "", "`ADDR` of the NBD server the destination starts for the disks: unix:/path or tcp:host:port (default: derived from --uri)")
	fs.BoolVar(&o.writeBlocking, "write-blocking", false, "start the disk mirrors in write-blocking mode: guest writes complete only once they reached the destination, so the disks converge under any write load, at the price of write latency (on QEMU 8.2+ the auto policy switches a mirror that does not converge by itself; needs --copy-storage or --disk)")
	o.tls.register(fs)
	o.qmp.register(fs)
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "serve Prometheus metrics of the migration on http://`ADDR`/metrics while it runs: host:port, or :port for every address (port 0 picks a free one, said on the output); the series are labelled name=<the --src address>")
	return fs
}

// config builds the engine configuration, parsing the addresses.
func (o *migrateOptions) config() (engine.Config, error) {
	src, err := checkAddress("--src", o.src)
	if err != nil {
		return engine.Config{}, err
	}
	dst, err := checkAddress("--dst", o.dst)
	if err != nil {
		return engine.Config{}, err
	}
	ch, err := checkURI(o.uri)
	if err != nil {
		return engine.Config{}, err
	}
	if o.listen != "" {
		lc, err := transport.Parse(o.listen)
		if err != nil || lc.Scheme != ch.Scheme || lc.Scheme == transport.FD {
			return engine.Config{}, fmt.Errorf("--listen %q: want a %s: URI like --uri's", o.listen, ch.Scheme)
		}
	}
	if qmp.SameSocket(src, dst) {
		if o.src == o.dst {
			return engine.Config{}, fmt.Errorf("--src and --dst are the same socket %q", o.src)
		}
		return engine.Config{}, fmt.Errorf("--src and --dst are the same socket (%q, %q)", o.src, o.dst)
	}
	if err := o.limitOptions.check(); err != nil {
		return engine.Config{}, err
	}
	sep, err := o.qmp.endpoint("--src", o.src, src)
	if err != nil {
		return engine.Config{}, err
	}
	dep, err := o.qmp.endpoint("--dst", o.dst, dst)
	if err != nil {
		return engine.Config{}, err
	}
	cfg := engine.Config{
		Source:              sep,
		Destination:         dep,
		URI:                 o.uri,
		Listen:              o.listen,
		MultifdChannels:     int(o.multifd),
		Bandwidth:           uint64(o.bandwidth),
		Strategy:            o.limitOptions.strategy(),
		ConnectTimeout:      time.Duration(o.connectTimeout),
		UnresponsiveTimeout: time.Duration(o.unresponsive),
	}
	var nbd qmp.Address
	if o.nbd != "" {
		if nbd, err = checkAddress("--nbd", o.nbd); err != nil {
			return engine.Config{}, err
		}
		if !o.copyStorage && len(o.disks) == 0 {
			return engine.Config{}, errors.New("--nbd needs --copy-storage or --disk")
		}
	}
	if o.writeBlocking && !o.copyStorage && len(o.disks) == 0 {
		return engine.Config{}, errors.New("--write-blocking needs --copy-storage or --disk")
	}
	if o.copyStorage || len(o.disks) > 0 {
		cfg.Storage = &blockmirror.Config{Disks: append([]string(nil), o.disks...), NBDAddress: nbd, WriteBlocking: o.writeBlocking}
	}
	t, err := o.tls.config(o.uri, ch, nbd)
	if err != nil {
		return engine.Config{}, err
	}
	cfg.TLS = t
	return cfg, nil
}

const migrateUsage = `Usage: qmigrate migrate --src ADDR --dst ADDR --uri URI [flags]

Live-migrates the running guest of the source QEMU to the destination QEMU,
which must have been started with "-incoming defer" and the same machine type
and RAM size. When it completes, the guest runs on the destination and the
source is left in "postmigrate". On any failure or cancel before switchover,
everything done is rolled back and the guest keeps running on the source.

ADDR is a QMP socket: unix:/path or tcp:host:port. Flags take "--flag value" or
"--flag=value" (one dash works too). Durations look like 300ms, 30s, 5m.

Flags:
`

const migrateUsageTail = `
METRICS (--metrics-addr ADDR)
  While the command runs, http://ADDR/metrics serves the migration's
  Prometheus metrics (package github.com/qmigrate/qmigrate/metrics: phase,
  bytes sent and remaining, dirty and transfer rates, expected downtime,
  throttle, decisions by action, the outcome, named after KubeVirt's
  kubevirt_vmi_migration_* metrics where they mean the same) and the
  process's own (go_*, process_*). The listener closes when qmigrate exits.
  An address that cannot be listened on is bad usage (exit 2).

OUTPUT
  On a terminal: one live line (phase, a bar of sent/(sent+remaining), rate,
  remaining, expected downtime, pass, throttle, decisions taken, elapsed; a
  narrow terminal drops the least useful first) with decisions printed above
  it. Otherwise, and with -v: plain lines, one per phase change, per strategy decision (with
  its reason), per 2s of stats, and a closing summary. Errors go to stderr.

JSON OUTPUT (--json)
  One JSON object per line on stdout and nothing else; human messages go to
  stderr. Every object has "type". Times are whole milliseconds, sizes bytes,
  rates bytes per second.
    {"type":"phase","phase":P,"elapsed_ms":N}
        P is prepare, start, converge, switchover, complete or rollback
    {"type":"stats","elapsed_ms","status","iteration","transferred_bytes",
     "remaining_bytes","total_bytes","dirty_rate_bps","throughput_bps",
     "expected_downtime_ms","throttle_pct","downtime_limit_ms",
     "storage_remaining_bytes","storage_total_bytes"}
    {"type":"decision","elapsed_ms","action","summary","reason"
     [,"downtime_limit_ms"][,"throttle":{"initial","increment","max"}]
     [,"remedy":{"postcopy","pause","throttle","write_blocking",
                 "max_downtime_ms","bandwidth_bps","text"}][,"error"]}
        action is wait, set-downtime, set-throttle, start-postcopy, pause,
        write-blocking (disk mirrors switched to write-blocking) or abort;
        "summary" says it in words, "reason" gives the arithmetic; an abort's
        "remedy" is what would have finished the migration; "error" says why
        applying it failed
    {"type":"disk","node","job","done_bytes","total_bytes","rate_bps","ready"}
    {"type":"limits","elapsed_ms","bandwidth_bps","max_downtime_ms","budget_ms",
     "downtime_limit_ms"}
        the limits in force changed mid-flight (through engine.Job's
        SetBandwidth, SetMaxDowntime, SetBudget); bandwidth_bps 0 is
        unlimited, budget_ms 0 none
    {"type":"recovery","elapsed_ms","step","loss","attempt"[,"detail"],
     "stalled_ms"[,"backoff_ms"]}
        postcopy's link was lost (step link-lost) and is being recovered:
        attempt, failed (retried after backoff_ms), recovered, or gave-up
  The last line is always the result, whatever happened, even for bad usage
  or an address that cannot be reached (then status is "failed"):
    {"type":"result","status","total_ms","downtime_ms"[,"max_downtime_ms",
     "downtime_held"],"transferred_bytes",
     "decisions":[{"action","summary","reason","at_ms"[,"downtime_limit_ms"]
                   [,"throttle"][,"remedy"]}, ...],
     "error","undone":[...],"undo_errors":[...]}
        status is completed, failed or cancelled; decisions, undone and
        undo_errors are arrays, [] when empty; error is present only when the
        status is not completed; undone lists the rollback steps that ran,
        undo_errors those that failed; "state_unknown":true is added when
        qmigrate could not tell where the guest runs (a QEMU stopped
        answering after the switchover began: check both QEMUs);
        "state" is added for a postcopy that could not be finished:
        "guest_lost" (the destination QEMU went away: the guest is lost, the
        source's stale copy left paused), "pages_lost" (the source QEMU went
        away: the destination holds the guest, stalled on the pages it
        lacks), "postcopy_paused" (not recovered in time: both QEMUs left
        paused, qmigrate adopt can retry); "recoveries" and
        "postcopy_stall_ms" when postcopy's link was lost and recovered

EXIT STATUS
  0  completed: the guest runs on the destination
  1  failed, aborted by the policy or cancelled: the guest runs on the source;
     also a QEMU that stops answering QMP mid-migration (the message names the
     side and the command): with --timeout the migration ends within it and a
     few seconds, otherwise after --unresponsive-timeout (30s) of silence.
     Once the switchover began nothing is rolled back and where the guest
     runs is unknown (said so)
  2  bad usage or bad input: a bad flag, an address that cannot be reached or
     does not answer QMP within --connect-timeout, a destination not started
     with -incoming defer, different RAM sizes, a disk that cannot be mirrored,
     TLS credentials a QEMU cannot load (a file missing on its host)

SIGNALS
  SIGINT or SIGTERM cancels: the migration is rolled back, status
  "cancelled", exit 1. A second signal does not cut the rollback short.

EXAMPLES
  qmigrate migrate --src unix:/run/vm1-src.qmp --dst unix:/run/vm1-dst.qmp \
      --uri tcp:10.0.0.2:4444 --max-downtime 500ms --bandwidth 1GiB --timeout 5m
  qmigrate migrate --src tcp:10.0.0.1:4000 --dst tcp:10.0.0.2:4000 \
      --uri tcp:10.0.0.2:0 --copy-storage --json
  qmigrate migrate --src unix:/run/vm1-src.qmp --dst tcp:10.0.0.2:4000 \
      --uri tcp:10.0.0.2:0 --tls-x509 /etc/pki/qemu --copy-storage
`

// printFlags lists the flags as --name, one dash-pair per line, in the
// order of names (help lists -v with --verbose).
func printFlags(w io.Writer, fs *flag.FlagSet, names []string) {
	for _, name := range names {
		f := fs.Lookup(name)
		if f == nil {
			continue
		}
		arg, usage := flag.UnquoteUsage(f)
		head := "  --" + f.Name
		if f.Name == "verbose" {
			head = "  -v, --verbose"
		}
		if arg != "" {
			head += " " + strings.ToUpper(arg)
		}
		def := ""
		switch f.DefValue {
		case "", "false", "0", "0s", "unlimited":
		default:
			def = " (default " + f.DefValue + ")"
		}
		switch f.Name {
		case "bandwidth":
			def = " (default unlimited)"
		case "dirty-rate":
			def = " (default " + f.DefValue + "/s)"
		case "spin":
			def = ""
		}
		fmt.Fprintf(w, "%s\n      %s%s\n", head, wrap(usage+def, 72, "      "), "")
	}
}

// wrap breaks s into lines of at most width bytes, indenting the rest.
func wrap(s string, width int, indent string) string {
	var b strings.Builder
	n := 0
	for i, word := range strings.Fields(s) {
		if i > 0 {
			if n+1+len(word) > width {
				b.WriteString("\n" + indent)
				n = 0
			} else {
				b.WriteByte(' ')
				n++
			}
		}
		b.WriteString(word)
		n += len(word)
	}
	return b.String()
}

// migrateFlagOrder lists the flags in the order the help shows them.
func migrateFlagOrder() []string {
	return []string{
		"src", "dst", "uri", "listen", "max-downtime", "bandwidth", "timeout", "progress-timeout", "policy",
		"allow-postcopy", "allow-pause", "no-auto-converge", "multifd", "copy-storage", "disk", "nbd",
		"write-blocking", "tls-x509", "tls-psk", "tls-psk-user", "tls-hostname", "tls-authz", "qmp-tls-x509", "insecure-qmp",
		"connect-timeout", "unresponsive-timeout", "metrics-addr", "json", "verbose",
	}
}

// usageFailure reports a usage or input error: the message on stderr and,
// with --json, the result line on stdout. It returns exit status 2.
func usageFailure(stdout, stderr io.Writer, cmd string, jsonOut bool, err error) int {
	printError(stderr, "qmigrate "+cmd, err)
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "Run 'qmigrate %s --help' for usage.\n", cmd)
	}
	if jsonOut {
		newJSONRenderer(stdout).Result(&engine.Result{Status: engine.StatusFailed, Err: err}, nil)
	}
	return exitUsage
}

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return runMigration(ctx, migrateCommand, args, stdout, stderr)
}

// migrationCommand is what sets migrate and adopt apart: they share the
// flags, the output, the JSON lines and the exit statuses.
type migrationCommand struct {
	name             string
	usage, usageTail string
	// opening is the first message, once both QEMUs are connected.
	opening func(o *migrateOptions, cfg engine.Config) string
	// run runs the migration to its end.
	run func(ctx context.Context, cfg engine.Config) (*engine.Result, error)
}

var migrateCommand = migrationCommand{
	name: "migrate", usage: migrateUsage, usageTail: migrateUsageTail,
	opening: func(o *migrateOptions, cfg engine.Config) string {
		return fmt.Sprintf("migrating %s -> %s over %s%s (policy %s, max downtime %s, bandwidth %s)", o.src, o.dst, o.uri,
			o.tls.describe(), cfg.Strategy.Policy, formatDuration(cfg.Strategy.Limits.MaxDowntime), o.bandwidth.rate())
	},
	run: engine.Migrate,
}

// runMigration runs migrate or adopt.
func runMigration(ctx context.Context, c migrationCommand, args []string, stdout, stderr io.Writer) int {
	var o migrateOptions
	fs := o.flagSet()
	fs.Init("qmigrate "+c.name, flag.ContinueOnError)
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, c.usage)
			printFlags(stdout, fs, migrateFlagOrder())
			fmt.Fprint(stdout, c.usageTail)
			return exitOK
		}
		return usageFailure(stdout, stderr, c.name, wantsJSON(args), err)
	}
	cfg, err := o.config()
	if err != nil {
		return usageFailure(stdout, stderr, c.name, o.jsonOut, &usageError{msg: err.Error()})
	}
	log := o.logger(stderr)
	cfg.Logger = log
	r := newRenderer(o.jsonOut, o.verbose, stdout, stderr)
	if err := cfg.Validate(); err != nil {
		return usageFailure(stdout, stderr, c.name, o.jsonOut, err)
	}
	var observe func(engine.Event) // the metrics', with --metrics-addr
	if o.metricsAddr != "" {
		ms, err := serveMetrics(o.metricsAddr)
		if err != nil {
			return usageFailure(stdout, stderr, c.name, o.jsonOut, err)
		}
		defer ms.close()
		observe = ms.collector.Observe(o.src)
		r.Message("serving metrics on http://" + ms.addr() + "/metrics")
	}

	// The engine connects to both QMP sockets, within --connect-timeout,
	// or --timeout when it is shorter: the budget is for the whole
	// migration. Until it has, nothing is shown: a socket it cannot
	// connect to is bad input, said on stderr alone.
	bound := connectBound{timeout: cfg.ConnectTimeout, flag: "--connect-timeout"}
	if b := cfg.Strategy.Limits.Budget; b > 0 && b < bound.timeout {
		bound = connectBound{timeout: b, flag: "--timeout"}
	}
	g := &connectGate{r: r}
	cfg.Observer = g.Event
	if observe != nil {
		cfg.Observer = func(ev engine.Event) {
			g.Event(ev)
			observe(ev)
		}
	}
	g.Message(c.opening(&o, cfg))
	res, err := c.run(ctx, cfg)
	if cerr := o.connectFailure(err, bound); cerr != nil {
		cres := resultOf(nil, cerr)
		cres.Total = res.Total
		return finish(r, stderr, cres, nil)
	}
	return finish(r, stderr, resultOf(res, err), nil)
}

// metricsServer serves a metrics.Collector's series over HTTP while a
// command runs.
type metricsServer struct {
	collector *metrics.Collector
	ln        net.Listener
	srv       *http.Server
	served    chan struct{}
}

// serveMetrics listens on addr (host:port) and serves /metrics from a
// registry of its own. A bad address or one that cannot be listened on is
// an *inputError naming --metrics-addr.
func serveMetrics(addr string) (*metricsServer, error) {
	bad := func(err error) error { return &inputError{flag: "--metrics-addr", address: addr, err: err} }
	if _, port, err := net.SplitHostPort(addr); err != nil {
		return nil, bad(fmt.Errorf("want host:port or :port (%w)", err))
	} else if port == "" {
		return nil, bad(errors.New("missing port"))
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err // "address already in use" says it; the rest repeats the address
		}
		return nil, bad(fmt.Errorf("cannot listen: %w", err))
	}
	c := metrics.New(metrics.Options{})
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	ms := &metricsServer{collector: c, ln: ln, served: make(chan struct{}),
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}
	go func() {
		defer close(ms.served)
		_ = ms.srv.Serve(ln) // ErrServerClosed once close runs
	}()
	return ms, nil
}

// addr is the address listened on, with the port picked for port 0.
func (m *metricsServer) addr() string { return m.ln.Addr().String() }

// close stops listening and drops open connections.
func (m *metricsServer) close() {
	_ = m.srv.Close()
	<-m.served
}

// finish shows the result and returns the exit status for it.
func finish(r renderer, stderr io.Writer, res *engine.Result, demo *demoVerdict) int {
	r.Result(res, demo)
	code := exitCode(res)
	if demo != nil && !demo.OK && code == exitOK {
		code = exitFailed
	}
	if res.Err != nil {
		printError(stderr, "qmigrate", res.Err)
	}
	return code
}

// printError writes err on stderr, every line of it (errors.Join puts one
// error per line) behind the prefix.
func printError(stderr io.Writer, prefix string, err error) {
	for line := range strings.SplitSeq(err.Error(), "\n") {
		fmt.Fprintf(stderr, "%s: %s\n", prefix, line)
	}
}

// resultOf returns the result to show: the engine's, with its error filled
// in, or one made from err when there is none.
func resultOf(res *engine.Result, err error) *engine.Result {
	if res == nil {
		res = &engine.Result{Status: engine.StatusFailed}
		if errors.Is(err, engine.ErrCancelled) || errors.Is(err, context.Canceled) {
			res.Status = engine.StatusCancelled
		}
	} else {
		c := *res
		res = &c
	}
	if res.Err == nil {
		res.Err = err
	}
	if res.Err != nil && res.Status == engine.StatusCompleted {
		res.Status = engine.StatusFailed
	}
	if res.Err == nil && res.Status != engine.StatusCompleted {
		res.Err = fmt.Errorf("migration ended with status %q", res.Status)
	}
	return res
}

// isBadInput reports whether err means bad usage or bad input (exit 2).
func isBadInput(err error) bool {
	var ue *usageError
	var ie *inputError
	return errors.Is(err, engine.ErrBadInput) || errors.Is(err, engine.ErrInvalidConfig) ||
		errors.As(err, &ue) || errors.As(err, &ie)
}

// exitCode maps a result to the exit status.
func exitCode(res *engine.Result) int {
	switch {
	case res.Status == engine.StatusCompleted && res.Err == nil:
		return exitOK
	case res.Status == engine.StatusCancelled:
		return exitFailed // a cancel is never bad input, even during prepare
	case isBadInput(res.Err):
		return exitUsage
	default:
		return exitFailed
	}
}

// connectBound is how long connecting may take, and the flag that set it.
type connectBound struct {
	timeout time.Duration
	flag    string
}

// connectFailure is the error to show when the engine could not connect
// to --src or --dst (nil when it connected): one per side that failed,
// naming the flag and the address as given, and saying what is wrong as an
// input error (exit 2), or the cancel that cut connecting short.
func (o *migrateOptions) connectFailure(err error, bound connectBound) error {
	var errs []error
	for _, ee := range engineErrors(err) {
		var ce *engine.ConnectError
		if !errors.As(ee, &ce) {
			continue
		}
		flagName, address := "--src", o.src
		if ce.Side == engine.SideDestination {
			flagName, address = "--dst", o.dst
		}
		errs = append(errs, connectMessage(ce, errors.Is(ee, engine.ErrCancelled), flagName, address, bound))
	}
	return errors.Join(errs...)
}

// connectMessage says what is wrong with a QMP address that could not be
// connected to, naming the flag and the address as given: an input error
// (exit 2), or the cancel that cut connecting short.
func connectMessage(ce *engine.ConnectError, cancelled bool, flagName, address string, bound connectBound) error {
	if cancelled {
		return fmt.Errorf("%s %s: %w: %w", flagName, address, engine.ErrCancelled, ce.Err)
	}
	var why error
	var se *os.SyscallError
	switch {
	case ce.Timeout > 0:
		// A QEMU monitor serves one client at a time and leaves the
		// next one connected but ungreeted: the usual cause besides a
		// socket that is not a monitor at all.
		why = fmt.Errorf("no QMP answer within %s (%s): is it a QEMU monitor socket, with no other client connected to it? (%w)",
			bound.timeout, bound.flag, ce.Err)
	case errors.As(ce.Err, &se):
		// The innermost cause says it best: "no such file or
		// directory", "connection refused"; the rest repeats the
		// address.
		why = fmt.Errorf("cannot connect: %w%s", se.Err, pathHint(ce.Path))
	default:
		why = fmt.Errorf("cannot connect: %w", ce.Err)
	}
	return &inputError{flag: flagName, address: address, err: why}
}

// engineErrors are the engine's *Errors in err: one, or one per side when
// both failed to connect (joined).
func engineErrors(err error) []*engine.Error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []*engine.Error
		for _, e := range j.Unwrap() {
			out = append(out, engineErrors(e)...)
		}
		return out
	}
	var ee *engine.Error
	if errors.As(err, &ee) {
		return []*engine.Error{ee}
	}
	return nil
}

// pathHint explains a failed connect to a unix socket path: a path that is
// not a socket at all, or a socket nobody listens on any more (the QEMU
// that made it is gone).
func pathHint(k engine.PathKind) string {
	switch k {
	case engine.PathDirectory:
		return " (it is a directory, not a socket)"
	case engine.PathFile:
		return " (it is a file, not a socket)"
	case engine.PathStaleSocket:
		return " (a socket no process listens on: has its QEMU exited?)"
	}
	return ""
}

// connectGate holds back what is shown (the opening message, the prepare
// phase) until the engine connected to both QEMUs: the first event after
// the prepare phase's, or a result that is not a failure to connect (nor
// adopt's refusal of a pair with nothing to adopt). A migration that cannot
// connect shows nothing but its error, as one that never started.
type connectGate struct {
	r    renderer
	held []func()
	open bool
}

func (g *connectGate) Message(s string) { g.hold(func() { g.r.Message(s) }) }

func (g *connectGate) Event(ev engine.Event) {
	switch {
	case g.open:
	case ev.Kind == engine.EventPhase && ev.Phase == engine.PhasePrepare:
		g.hold(func() { g.r.Event(ev) })
		return
	case ev.Kind == engine.EventResult && ev.Result != nil && (isConnectFailure(ev.Result.Err) || isAdoptRefusal(ev.Result.Err)):
		g.held = nil
		return
	default:
		g.flush()
	}
	g.r.Event(ev)
}

func (g *connectGate) hold(f func()) {
	if g.open {
		f()
		return
	}
	g.held = append(g.held, f)
}

func (g *connectGate) flush() {
	g.open = true
	for _, f := range g.held {
		f()
	}
	g.held = nil
}

// isAdoptRefusal reports whether err is Adopt refusing a pair it has
// nothing to do on: it changed nothing, so nothing is shown but the error.
func isAdoptRefusal(err error) bool {
	return errors.Is(err, engine.ErrNothingToAdopt) || errors.Is(err, engine.ErrNotOurs)
}

// isConnectFailure reports whether err is the engine failing to connect.
func isConnectFailure(err error) bool {
	var ce *engine.ConnectError
	return errors.As(err, &ce)
}
