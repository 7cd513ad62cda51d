package engine

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// Endpoint names one QEMU's QMP monitor: either an address the engine dials
// (and closes when done; a failure to connect is a *ConnectError) or a
// client the caller already holds (the engine never closes a caller's
// client). Client wins when both are set.
type Endpoint struct {
	Address qmp.Address // a QMP monitor's socket (qmp.ParseAddress reads "unix:/path", "tcp:host:port")
	Client  *qmp.Client // a connected client the caller keeps ownership of
}

// Config is one migration. The zero value of every optional field is
// documented; Validate says what is wrong with a config.
type Config struct {
	Source, Destination Endpoint

	// URI is where the destination listens for the migration stream:
	// "unix:/path" or "tcp:host:port". Port 0 lets QEMU pick; the engine reads
	// the real port back from the destination. "exec:" and any other scheme
	// are refused.
	URI string

	// MultifdChannels > 0 enables multifd with that many channels on both
	// sides; 0 means no multifd. Both QEMUs must then have the same -uuid (or
	// none), which prepare checks.
	MultifdChannels int

	// Bandwidth is the max-bandwidth in bytes/s; 0 means unlimited.
	// max-bandwidth is always set explicitly: QEMU's 128 MiB/s default is
	// never left in place.
	Bandwidth uint64

	// Strategy selects the policy and carries the user's limits
	// (MaxDowntime default 300ms, Budget, ProgressTimeout, NoThrottle,
	// AllowPostcopy, AllowPause, NoWriteBlocking). The Budget counts from
	// the call to Migrate, storage mirroring included.
	Strategy strategy.Config

	// Storage, when non-nil, migrates non-shared disks with blockmirror.
	// Storage.WriteBlocking starts the mirrors in write-blocking mode (the
	// only way on a source without block-job-change, QEMU < 8.2); otherwise
	// the strategy may switch non-converging mirrors to it during the
	// mirror phase, or after READY when the disk backlog would not drain
	// within the downtime at switchover. It may not be combined with
	// Strategy.Limits.NoWriteBlocking.
	Storage *blockmirror.Config

	// TLS, when non-nil, encrypts the migration stream (and the mirrors'
	// NBD connections of a storage migration) with QEMU's own TLS: the
	// engine creates the credentials objects on both QEMUs from the
	// folders named there (QEMU reads them on its own host; a file that is
	// missing or refused fails the prepare phase as bad input), sets
	// tls-creds and tls-hostname (and tls-authz when TLS.Authz is set; an
	// authorization the destination has is otherwise left in force), and
	// removes all of it again
	// when the migration ends, completed or rolled back. Without TLS a
	// tls-creds left set by an earlier run is cleared for this migration
	// (and restored after a rollback).
	TLS *transport.TLS

	// PollInterval is how often query-migrate is polled during converge
	// (MIGRATION and MIGRATION_PASS events wake the loop earlier). 0 = 200ms.
	PollInterval time.Duration

	// ConnectTimeout bounds dialing, the QMP handshake and the first answers of
	// each side, so a QEMU that never answers fails fast. 0 = 10s. A
	// Strategy.Limits.Budget that ends sooner bounds them too.
	ConnectTimeout time.Duration

	// UnresponsiveTimeout bounds every later QMP command the engine sends
	// (setting capabilities and parameters, migrate-incoming, migrate, each
	// poll of the converge loop and the decisions applied, the switchover
	// and complete phases): a monitor that answers nothing for this long
	// (its QEMU stopped with SIGSTOP, its main loop stuck) ends the
	// migration with an *Error that names the side and the command and
	// wraps ErrUnresponsive. 0 = 30s. Before the switchover a
	// Strategy.Limits.Budget bounds each command too, by what is left of it
	// plus PollInterval (see ErrAborted). QEMU answers within milliseconds
	// while it migrates, except during the stop-and-copy, when its
	// migration thread holds the big lock while it writes the device state
	// (up to seconds with a long downtime limit or a paused source): keep
	// this well above that. Rollback steps are bounded separately (5s per
	// command, 30s in all).
	UnresponsiveTimeout time.Duration

	// Logger receives debug logs of every step; nil discards.
	Logger *slog.Logger

	// Observer, when set, is called synchronously and in order from the
	// engine goroutine with every Event. It must not block for long.
	Observer func(Event)
}

// Phase is a stage of a migration.
type Phase string

// Phases, in the order a successful migration goes through them. Rollback is
// entered from any phase before the switchover point of no return.
const (
	PhasePrepare    Phase = "prepare"
	PhaseStart      Phase = "start"
	PhaseConverge   Phase = "converge"
	PhaseSwitchover Phase = "switchover"
	PhaseComplete   Phase = "complete"
	PhaseRollback   Phase = "rollback"
)

// EventKind says which member of Event is set.
type EventKind string

// Event kinds.
const (
	EventPhase    EventKind = "phase"
	EventStats    EventKind = "stats"
	EventDecision EventKind = "decision"
	EventDisk     EventKind = "disk"
	EventResult   EventKind = "result"
)

// Event is one observation of a running migration. Exactly the member named
// by Kind is set. The result event is always the last one.
type Event struct {
	Kind    EventKind
	Elapsed time.Duration // since Migrate was called

	Phase       Phase                 // Kind == EventPhase: the phase entered
	Stats       *Stats                // Kind == EventStats: one per poll
	Decision    *strategy.Decision    // Kind == EventDecision
	DecisionErr error                 //   the error applying it, if any
	Disk        *blockmirror.Progress // Kind == EventDisk
	Result      *Result               // Kind == EventResult
}

// Stats is one sample of the source's query-migrate.
type Stats struct {
	Status           string
	Iteration        uint64 // dirty-sync-count: the pass number
	TransferredBytes uint64
	RemainingBytes   uint64
	TotalBytes       uint64
	DirtyRate        float64 // bytes/s, QEMU's (saturates at about the throughput)
	// GuestDirtyRate is the guest's dirty rate measured apart from the
	// migration (calc-dirty-rate page sampling, when the policy asks for it),
	// bytes/s; 0 until measured.
	GuestDirtyRate   float64
	Throughput       float64 // bytes/s
	ExpectedDowntime time.Duration
	ThrottlePercent  int
	DowntimeLimit    time.Duration // the limit in force
	StorageRemaining uint64        // bytes of disk still to mirror (0 without storage)
	StorageTotal     uint64
}

// Result is the outcome of Migrate.
type Result struct {
	// Status is "completed", "failed" or "cancelled".
	Status string
	// Total is the wall time of the whole call.
	Total time.Duration
	// Downtime is the guest's downtime: the larger of QEMU's own "downtime"
	// (source query-migrate after completion) and, when both events were
	// seen, the wall time from the source's STOP to the destination's RESUME
	// (or to the engine's cont on the destination). 0 when not completed.
	Downtime time.Duration
	// TransferredBytes is the RAM bytes sent (source ram.transferred): at
	// completion, or as last polled when the migration did not complete.
	TransferredBytes uint64
	// Decisions are the strategy's decisions, in order.
	Decisions []strategy.Decision
	// Undone lists the rollback steps that ran, in order.
	Undone []string
	// UndoErrors lists rollback steps that failed, with why.
	UndoErrors []string
	// StateUnknown: the engine could not establish where the guest runs,
	// a monitor having stopped answering (ErrUnresponsive) once the
	// switchover began (nothing is rolled back from there) or the rollback
	// having failed half-way; UndoErrors says what is known. Check both
	// QEMUs. When false, the guest runs where Status says.
	StateUnknown bool
	// Err is the error Migrate returned (nil iff completed).
	Err error
}

// Result statuses.
const (
	StatusCompleted = "completed"
	StatusFailed    = "failed"
	StatusCancelled = "cancelled"
)

// Side names one of the two QEMUs.
type Side string

// Sides.
const (
	SideSource      Side = "source"
	SideDestination Side = "destination"
)

// Error is a failed step of a migration: in which phase, on which side, what
// the engine was doing, and the cause (often a *qmp.Error with QEMU's text).
type Error struct {
	Phase Phase
	Side  Side // "" when the step is not tied to one side
	Op    string
	Err   error
}

func (e *Error) Error() string {
	side := ""
	if e.Side != "" {
		side = " " + string(e.Side)
	}
	return fmt.Sprintf("engine: %s%s: %s: %v", e.Phase, side, e.Op, e.Err)
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Sentinel errors; match with errors.Is.
var (
	// ErrInvalidConfig: Config.Validate refused the config. Also wraps ErrBadInput.
	ErrInvalidConfig = fmt.Errorf("invalid config: %w", ErrBadInput)

	// ErrBadInput is wrapped by every failure that happens before anything
	// changed on either QEMU: bad config, cannot connect (no such socket,
	// refused, not QMP, no answer within ConnectTimeout), destination not
	// waiting in inmigrate with -incoming defer, source not running, RAM size
	// or machine type mismatch, uuid mismatch with multifd, a missing
	// capability, blockmirror.ErrPreflight.
	ErrBadInput = errors.New("bad input")

	// ErrCancelled is Result.Err (wrapped) when the caller's context ended;
	// errors.Is(err, context.Canceled) (or DeadlineExceeded) also holds.
	ErrCancelled = errors.New("migration cancelled")

	// ErrAborted: the strategy aborted the migration (budget, no progress,
	// nothing permitted converges). The budget is also enforced under the
	// strategy, before the switchover: a QMP command that gets no answer
	// within what is left of Strategy.Limits.Budget plus PollInterval ends
	// the migration with ErrAborted, the *Error naming the side whose
	// monitor did not answer and the command.
	ErrAborted = errors.New("migration aborted by strategy")

	// ErrUnresponsive: a QEMU's monitor answered nothing to a command for
	// Config.UnresponsiveTimeout (its process stopped, its main loop stuck).
	// The *Error names the side and the command. Before the switchover the
	// rollback runs (Result "failed", the guest on the source): a source
	// that does not answer it either has its migration stream cut from the
	// destination's side (yank), so its migration fails as soon as it runs
	// again, and the steps it could not take are listed in
	// Result.UndoErrors. Once the switchover began (stop-and-copy, a paused
	// source, postcopy) nothing is rolled back: the error and UndoErrors
	// say that the migration's state is unknown.
	ErrUnresponsive = errors.New("QEMU monitor stopped answering")

	// ErrMigrationFailed: QEMU reported the migration failed (error-desc in
	// the message).
	ErrMigrationFailed = errors.New("migration failed")

	// ErrPostcopyFailed: a failure after postcopy started. There is no
	// rollback from postcopy; the guest state lives on both sides.
	ErrPostcopyFailed = errors.New("failure during postcopy: no rollback possible")
)
