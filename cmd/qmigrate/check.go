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
	return nil
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
	return []string{"src", "dst", "allow-postcopy", "copy-storage", "disk", "connect-timeout", "timeout", "qmp-tls-x509", "insecure-qmp", "json", "verbose"}
}

const checkUsage = `Usage: qmigrate check --src ADDR --dst ADDR [--allow-postcopy] [--copy-storage|--disk NODE] [--json]

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
        one per check, in the order above
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
