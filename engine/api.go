package engine

import (
	"crypto/tls"
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
	// TLS makes the engine speak TLS to the monitor at Address (QEMU's
	// -chardev socket,...,tls-creds=ID; qmp.LoadTLSDir reads a client's
	// credentials in QEMU's layout).
	TLS *tls.Config
	// InsecureTCP permits plain tcp to a monitor that is not on this host
	// (not loopback). Without it Validate refuses that: plain QMP hands the
	// VM, and through it its host's files, to whoever reaches the port.
	InsecureTCP bool
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

	// Listen, when set, is where the destination listens (migrate-incoming,
	// and migrate-recover in a postcopy recovery), when it differs from
	// where the source connects (URI): "tcp:0.0.0.0:4444" or
	// "tcp:[::]:4444" behind a host address, NAT or a proxy. Same scheme
	// as URI; "" listens at URI. A URI with port 0 takes the port the
	// destination listens on.
	Listen string

	// RecoveryTimeout bounds the recovery of a postcopy whose link was
	// lost (recover.go): attempts are retried with backoff until the
	// migration runs again, or this long after the loss (each loss has its
	// own). 0 = DefaultRecoveryTimeout (5 minutes: the alternative is
	// losing the guest). Negative: no recovery, the migration ends with
	// ErrRecoveryFailed at the first loss, both QEMUs left paused.
	RecoveryTimeout time.Duration

	// PostcopyStallTimeout is how long a postcopy may move no byte while
	// pages remain before the engine takes its link for lost (a link that
	// drops packets without a reset: QEMU waits on TCP for minutes) and
	// pauses the sides still waiting (migrate-pause) to recover it; it
	// also bounds each recovery attempt's handshake. 0 =
	// DefaultPostcopyStallTimeout (5s).
	PostcopyStallTimeout time.Duration

	// NoPostcopyPreempt keeps postcopy-preempt off. By default it is on
	// whenever postcopy is permitted, both QEMUs are 8.0 or newer and
	// multifd is off (urgent page requests then travel on their own
	// channel, beside the background stream); this turns it off to compare
	// (qmbench -no-preempt) or to work around a QEMU whose preempt fails.
	NoPostcopyPreempt bool

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
	EventLimits   EventKind = "limits" // a limit changed through the Job (SetBandwidth, SetMaxDowntime, SetBudget)
	// EventRecovery: postcopy's link was lost, or a recovery attempt
	// started or ended (Event.Recovery).
	EventRecovery EventKind = "recovery"
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
	Limits      *Limits               // Kind == EventLimits: the limits now in force
	Recovery    *Recovery             // Kind == EventRecovery
}

// RecoveryStep says what an EventRecovery reports.
type RecoveryStep string

// Recovery steps, in the order a recovery goes through them.
const (
	RecoveryLinkLost  RecoveryStep = "link-lost" // postcopy's link broke (Detail: how it was seen); the sides are being paused
	RecoveryAttempt   RecoveryStep = "attempt"   // an attempt starts: migrate-recover, migrate resume
	RecoveryFailed    RecoveryStep = "failed"    // the attempt failed (Detail: why); another follows after Backoff
	RecoveryRecovered RecoveryStep = "recovered" // postcopy runs again (Stalled: how long the guest waited)
	RecoveryGaveUp    RecoveryStep = "gave-up"   // no recovery possible (a QEMU gone) or the budget spent
)

// Recovery is one step of a postcopy recovery (EventRecovery).
type Recovery struct {
	Step    RecoveryStep
	Loss    int           // which loss of the link in this migration (1 for the first)
	Attempt int           // the attempt for this loss (1 for the first; 0 with link-lost, and for a handshake Adopt found under way)
	Detail  string        // how the loss was seen, why an attempt failed, or how an attempt reads a destination whose in-band monitor is blocked
	Stalled time.Duration // since the loss: the guest waits for the pages it lacks
	Backoff time.Duration // failed: the wait before the next attempt
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
	// MaxDowntime is the user's maximum downtime in force
	// (Strategy.Limits.MaxDowntime, or the strategy's 300 ms default).
	MaxDowntime time.Duration
	// DowntimeHeld: the migration completed with Downtime within
	// MaxDowntime (false when not completed).
	DowntimeHeld bool
	// DowntimeLimit is QEMU's downtime-limit in force at the switchover (0
	// when not completed): with Downtime, what strategy.LearnHeadroom
	// learns from.
	DowntimeLimit time.Duration
	// TransferredBytes is the RAM bytes sent (source ram.transferred): at
	// completion, or as last polled when the migration did not complete.
	TransferredBytes uint64
	// Decisions are the strategy's decisions, in order.
	Decisions []strategy.Decision
	// Undone lists the rollback steps that ran, in order.
	Undone []string
	// UndoErrors lists rollback steps that failed, with why.
	UndoErrors []string
	// Rollback is every step of the rollback as it ended, in order, for
	// a program to act on (Undone and UndoErrors are the same for people,
	// plus the notes of how a late cancel or a rescue ended).
	Rollback []RollbackStep
	// StateUnknown: the engine could not establish where the guest runs,
	// a monitor having stopped answering (ErrUnresponsive) once the
	// switchover began (nothing is rolled back from there) or the rollback
	// having failed half-way; UndoErrors says what is known. Check both
	// QEMUs. When false, the guest runs where Status says.
	StateUnknown bool
	// Recoveries counts the postcopy recoveries that succeeded (each
	// loss of the link that was recovered), RecoveryAttempts the attempts.
	Recoveries       int
	RecoveryAttempts int
	// PostcopyStall is the total time postcopy's link was lost (from each
	// loss seen to postcopy running again, or to the end): the guest ran
	// on the destination but waited on every page it still lacked.
	PostcopyStall time.Duration
	// Lost says, for a postcopy that could not be finished, where the
	// guest stands: GuestLost, PagesLost or PostcopyPaused; "" otherwise.
	Lost LostState
	// Err is the error Migrate returned (nil iff completed).
	Err error
}

// LostState is where the guest stands after a postcopy that could not be
// finished (Result.Lost).
type LostState string

// Lost states.
const (
	// GuestLost: the destination QEMU went away in postcopy. The guest ran
	// there: it is lost. The source holds a stale copy, paused, which is
	// never resumed (its memory diverged from the guest's).
	GuestLost LostState = "guest_lost"
	// PagesLost: the source QEMU went away in postcopy. The destination
	// holds the guest, running but stalled on every page it had not
	// received yet: those pages are lost.
	PagesLost LostState = "pages_lost"
	// PostcopyPaused: the recovery did not succeed within
	// Config.RecoveryTimeout. Both QEMUs are alive in postcopy-paused: the
	// destination holds the guest (stalled), the source its missing
	// pages; a later recovery (qmigrate adopt) may still finish it.
	PostcopyPaused LostState = "postcopy_paused"
)

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

// RollbackStep is one step of a rollback (Result.Rollback).
type RollbackStep struct {
	Name string // what the step undoes: "source: restore capabilities", "destination: remove migration socket", ...
	Side Side   // the QEMU it acts on; "" when not one in particular
	Did  string // what it did; "" when there was nothing to do, or it failed
	Err  error  // why it failed or was not attempted (wraps ErrUnresponsive for a silent QEMU); nil when it ran
}

// Error is a failed step of a migration: in which phase, on which side, what
// the engine was doing, and the cause (often a *qmp.Error with QEMU's text).
type Error struct {
	Phase Phase
	Side  Side // "" when the step is not tied to one side
	Op    string
	// Check says which check of prepare refused the migration, for an
	// Error that wraps ErrBadInput ("" otherwise): what a manager acts on
	// (retry the connection, start the destination again, fix its RAM).
	Check Check
	Err   error
}

// Check names what prepare found wrong (Error.Check). Nothing has changed
// on either QEMU when prepare refuses a migration.
type Check string

// The checks of prepare.
const (
	CheckConnect  Check = "connect"   // no QMP connection: wrong address, nothing listening, no greeting, client closed
	CheckInspect  Check = "inspect"   // a QEMU refused, or did not answer, a query prepare reads it with
	CheckRunState Check = "run-state" // a QEMU in the wrong run state, or already migrating or listening
	CheckMultifd  Check = "multifd"   // multifd cannot work between these two (their -uuid differ)
	CheckFeatures Check = "features"  // a capability or command the migration needs is missing
	CheckStorage  Check = "storage"   // the disks cannot be migrated as asked (storage preflight)
	CheckTLS      Check = "tls"       // a QEMU cannot load the TLS credentials
	// CheckPreflight: one or more checks of package preflight failed (the
	// guest-visible CPU, vCPU topology, devices and PCI addresses, disks,
	// migration blockers, RAM size, machine type): the Error wraps a
	// *preflight.Error (errors.As) whose Checks name every failed check
	// (preflight.MachineType, preflight.CPUFeatures, ...) and whose message
	// gives one line per check. Also a QEMU that preflight could not read
	// (a *preflight.SideError).
	CheckPreflight Check = "preflight"
)

// Checks that prepare no longer returns: preflight's ram-size and
// machine-type report these differences, with the others, under
// CheckPreflight (errors.As the error to a *preflight.Error and look for
// preflight.RAMSize or preflight.MachineType in its Checks).
const (
	// Deprecated: a RAM size mismatch is CheckPreflight with preflight.RAMSize.
	CheckRAM Check = "ram"
	// Deprecated: a machine type mismatch is CheckPreflight with
	// preflight.MachineType.
	CheckMachine Check = "machine"
)

// CheckOf returns the check that refused a migration (Error.Check), or ""
// when err is not a refusal of prepare.
func CheckOf(err error) Check {
	var e *Error
	if errors.As(err, &e) {
		return e.Check
	}
	return ""
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
	// waiting in inmigrate with -incoming defer, source not running, a failed
	// preflight check (RAM size, machine type, CPU, devices, disks,
	// blockers: every one at once, CheckPreflight), uuid mismatch with
	// multifd, a missing capability, blockmirror.ErrPreflight.
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

	// ErrDestinationGone: the destination QEMU went away (its QMP
	// connection ended: the process exited or was killed) during the
	// migration. With ErrMigrationFailed when that failed the migration,
	// as opposed to a migration QEMU reported failed while both QEMUs
	// stayed up.
	ErrDestinationGone = errors.New("destination QEMU went away")

	// ErrSourceGone: the source QEMU went away during the migration.
	ErrSourceGone = errors.New("source QEMU went away")

	// ErrPostcopyFailed: a failure after postcopy started. There is no
	// rollback from postcopy; the guest state lives on both sides.
	ErrPostcopyFailed = errors.New("failure during postcopy: no rollback possible")

	// ErrGuestLost: the destination QEMU went away in postcopy: the guest,
	// which ran there, is lost; the source keeps a stale, paused copy that
	// is never resumed. With ErrPostcopyFailed and ErrDestinationGone;
	// Result.Lost is GuestLost.
	ErrGuestLost = errors.New("guest lost: the destination QEMU, where the guest ran in postcopy, went away; the source holds only a stale copy, left paused")

	// ErrPagesLost: the source QEMU went away in postcopy: the guest's
	// pages not yet on the destination are lost; the destination holds
	// the guest, stalled on them. With ErrPostcopyFailed and
	// ErrSourceGone; Result.Lost is PagesLost.
	ErrPagesLost = errors.New("guest's missing pages lost: the source QEMU went away in postcopy; the destination holds the guest, stalled on the pages it had not received")

	// ErrRecoveryFailed: postcopy's link was lost and no recovery
	// succeeded within Config.RecoveryTimeout. Both QEMUs are alive, left
	// in postcopy-paused: the destination holds the guest, the source its
	// missing pages. With ErrPostcopyFailed; Result.Lost is PostcopyPaused.
	ErrRecoveryFailed = errors.New("postcopy recovery failed: both QEMUs left in postcopy-paused, the destination holding the guest and the source its missing pages")
)
