package main

import (
	"context"
	"fmt"
	"io"

	"github.com/qmigrate/qmigrate/engine"
)

func runAdopt(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return runMigration(ctx, adoptCommand, args, stdout, stderr)
}

var adoptCommand = migrationCommand{
	name: "adopt", usage: adoptUsage, usageTail: adoptUsageTail,
	opening: func(o *migrateOptions, cfg engine.Config) string {
		return fmt.Sprintf("adopting the migration %s -> %s over %s%s (policy %s, max downtime %s, bandwidth %s)", o.src, o.dst, o.uri,
			o.tls.describe(), cfg.Strategy.Policy, formatDuration(cfg.Strategy.Limits.MaxDowntime), o.bandwidth.rate())
	},
	run: adoptAndWait,
}

// adoptAndWait takes the migration over with engine.Adopt and waits for
// its end. A refusal (nothing to adopt, not qmigrate's, postcopy paused)
// or a failure before Adopt held the migration has no Job: its Result is
// the one the observer's result event carries.
func adoptAndWait(ctx context.Context, cfg engine.Config) (*engine.Result, error) {
	var last *engine.Result
	observe := cfg.Observer
	cfg.Observer = func(ev engine.Event) {
		if ev.Kind == engine.EventResult {
			last = ev.Result
		}
		if observe != nil {
			observe(ev)
		}
	}
	j, err := engine.Adopt(ctx, cfg)
	if err != nil {
		return last, err
	}
	res, err := j.Wait(context.Background()) // ctx cancels the job itself

	return &res, err
}

const adoptUsage = `Usage: qmigrate adopt --src ADDR --dst ADDR --uri URI [flags]

Takes over a migration that another qmigrate process (killed, crashed or
upgraded) left in flight between the two QEMUs, and brings it to an end:
completed with the guest on the destination, or rolled back with the guest on
the source. Give the flags the first process was given (addresses, --uri,
limits, policy, TLS, storage); the limits given here are put in force.

QEMU is the source of truth: adopt reads both QEMUs (run states, the
migration's status, capabilities and parameters, and the journal qmigrate
keeps on each QEMU of what they were before it changed anything), then:
  - a pre-copy migration goes on under the policy, its --timeout counted
    from QEMU's own start of the migration;
  - a migration with disk mirrors (--copy-storage, --disk) is rolled back:
    the mirrors died with the first process;
  - postcopy is seen through to the end; postcopy-paused is refused, with
    nothing touched (the guest runs on the destination and waits for pages
    the source holds: it needs QEMU's postcopy recovery, exit 1);
  - a migration that completed on the source is finished on the destination;
  - a failed or cancelled one, or one the first process left in prepare, is
    cleaned up: the guest runs on the source, capabilities and parameters
    are set back to what the journal says they were.
With nothing of qmigrate's in flight (or a migration qmigrate did not start)
adopt changes nothing and exits 2. 'qmigrate status' shows what is there.

ADDR is a QMP socket: unix:/path or tcp:host:port.

Flags:
`

const adoptUsageTail = `
OUTPUT, JSON OUTPUT (--json), METRICS (--metrics-addr)
  As for qmigrate migrate (see qmigrate migrate --help): the same lines, the
  last one the result. Events from before the adoption are not repeated; the
  result's total_ms counts from the adoption.

EXIT STATUS
  0  completed: the guest runs on the destination
  1  failed, rolled back or cancelled: the guest runs on the source (a
     migration abandoned with its disk mirrors, or found failed, is cleaned
     up and exits 1)
  2  bad usage or bad input, as for migrate; also nothing to adopt (no
     migration of qmigrate's between the two QEMUs and nothing of qmigrate's
     left on them) or a migration qmigrate did not start: nothing was
     changed

SIGNALS
  SIGINT or SIGTERM cancels as for migrate: before postcopy or the
  switchover the migration is rolled back, status "cancelled", exit 1.

EXAMPLES
  qmigrate status --src unix:/run/vm1-src.qmp --dst unix:/run/vm1-dst.qmp
  qmigrate adopt --src unix:/run/vm1-src.qmp --dst unix:/run/vm1-dst.qmp \
      --uri tcp:10.0.0.2:4444 --max-downtime 500ms --json
`
