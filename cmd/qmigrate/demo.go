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
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
)

// demoOptions are the flags of "qmigrate demo".
type demoOptions struct {
	limitOptions
	qemu      string
	dirtyRate byteSize
	spin      int64 // -1: derive from dirtyRate
}

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
	o.limitOptions.register(fs)
	return fs
}

var demoFlagOrder = []string{
	"qemu", "dirty-rate", "spin", "max-downtime", "bandwidth", "timeout", "progress-timeout", "policy",
	"allow-postcopy", "allow-pause", "no-auto-converge", "multifd", "connect-timeout", "json", "verbose",
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
	if err := parseFlags(fs, "demo", args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, demoUsage)
			printFlags(stdout, fs, demoFlagOrder)
			return exitOK
		}
		return usageFailure(stdout, stderr, "demo", wantsJSON(args), err)
	}
	if err := o.limitOptions.check(); err != nil {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, &usageError{cmd: "demo", msg: err.Error()})
	}
	if o.spin < -1 || o.spin > int64(^uint32(0)) {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, &usageError{cmd: "demo", msg: fmt.Sprintf("--spin %d: want 0 to %d", o.spin, ^uint32(0))})
	}
	if o.dirtyRate == 0 && o.spin < 0 {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, &usageError{cmd: "demo", msg: "--dirty-rate must be more than 0 (use --spin 0 for the fastest guest)"})
	}
	bin, firmware, err := o.findQEMU()
	if err != nil {
		return usageFailure(stdout, stderr, "demo", o.jsonOut, err)
	}
	spin := uint32(o.spin)
	if o.spin < 0 {
		spin = sweep.SpinForRate(float64(o.dirtyRate))
	}
	d := &demo{opts: &o, bin: bin, firmware: firmware, spin: spin, stdout: stdout, stderr: stderr}
	d.r = newRenderer(o.jsonOut, stdout, stderr)
	return d.run(ctx)
}

// findQEMU resolves the QEMU binary and its firmware arguments.
func (o *demoOptions) findQEMU() (bin string, firmware []string, err error) {
	bin = o.qemu
	from := "--qemu"
	if bin == "" {
		bin, from = os.Getenv("QMIGRATE_QEMU"), "QMIGRATE_QEMU"
	}
	if bin == "" {
		bin, from = "qemu-system-x86_64", "PATH"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return "", nil, &inputError{flag: from, address: bin, err: fmt.Errorf("no QEMU here (install qemu-system-x86, or give --qemu PATH): %w", err)}
	}
	if fw := os.Getenv("QMIGRATE_QEMU_FIRMWARE"); fw != "" {
		if st, err := os.Stat(fw); err != nil || !st.IsDir() {
			return "", nil, &inputError{flag: "QMIGRATE_QEMU_FIRMWARE", address: fw, err: errors.New("not a folder")}
		}
		firmware = []string{"-L", fw, "-L", "/usr/share/seabios"}
	}
	return path, firmware, nil
}

// demo is one run of the demo.
type demo struct {
	opts           *demoOptions
	bin            string
	firmware       []string
	spin           uint32
	stdout, stderr io.Writer
	r              renderer
	dir            string
	src, dst       *demoQEMU
}

func (d *demo) say(format string, args ...any) { d.r.Message(fmt.Sprintf(format, args...)) }

func (d *demo) run(ctx context.Context) (code int) {
	start := time.Now()
	fail := func(err error) int {
		res := resultOf(nil, err)
		res.Total = time.Since(start)
		return finish(d.r, d.stderr, res, &demoVerdict{OK: false, Text: "demo not run: " + err.Error()})
	}
	dir, err := os.MkdirTemp("", "qmigrate-demo-")
	if err != nil {
		return fail(err)
	}
	d.dir = dir
	defer d.cleanup()

	if err := d.startQEMUs(ctx); err != nil {
		if ctx.Err() != nil {
			return fail(fmt.Errorf("%w: %w", engine.ErrCancelled, ctx.Err()))
		}
		return fail(err)
	}
	if err := d.waitGuest(ctx); err != nil {
		return fail(err)
	}

	cfg := d.config()
	d.say("migrating the guest live over %s (policy %s, max downtime %s, bandwidth %s)", cfg.URI,
		cfg.Strategy.Policy, formatDuration(cfg.Strategy.Limits.MaxDowntime), d.opts.bandwidth.String())
	res, err := engine.Migrate(ctx, cfg)
	result := resultOf(res, err)

	// Check whichever side should now run the guest, with a context of its
	// own: a Ctrl-C that cancelled the migration must not skip the check.
	vctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 60*time.Second)
	defer cancel()
	verdict := &demoVerdict{}
	if result.Status == engine.StatusCompleted {
		text, verr := d.dst.checkGuest(vctx, d.dir)
		if verr != nil {
			verdict.Text = "NOT VERIFIED on the destination: " + verr.Error()
			result.Status = engine.StatusFailed
			result.Err = fmt.Errorf("checking the guest on the destination: %w", verr)
		} else {
			verdict.OK, verdict.Text = true, "verified on the destination: "+text
		}
	} else {
		text, verr := d.src.checkGuest(vctx, d.dir)
		if verr != nil {
			verdict.Text = "the source guest is NOT intact: " + verr.Error()
		} else {
			verdict.Text = "checked on the source: " + text
		}
	}
	return finish(d.r, d.stderr, result, verdict)
}

// startQEMUs writes the guest's disks and starts both QEMUs.
func (d *demo) startQEMUs(ctx context.Context) error {
	var log = d.opts.logger(d.stderr)
	version := ""
	if out, err := exec.Command(d.bin, "-version").Output(); err == nil {
		version = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	d.say("starting two QEMUs (%s; TCG) in %s", version, d.dir)
	for _, side := range []struct {
		name     string
		incoming bool
		q        **demoQEMU
	}{{"source", false, &d.src}, {"destination", true, &d.dst}} {
		// Each side has its own copy of the boot disk: the guest never
		// writes to it, and two QEMUs never lock the same file.
		disk := filepath.Join(d.dir, side.name+".img")
		if err := sweep.WriteDisk(disk, d.spin); err != nil {
			return err
		}
		q, err := startQEMU(ctx, d.bin, qemuArgs(d.firmware, d.dir, side.name, disk, side.incoming), side.name, d.dir, log)
		if err != nil {
			return err
		}
		*side.q = q
	}
	return nil
}

// waitGuest waits until the source guest has completed a pass of its sweep:
// it then really is dirtying memory.
func (d *demo) waitGuest(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		if strings.Count(d.src.serial(), string(rune(sweep.PassChar))) >= 1 {
			d.say("the guest runs on the source: sweeping %s of RAM at about %s (spin %d)",
				formatBytes(sweep.RangeSize), formatRate(sweep.RateForSpin(d.spin)), d.spin)
			return nil
		}
		if !d.src.running() {
			return fmt.Errorf("source QEMU exited: %s", d.src.stderr.String())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest did not complete a pass in 60s (serial: %q)", d.src.serial())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", engine.ErrCancelled, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (d *demo) config() engine.Config {
	o := d.opts
	return engine.Config{
		Source:          engine.Endpoint{Address: d.src.qmpAddr, Client: d.src.client},
		Destination:     engine.Endpoint{Address: d.dst.qmpAddr, Client: d.dst.client},
		URI:             "unix:" + filepath.Join(d.dir, "migration.sock"),
		MultifdChannels: int(o.multifd),
		Bandwidth:       uint64(o.bandwidth),
		Strategy:        o.limitOptions.strategy(),
		ConnectTimeout:  time.Duration(o.connectTimeout),
		Logger:          o.logger(d.stderr),
		Observer:        d.r.Event,
	}
}

// cleanup stops both QEMUs and removes the temporary folder.
func (d *demo) cleanup() {
	d.src.stop()
	d.dst.stop()
	if d.dir != "" {
		_ = os.RemoveAll(d.dir)
	}
}
