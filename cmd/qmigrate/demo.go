package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// demoOptions are the flags of "qmigrate demo".
type demoOptions struct {
	limitOptions
	qemu        string
	dirtyRate   byteSize
	spin        int64 // -1: derive from dirtyRate
	copyStorage bool
	tls         bool
}

// demoTLSHost is the host name the demo's throwaway certificate carries.
const demoTLSHost = "qmigrate-demo.test"

// demoDisk is the drive id of the sweep guest's boot disk (qemulab.SweepGuest).
const demoDisk = "sweep0"

// defaultDemoDirtyRate converges quickly on an unlimited local link and
// still shows a few passes.
const defaultDemoDirtyRate = 256 << 20

func (o *demoOptions) flagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("qmigrate demo", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.qemu, "qemu", "", "`PATH` of qemu-system-x86_64 (default: $QMIGRATE_QEMU, else qemu-system-x86_64 on PATH; $QMIGRATE_QEMU_FIRMWARE adds a firmware folder)")
	o.dirtyRate = defaultDemoDirtyRate
	fs.Var(&o.dirtyRate, "dirty-rate", "how fast the guest dirties its memory, bytes per second (`rate`, as --bandwidth; approximate, TCG speed varies)")
	fs.Int64Var(&o.spin, "spin", -1, "set the guest's busy-wait per page directly (`N` iterations, 0: as fast as it can); overrides --dirty-rate")
	fs.BoolVar(&o.copyStorage, "copy-storage", false, "also mirror the guest's boot disk to the destination over NBD, as between hosts without shared storage")
	fs.BoolVar(&o.tls, "tls", false, "encrypt the migration stream (and, with --copy-storage, the disk mirror) with QEMU's TLS, using x509 certificates made for the demo (a throwaway CA)")
	o.limitOptions.register(fs)
	return fs
}

// demoFlagOrder lists the flags in the order the help shows them.
func demoFlagOrder() []string {
	return []string{
		"qemu", "dirty-rate", "spin", "copy-storage", "tls", "max-downtime", "bandwidth", "timeout", "progress-timeout", "policy",
		"allow-postcopy", "allow-pause", "no-auto-converge", "multifd", "connect-timeout", "unresponsive-timeout", "json", "verbose",
	}
}

const demoUsage = `Usage: qmigrate demo [flags]

Runs qmigrate's main job end to end on this machine: starts two QEMUs
(qemu-system-x86_64, TCG, -cpu max), a source running a small guest embedded
in this binary (a boot sector that keeps incrementing the first byte of every
page of 99 MiB of RAM) and a destination waiting with -incoming defer; migrates
the guest live over a unix socket with the progress display; then checks the
guest on the destination: its vCPU still runs and, stopped, every page of its
memory holds the sweep pattern (a lost or stale page breaks it). Everything it
started (processes, sockets, the temporary folder) is removed at the end, on
failure and on Ctrl-C too. Needs only qemu-system-x86_64.

Output and exit status are those of "qmigrate migrate" (see its --help); with
--json the result line also has "verified" (bool) and "verdict" (text), and a
migration that completed but failed the check has status "failed".

Flags:
`

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o demoOptions
	fs := o.flagSet()
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, demoUsage)
			printFlags(stdout, fs, demoFlagOrder())
			return exitOK
		}
		return usageFailure(stdout, stderr, "demo", wantsJSON(args), err)
	}
	if err := o.limitOptions.check(); err != nil {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, &usageError{msg: err.Error()})
	}
	if o.spin < -1 || o.spin > int64(^uint32(0)) {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, &usageError{msg: fmt.Sprintf("--spin %d: want 0 to %d", o.spin, ^uint32(0))})
	}
	if o.dirtyRate == 0 && o.spin < 0 {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, &usageError{msg: "--dirty-rate must be more than 0 (use --spin 0 for the fastest guest)"})
	}
	qemu, err := o.findQEMU()
	if err != nil {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, err)
	}
	spin := uint32(o.spin)
	if o.spin < 0 {
		spin = sweep.SpinForRate(float64(o.dirtyRate))
	}
	d := &demo{opts: &o, qemu: qemu, spin: spin, stdout: stdout, stderr: stderr}
	d.r = newRenderer(o.jsonOut, o.verbose, stdout, stderr)
	return d.run(ctx)
}

// findQEMU resolves QEMU: --qemu, else the QEMU lab's environment contract (package qemulab)
// ($QMIGRATE_QEMU, else qemu-system-x86_64 on PATH; $QMIGRATE_QEMU_FIRMWARE).
func (o *demoOptions) findQEMU() (*qemulab.QEMU, error) {
	if o.qemu == "" {
		q, err := qemulab.FindQEMU()
		if err != nil {
			return nil, &inputError{flag: "QEMU", address: "qemu-system-x86_64",
				err: fmt.Errorf("not found (install qemu-system-x86, or give --qemu PATH): %w", err)}
		}
		return q, nil
	}
	path, err := exec.LookPath(o.qemu)
	if err != nil {
		return nil, &inputError{flag: "--qemu", address: o.qemu, err: err}
	}
	q := &qemulab.QEMU{Binary: path, Firmware: os.Getenv(qemulab.EnvQEMUFirmware)}
	if q.Firmware != "" {
		if st, err := os.Stat(q.Firmware); err != nil || !st.IsDir() {
			return nil, &inputError{flag: qemulab.EnvQEMUFirmware, address: q.Firmware, err: errors.New("not a folder")}
		}
	}
	return q, nil
}

// demo is one run of the demo.
type demo struct {
	opts           *demoOptions
	qemu           *qemulab.QEMU
	spin           uint32
	stdout, stderr io.Writer
	r              renderer
	src, dst       *qemulab.Instance
	tlsDir         string // the throwaway certificates (--tls), removed by cleanup
}

func (d *demo) say(format string, args ...any) { d.r.Message(fmt.Sprintf(format, args...)) }

func (d *demo) run(ctx context.Context) (code int) {
	start := time.Now()
	fail := func(err error) int {
		if ctx.Err() != nil && !errors.Is(err, engine.ErrCancelled) {
			err = fmt.Errorf("%w: %w", engine.ErrCancelled, err)
		}
		res := resultOf(nil, err)
		res.Total = time.Since(start)
		return finish(d.r, d.stderr, res, &demoVerdict{OK: false, Text: "demo not run: " + err.Error()})
	}
	defer d.cleanup()
	if err := d.startQEMUs(ctx); err != nil {
		return fail(err)
	}
	if err := d.waitGuest(ctx); err != nil {
		return fail(err)
	}

	cfg := d.config()
	what := "the guest"
	if cfg.Storage != nil {
		what = "the guest and its disk"
	}
	over := cfg.URI
	if d.opts.tls {
		if err := d.makeCerts(); err != nil {
			return fail(err)
		}
		cfg.TLS = &transport.TLS{Kind: transport.TLSX509, Dir: d.tlsDir, Hostname: demoTLSHost}
		over += " with TLS"
	}
	d.say("migrating %s live over %s (policy %s, max downtime %s, bandwidth %s)", what, over,
		cfg.Strategy.Policy, formatDuration(cfg.Strategy.Limits.MaxDowntime), d.opts.bandwidth.rate())
	res, err := engine.Migrate(ctx, cfg)
	result := resultOf(res, err)

	// Check whichever side should now run the guest, with a context of its
	// own: a Ctrl-C that cancelled the migration must not skip the check.
	vctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 60*time.Second)
	defer cancel()
	verdict := &demoVerdict{}
	if result.Status == engine.StatusCompleted {
		rep, verr := qemulab.CheckSweep(vctx, d.src.QMP, d.dst.QMP, qemulab.SweepCheckOptions{})
		if verr != nil {
			verdict.Text = "NOT VERIFIED on the destination: " + verr.Error()
			result.Status = engine.StatusFailed
			result.Err = fmt.Errorf("checking the guest on the destination: %w", verr)
		} else {
			verdict.OK = true
			verdict.Text = fmt.Sprintf("verified: the guest runs on the destination and all %d swept pages are intact (first pages hold %#02x); the source is in postmigrate",
				sweep.Pages, rep.Value)
		}
	} else {
		_, verr := qemulab.CheckSweep(vctx, nil, d.src.QMP, qemulab.SweepCheckOptions{})
		if verr != nil {
			verdict.Text = "the guest on the source is NOT intact: " + verr.Error()
		} else {
			verdict.Text = fmt.Sprintf("checked: the guest still runs on the source and all %d swept pages are intact", sweep.Pages)
		}
	}
	return finish(d.r, d.stderr, result, verdict)
}

// startQEMUs starts the source with the sweep guest and the destination
// with -incoming defer. They outlive a Ctrl-C (the engine must roll back
// through them); cleanup ends them.
func (d *demo) startQEMUs(ctx context.Context) error {
	version := "QEMU"
	if v, err := d.qemu.Version(ctx); err == nil {
		version = "QEMU " + v.String()
	}
	d.say("starting two QEMUs (%s, TCG, -cpu max)", version)
	var logf func(string, ...any)
	if d.opts.verbose {
		logf = func(format string, args ...any) { fmt.Fprintf(d.stderr, format+"\n", args...) }
	}
	guest := qemulab.SweepGuest{Spin: d.spin} // its boot disk is drive demoDisk
	qctx := context.WithoutCancel(ctx)
	var err error
	d.src, err = d.qemu.Start(qctx, qemulab.Config{Name: "demo-src", Guest: guest, Logf: logf})
	if err != nil {
		return err
	}
	d.dst, err = d.qemu.Start(qctx, qemulab.Config{Name: "demo-dst", Guest: guest, Incoming: true, Logf: logf})
	if err != nil {
		return err
	}
	d.say("source in %s, destination in %s", d.src.Dir(), d.dst.Dir())
	return nil
}

// waitGuest waits until the source guest has completed a pass of its sweep:
// it then really is dirtying memory.
func (d *demo) waitGuest(ctx context.Context) error {
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if _, err := d.src.CountSerial(wctx, sweep.StartChar, sweep.PassChar, 1); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %w", engine.ErrCancelled, ctx.Err())
		}
		return fmt.Errorf("waiting for the guest to start: %w", err)
	}
	d.say("the guest runs on the source: sweeping %s of RAM at about %s (spin %d)",
		formatBytes(sweep.RangeSize), formatRate(sweep.RateForSpin(d.spin)), d.spin)
	return nil
}

func (d *demo) config() engine.Config {
	o := d.opts
	var storage *blockmirror.Config
	if o.copyStorage {
		storage = &blockmirror.Config{Disks: []string{demoDisk}}
	}
	return engine.Config{
		Storage:             storage,
		Source:              engine.Endpoint{Address: qmp.UnixAddress(d.src.QMPSocket()), Client: d.src.QMP},
		Destination:         engine.Endpoint{Address: qmp.UnixAddress(d.dst.QMPSocket()), Client: d.dst.QMP},
		URI:                 "unix:" + filepath.Join(d.dst.Dir(), "migration.sock"),
		MultifdChannels:     int(o.multifd),
		Bandwidth:           uint64(o.bandwidth),
		Strategy:            o.limitOptions.strategy(),
		ConnectTimeout:      time.Duration(o.connectTimeout),
		UnresponsiveTimeout: time.Duration(o.unresponsive),
		Logger:              o.logger(d.stderr),
		Observer:            d.r.Event,
	}
}

// makeCerts writes a throwaway CA and the certificates both QEMUs use
// (--tls) into a folder of their own.
func (d *demo) makeCerts() error {
	dir, err := os.MkdirTemp("", "qmigrate-demo-pki-")
	if err != nil {
		return err
	}
	d.tlsDir = dir
	if err := qemulab.WriteX509Creds(dir, demoTLSHost); err != nil {
		return err
	}
	d.say("TLS: certificates for %s from a throwaway CA in %s", demoTLSHost, dir)
	return nil
}

// cleanup quits both QEMUs (killing them if they linger) and removes their
// folders and the demo's certificates.
func (d *demo) cleanup() {
	if d.tlsDir != "" {
		defer os.RemoveAll(d.tlsDir)
	}
	for _, q := range []*qemulab.Instance{d.src, d.dst} {
		if q == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = q.Quit(ctx)
		cancel()
		_ = q.Close()
	}
}
