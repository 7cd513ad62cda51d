package fleet

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/engine"
)

// Plan is a set of migrations to run under shared limits.
type Plan struct {
	// Migrations, in the plan's order (the order they start in, among
	// equal priorities, unless SmallestFirst).
	Migrations []Migration

	// Limits are the fleet's limits: how many migrations in flight, in all
	// and per host, and a bandwidth budget per source host.
	Limits Limits

	// SmallestFirst starts the smallest guests first (Migration.Size)
	// among equal priorities: more guests leave the hosts sooner.
	SmallestFirst bool

	// Retries is how many more times a failed migration (the guest still
	// on its source, per its Result) is tried, each on a fresh destination
	// from NewDestination. Retries > 0 needs NewDestination. A migration
	// whose guest's state is unknown or lost is never retried.
	Retries int

	// NewDestination gives a fresh destination for the next attempt of a
	// failed migration (attempt is 2 for the first retry): typically it
	// starts a new destination QEMU with -incoming defer. The old
	// destination is the caller's to clean up.
	NewDestination func(ctx context.Context, m Migration, attempt int) (Target, error)

	// Limiter hands out the slots (in flight, per source host, per
	// destination host). nil: NewLimiter(Limits), within this process. A
	// Limiter shared between processes (for example fleet/etcdlimit)
	// replaces it; Limits' counts then only serve to validate the plan.
	Limiter Limiter

	// Observer, when set, gets every event of every migration, tagged
	// with its name, and the fleet's own events. Calls are serialised
	// (never two at once) and each migration's events arrive in order.
	// It must not block for long: it holds up the migration whose event
	// it is.
	Observer func(Event)
}

// Migration is one guest to move.
type Migration struct {
	// Name identifies the migration in events and results; unique in the
	// plan.
	Name string
	// SourceHost and DestinationHost name the hosts the plan's limits
	// count against (the plan names them; they are not guessed from
	// addresses). Needed when the matching limit is set.
	SourceHost, DestinationHost string
	// Priority: higher starts first (default 0).
	Priority int
	// Size is the guest's RAM in bytes, for SmallestFirst; 0 means it is
	// read from the source QEMU (query-memory-size-summary) before the
	// fleet starts, and a guest whose size stays unknown goes last.
	Size uint64
	// Config is the migration's engine configuration: endpoints, URI, and
	// its own policy, limits, permissions, storage and TLS. Its Bandwidth
	// is a cap: on a source host with a budget the migration gets its
	// share of the budget, never more than this cap. Its Observer, if any,
	// is called too, before the fleet's.
	Config engine.Config
}

// Target is a fresh destination for a retry (Plan.NewDestination).
type Target struct {
	// Destination is the new destination QEMU's monitor.
	Destination engine.Endpoint
	// URI is where it listens for the migration stream; "" keeps the
	// migration's URI.
	URI string
	// Host names the destination host for the limits; "" keeps the
	// migration's DestinationHost.
	Host string
}

// Limits are the fleet's limits; 0 means no limit.
type Limits struct {
	MaxParallel       int // migrations in flight in all
	MaxPerSource      int // outbound migrations per source host
	MaxPerDestination int // inbound migrations per destination host
	// HostBandwidth is a budget in bytes/s per source host, shared by the
	// migrations running from that host: split among them when one
	// starts, split again when one ends, their max-bandwidth never
	// exceeding it in sum.
	HostBandwidth map[string]uint64
}

// ErrInvalidPlan is wrapped by every *PlanError.
var ErrInvalidPlan = errors.New("invalid plan")

// PlanError says what is wrong with a plan: which migration (Index -1 and
// Name "" for the plan itself) and which field.
type PlanError struct {
	Index int    // the migration's index in Plan.Migrations, -1 for the plan's own fields
	Name  string // the migration's name
	Field string // "Name", "SourceHost", "Config", "Limits.HostBandwidth", ...
	Err   error
}

func (e *PlanError) Error() string {
	if e.Index < 0 {
		return fmt.Sprintf("fleet: %v: %s: %v", ErrInvalidPlan, e.Field, e.Err)
	}
	name := e.Name
	if name == "" {
		name = fmt.Sprintf("#%d", e.Index+1)
	}
	return fmt.Sprintf("fleet: %v: migration %s: %s: %v", ErrInvalidPlan, name, e.Field, e.Err)
}

// Unwrap returns the cause and ErrInvalidPlan.
func (e *PlanError) Unwrap() []error { return []error{ErrInvalidPlan, e.Err} }

// Validate says what is wrong with the plan (a *PlanError), or nil. Each
// migration's Config is checked with engine.Config.Validate.
func (p *Plan) Validate() error {
	plan := func(field string, err error) error { return &PlanError{Index: -1, Field: field, Err: err} }
	l := p.Limits
	if l.MaxParallel < 0 {
		return plan("Limits.MaxParallel", fmt.Errorf("negative (%d)", l.MaxParallel))
	}
	if l.MaxPerSource < 0 {
		return plan("Limits.MaxPerSource", fmt.Errorf("negative (%d)", l.MaxPerSource))
	}
	if l.MaxPerDestination < 0 {
		return plan("Limits.MaxPerDestination", fmt.Errorf("negative (%d)", l.MaxPerDestination))
	}
	if p.Retries < 0 {
		return plan("Retries", fmt.Errorf("negative (%d)", p.Retries))
	}
	if p.Retries > 0 && p.NewDestination == nil {
		return plan("Retries", errors.New("retries need NewDestination (a failed migration is retried on a fresh destination)"))
	}
	names := map[string]bool{}
	sources := map[string]bool{}
	for i, m := range p.Migrations {
		bad := func(field string, err error) error { return &PlanError{Index: i, Name: m.Name, Field: field, Err: err} }
		if m.Name == "" {
			return bad("Name", errors.New("empty"))
		}
		if names[m.Name] {
			return bad("Name", fmt.Errorf("%q is used by an earlier migration", m.Name))
		}
		names[m.Name] = true
		if m.SourceHost == "" && (l.MaxPerSource > 0 || len(l.HostBandwidth) > 0) {
			return bad("SourceHost", errors.New("empty, and the plan limits source hosts"))
		}
		if m.DestinationHost == "" && l.MaxPerDestination > 0 {
			return bad("DestinationHost", errors.New("empty, and the plan limits destination hosts"))
		}
		if err := m.Config.Validate(); err != nil {
			return bad("Config", err)
		}
		sources[m.SourceHost] = true
	}
	for h, bw := range l.HostBandwidth {
		if !sources[h] {
			return plan("Limits.HostBandwidth", fmt.Errorf("host %q is the source of no migration", h))
		}
		if bw == 0 {
			return plan("Limits.HostBandwidth", fmt.Errorf("host %q: 0 (leave the host out for no budget)", h))
		}
	}
	return nil
}

// Outcome is how a migration of the fleet ended.
type Outcome string

// Outcomes.
const (
	// Completed: the guest runs on the destination.
	Completed Outcome = "completed"
	// RolledBack: the fleet was cancelled while it ran; it rolled back
	// and the guest runs on its source.
	RolledBack Outcome = "rolled-back"
	// Failed: it failed (after its retries); the guest runs on its source.
	Failed Outcome = "failed"
	// Unknown: where the guest runs is unknown or its state is lost
	// (engine Result.StateUnknown, or a failure in postcopy): check both
	// QEMUs. The fleet never touched it again.
	Unknown Outcome = "unknown"
	// NotStarted: the fleet was cancelled (or its limiter failed) before
	// it started; the guest was not touched.
	NotStarted Outcome = "not-started"
)

// Result is the outcome of one migration of the fleet.
type Result struct {
	Name    string
	Outcome Outcome
	// Attempts is how many times it was started (0: never).
	Attempts int
	// SourceHost and DestinationHost are the last attempt's.
	SourceHost, DestinationHost string
	// Engine is the last attempt's engine Result (nil when never started).
	Engine *engine.Result
	// Err is why it did not complete (nil when completed).
	Err error
	// Queued is the wait before its first start; Time the wall time from
	// its first start to its end, retries included.
	Queued, Time time.Duration
	// Bytes is the RAM bytes sent over all attempts.
	Bytes uint64
	// Downtime is the guest's downtime (completed only).
	Downtime time.Duration
}

// Summary counts the fleet's outcomes and adds up its figures.
type Summary struct {
	Completed, RolledBack, Failed, Unknown, NotStarted int
	// Total is the fleet's wall time (the makespan).
	Total time.Duration
	// Bytes is the RAM bytes sent by every attempt of every migration.
	Bytes uint64
	// Downtime is the sum of the completed guests' downtimes,
	// MaxDowntime the longest.
	Downtime, MaxDowntime time.Duration
	// Retries is the number of attempts beyond each migration's first.
	Retries int
}

// Report is what Run returns: a Result per migration, the migrations
// whose state is unknown first, then the others in the plan's order; and
// the summary.
type Report struct {
	Results []Result
	Summary Summary
}

// EventKind says what an Event reports.
type EventKind string

// Event kinds.
const (
	// EventStart: an attempt is starting (Attempt, Bandwidth, the hosts).
	EventStart EventKind = "start"
	// EventEngine: an event of the migration's engine job (Engine).
	EventEngine EventKind = "engine"
	// EventRetry: the migration failed and is queued again on a fresh
	// destination (Err says why it failed).
	EventRetry EventKind = "retry"
	// EventEnd: the migration's final Result (Result).
	EventEnd EventKind = "end"
)

// Event is one observation of the fleet, tagged with the migration's name.
type Event struct {
	Name    string
	Kind    EventKind
	Attempt int // 1 for the first attempt
	// Engine is the engine's event (Kind EventEngine).
	Engine engine.Event
	// Bandwidth is the share of its source host's budget the attempt
	// starts with (Kind EventStart), 0 when no budget applies; later
	// changes are engine events of kind engine.EventLimits.
	Bandwidth uint64
	// SourceHost and DestinationHost (Kind EventStart).
	SourceHost, DestinationHost string
	// Err is the failure that leads to a retry (Kind EventRetry).
	Err error
	// Result is the final result (Kind EventEnd).
	Result *Result
}
