// Package fleet runs many migrations at once under shared limits: a host
// drained for maintenance, a cluster rebalanced. It sits above package
// engine (engine does not import it) and uses engine's jobs (engine.Start,
// Job.SetBandwidth, Job.Wait).
//
// # Plan
//
// A Plan lists the migrations (a name, the source and destination hosts,
// and an engine.Config each: endpoints, URI, and the migration's own
// policy, limits, permissions, storage and TLS) and the fleet's Limits:
// migrations in flight in all, outbound per source host, inbound per
// destination host (hosts as the plan names them), and a bandwidth budget
// per source host. Run validates the plan (a *PlanError names the
// migration and the field) and runs it.
//
// # Order
//
// Migrations start in the plan's order; a higher Migration.Priority starts
// first, and SmallestFirst starts the smallest guests first among equal
// priorities (more guests leave the host sooner; a Size of 0 is read from
// the source QEMU). A migration whose slot is not free (its source host
// full, say) lets the next one in the order start.
//
// # Limits
//
// The counts are taken through a Limiter: NewLimiter's in-process one by
// default, or one shared by several processes. The bandwidth budget of a
// source host is split among the migrations running there when one starts
// and split again when one ends, through Job.SetBandwidth: the shares that
// go down are lowered first (SetBandwidth returns once the source QEMU has
// the new max-bandwidth), then the ones that go up are raised, so the sum
// of the max-bandwidth of the host's running migrations never exceeds the
// budget. A migration's own Config.Bandwidth caps its share; what it
// leaves goes to the others.
//
// # Failures
//
// A migration that failed with its guest still on its source (the engine's
// Result) is tried again, up to Plan.Retries times, on a fresh destination
// from Plan.NewDestination. A guest whose state is unknown or lost (the
// engine's Result.StateUnknown, or a failure in postcopy) is never touched
// again; its Result comes first in the Report.
//
// # Cancel
//
// Cancelling Run's context cancels the fleet: no migration starts any
// more, every running one rolls back with its guest on its source (or,
// past its switchover, finishes), and Run returns when all ended; each
// guest is then on exactly one side, as its Result says.
//
// # Events
//
// Plan.Observer gets every engine event of every migration tagged with its
// name (EventEngine), and the fleet's own: an attempt starting with its
// bandwidth share (EventStart), a retry (EventRetry), the final Result
// (EventEnd). A share changed later is the engine's EventLimits.
package fleet
