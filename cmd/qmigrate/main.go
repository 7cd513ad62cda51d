// Command qmigrate live-migrates a running QEMU virtual machine by speaking
// QMP directly to the source and the destination QEMU.
//
// Usage:
//
//	qmigrate migrate --src ADDR --dst ADDR --uri URI [flags]
//	qmigrate adopt --src ADDR --dst ADDR --uri URI [flags]
//	qmigrate status --src ADDR [--dst ADDR] [--json]
//	qmigrate check --src ADDR --dst ADDR [flags]
//	qmigrate evacuate --plan FILE [flags]
//	qmigrate demo [flags]
//	qmigrate version
//	qmigrate help [COMMAND]
//
// "qmigrate migrate" moves the guest of the source QEMU to a destination QEMU
// started with "-incoming defer". ADDR is a QMP socket (unix:/path or
// tcp:host:port); URI is where the destination listens for the migration
// stream (unix:/path or tcp:host:port). It shows a live progress line on a
// terminal, plain log lines otherwise, or one JSON object per line with
// --json (the last one the result); "qmigrate migrate --help" documents every
// flag, the JSON lines and the exit statuses.
//
// "qmigrate adopt" takes over a migration another qmigrate process left in
// flight between the two QEMUs (engine.Adopt) and brings it to an end, with
// migrate's flags, output and exit statuses (2 when there is nothing to
// adopt). "qmigrate status" shows, read-only, each QEMU's run state,
// migration status and statistics, and the leftovers qmigrate recognises as
// its own; it exits 0 once it read them, 2 on bad usage or an unreachable
// QEMU.
//
// "qmigrate check" runs every preflight check (package preflight) on the two
// QEMUs without changing anything, prints a table (or JSON lines with
// --json) and exits 0 when the migration can run, 1 when it cannot (every
// reason listed), 2 on bad usage.
//
// "qmigrate demo" starts two local QEMUs itself (qemu-system-x86_64, TCG)
// with a small guest embedded in the binary, migrates it, checks the guest's
// memory on the destination and cleans up.
//
// "qmigrate" without a command prints the usage on stderr and exits 2;
// "qmigrate help", "qmigrate --help" and "qmigrate COMMAND --help" print it on
// stdout and exit 0.
//
// Exit status: 0 the migration completed and the guest runs on the
// destination; 1 it failed, was aborted or cancelled (SIGINT, SIGTERM) and
// the guest runs on the source; 2 bad usage or bad input (the message names
// the flag, the address or what QEMU said).
//
// Signals: the first SIGINT or SIGTERM cancels the migration; the engine then
// rolls back so the guest keeps running on the source. Further signals do not
// cut the rollback short: qmigrate says so on stderr and keeps restoring the
// source.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"
)

// Exit statuses.
const (
	exitOK     = 0 // completed, the guest runs on the destination
	exitFailed = 1 // failed, aborted or cancelled; the guest runs on the source
	exitUsage  = 2 // bad usage or bad input
)

func main() {
	// A reader of --json that goes away (qmigrate ... | head -1) must not
	// kill qmigrate mid-migration with SIGPIPE: the write fails instead and
	// the migration finishes or rolls back as usual.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signalContext(context.Background(), stderrNotes(os.Stderr))
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// signalContext returns a context cancelled by the first SIGINT or SIGTERM.
// Later signals are reported on stderr and otherwise ignored, so a rollback
// in progress is never abandoned half-way. stop releases the signals.
func signalContext(parent context.Context, stderr io.Writer) (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancel(parent)
	// On a terminal the live progress line (and the echoed ^C) sits where
	// the cursor is: clear it first, the next redraw puts it back below.
	clear := ""
	if _, ok := terminalWidth(stderr); ok {
		clear = eraseLine
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		n := 0
		for {
			select {
			case sig := <-sigs:
				n++
				if n == 1 {
					fmt.Fprintf(stderr, "%sqmigrate: %v: cancelling; rolling back so the guest keeps running on the source\n", clear, sig)
					cancel()
					continue
				}
				fmt.Fprintf(stderr, "%sqmigrate: %v: still rolling back; qmigrate will not leave the source half restored, please wait\n", clear, sig)
			case <-done:
				return
			}
		}
	}()
	return ctx, func() {
		signal.Stop(sigs)
		close(done)
		<-finished
		cancel()
	}
}

const topUsage = `qmigrate live-migrates a running QEMU VM by speaking QMP to both QEMUs.

Usage:
  qmigrate migrate --src ADDR --dst ADDR --uri URI [flags]
                               migrate the guest of the source QEMU to a
                               destination QEMU started with -incoming defer
  qmigrate adopt --src ADDR --dst ADDR --uri URI [flags]
                               take over a migration another qmigrate process
                               left in flight (killed, crashed, upgraded) and
                               bring it to an end (exit 2: nothing to adopt)
  qmigrate status --src ADDR [--dst ADDR] [--json]
                               show, changing nothing, what each QEMU is doing:
                               run state, migration, what qmigrate left on it
  qmigrate check --src ADDR --dst ADDR [flags]
                               check, changing nothing, whether the migration
                               can run; list every reason why not (exit 0 it
                               can, 1 it cannot, 2 bad usage)
  qmigrate evacuate --plan FILE [flags]
                               run the migrations of a plan at once under shared
                               limits (in flight, per host, bandwidth per host)
  qmigrate demo [flags]        start two local QEMUs with a small embedded guest,
                               migrate it live and verify it on the destination
  qmigrate version             print the version
  qmigrate help [COMMAND]      show help (same as COMMAND --help)

Exit status: 0 completed (the guest runs on the destination), 1 failed, aborted
or cancelled (the guest runs on the source), 2 bad usage or bad input; evacuate
also 3: some guest's state is unknown or lost.

Run 'qmigrate COMMAND --help' for the flags of a command. Without a command,
qmigrate prints this on stderr and exits 2.
`

// run is the whole program: it parses args, runs the command and returns the
// exit status. Output goes to stdout and stderr only; ctx cancels.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, topUsage)
		return exitUsage
	}
	switch cmd, rest := args[0], args[1:]; cmd {
	case "migrate":
		return runMigrate(ctx, rest, stdout, stderr)
	case "adopt":
		return runAdopt(ctx, rest, stdout, stderr)
	case "status":
		return runStatus(ctx, rest, stdout, stderr)
	case "check":
		return runCheck(ctx, rest, stdout, stderr)
	case "demo":
		return runDemo(ctx, rest, stdout, stderr)
	case "evacuate":
		return runEvacuate(ctx, rest, stdout, stderr)
	case "version", "-version", "--version":
		if len(rest) > 0 {
			fmt.Fprintf(stderr, "qmigrate version: unexpected argument %q\n", rest[0])
			return exitUsage
		}
		fmt.Fprintln(stdout, versionString())
		return exitOK
	case "help", "-h", "-help", "--help":
		if len(rest) > 1 {
			fmt.Fprintf(stderr, "qmigrate help: unexpected argument %q\n", rest[1])
			return exitUsage
		}
		if len(rest) == 1 {
			switch rest[0] {
			case "migrate", "adopt", "status", "check", "demo", "evacuate":
				return run(ctx, []string{rest[0], "--help"}, stdout, stderr)
			case "help", "version":
			default:
				fmt.Fprintf(stderr, "qmigrate help: unknown command %q\n\n%s", rest[0], topUsage)
				return exitUsage
			}
		}
		fmt.Fprint(stdout, topUsage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "qmigrate: unknown command %q\n\n%s", cmd, topUsage)
		return exitUsage
	}
}

// versionString names the module version, the VCS revision when the binary
// was built from a checkout, and the Go toolchain.
func versionString() string {
	version, rev, dirty := "devel", "", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v := bi.Main.Version; v != "" && v != "(devel)" {
			version = v
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
	}
	out := "qmigrate " + version
	if rev != "" {
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if dirty {
			rev += "+dirty"
		}
		out += " (" + rev + ")"
	}
	return fmt.Sprintf("%s %s %s/%s", out, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
