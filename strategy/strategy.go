package strategy

import (
	"fmt"
	"strings"
	"time"
)

// Action is what a Decision asks the engine to do.
type Action string

// The actions a Machine can decide.
const (
	Wait Action = "wait"
	// SetDowntime: migrate-set-parameters downtime-limit =
	// Decision.DowntimeLimit (never above Limits.MaxDowntime).
	SetDowntime Action = "set-downtime"
	// SetThrottle: migrate-set-parameters cpu-throttle-initial, -increment,
	// max-cpu-throttle, cpu-throttle-tailslow, and throttle-trigger-threshold
	// when non-zero, from Decision.Throttle. The values are always within
	// QEMU's ranges (initial and increment 1..99, initial ≤ max ≤ 99). QEMU
	// applies a throttle only at its next auto-converge trigger; the Machine
	// watches Sample.ThrottlePercent for it.
	SetThrottle   Action = "set-throttle"
	StartPostcopy Action = "start-postcopy" // migrate-start-postcopy
	// PauseSource: stop on the source; the migration then finishes as
	// stop-and-copy, and later samples carry SourcePaused.
	PauseSource Action = "pause"
	// Abort: migrate_cancel and roll back; the guest keeps running on the
	// source. Done is true from then on.
	Abort Action = "abort"
	// MirrorWriteBlocking switches the disk mirrors to write-blocking copy
	// mode (block-job-change): guest writes then complete only once they
	// reached the destination, so a mirror converges under any write load.
	// Decided at most once, only while the disks are mirrored and not yet
	// switched over (a Mirroring sample, or an "active" one with no postcopy
	// or pause under way) and only when Storage.CanSwitch says the source can;
	// in the mirror phase also when Storage.CanRestart says it can restart
	// them in that mode (a full re-copy).
	MirrorWriteBlocking Action = "write-blocking"
)

// Sample is one observation of the migration, built by the engine from query-migrate.
// All fields are data: the Machine never reads a clock.
type Sample struct {
	Elapsed          time.Duration // since the migration started: the engine's Migrate call, storage mirroring included
	Status           string        // QEMU MigrationStatus: setup, active, postcopy-active, pre-switchover, device, completed, failed, cancelled, ... (unknown = non-terminal); "" in the mirror phase
	Iteration        uint64        // ram.dirty-sync-count
	RemainingBytes   uint64
	TransferredBytes uint64
	TotalBytes       uint64  // guest RAM size
	DirtyRate        float64 // bytes/s (dirty-pages-rate × page-size)
	// GuestDirtyRate is the guest's own dirty rate measured apart from the
	// migration's bitmap (calc-dirty-rate, page sampling, when Setup asked
	// for it), bytes/s; 0 = not measured. It counts the distinct sampled pages
	// written during a short period (200 ms where QEMU takes milliseconds,
	// else 1 s), so it too is bounded, by the working set / period, but far
	// above the link, where DirtyRate saturates at about the throughput.
	GuestDirtyRate float64
	// GuestDirtyPeriod is the period GuestDirtyRate was measured over (0 =
	// unknown). A measurement whose rate × period is about the whole working
	// set (the dirty set of a pass) is only a lower bound.
	GuestDirtyPeriod time.Duration
	Throughput       float64       // bytes/s measured by QEMU (mbps)
	ExpectedDowntime time.Duration // QEMU's expected-downtime
	ThrottlePercent  int           // cpu-throttle-percentage currently applied
	DowntimeLimit    time.Duration // currently configured limit
	SourcePaused     bool          // source vCPUs stopped by a PauseSource decision
	StorageRemaining uint64        // disk bytes still to mirror (0 when no storage migration)
	StorageTotal     uint64        // disk bytes to mirror (grows while the guest writes)
	// Mirroring marks the mirror phase: the disk mirrors run and RAM
	// migration has not started yet (the engine waits for every mirror to be
	// READY). Status is "" and the RAM fields are zero then; only Elapsed,
	// DowntimeLimit and the Storage fields carry data.
	Mirroring bool
}

// Storage describes the disk migration of a Machine's migration. The engine
// passes it to SetStorage before it calls Setup; without it the Machine
// assumes no disks are mirrored.
//
// While the engine waits for the mirrors to be READY, before RAM migration
// starts (the mirror phase), it Steps samples with Mirroring set (see
// Sample.Mirroring); after that, the usual query-migrate samples, which
// still carry the storage fields. Elapsed counts from the start of the whole
// migration, so the budget includes the time spent mirroring. In the mirror
// phase a Decision is only Wait, MirrorWriteBlocking or Abort, and the
// budget's finishing decision is always Abort (there is no RAM migration to
// finish).
type Storage struct {
	Disks     bool // disks are mirrored (a storage migration)
	CanSwitch bool // the source can switch running mirrors to write-blocking (block-job-change, QEMU 8.2+)
	// CanRestart: without CanSwitch, the source can still restart the
	// mirrors in write-blocking mode (cancel, then blockdev-mirror again:
	// a full re-copy). Only in the mirror phase, before READY: once RAM
	// migration runs, a restart would throw the READY mirrors away.
	CanRestart    bool
	WriteBlocking bool // the mirrors start in write-blocking mode (the user asked): nothing to switch
}

// Throttle holds the auto-converge parameters of migrate-set-parameters.
type Throttle struct {
	Initial, Increment, Max int // cpu-throttle-initial / -increment / max-cpu-throttle (%)
	TriggerThreshold        int // throttle-trigger-threshold, 0 = leave
	Tailslow                bool
}

// DefaultThrottle is QEMU's own throttle (cpu-throttle-initial 20 %,
// -increment 10 %, max-cpu-throttle 99 %, throttle-trigger-threshold 50 %,
// no tailslow): what Setup gives a policy that permits throttling with
// QEMU's rule, so that the engine writes it rather than inherit an earlier
// user's values.
var DefaultThrottle = Throttle{Initial: 20, Increment: 10, Max: 99, TriggerThreshold: 50}

// Decision is the output of one Step.
type Decision struct {
	Action        Action
	DowntimeLimit time.Duration // for SetDowntime
	Throttle      Throttle      // for SetThrottle
	// Summary is the decision in words, for a person: what, and why in one
	// clause ("throttle 95%: the guest rewrites its 99 MiB faster than the
	// link carries it"). Never empty. An Abort's Remedy is not in it: Text
	// adds it.
	Summary string
	// Reason is the arithmetic behind the decision, with its numbers (for
	// logs, --json and -v).
	Reason string
	// Remedy, on an Abort only, is what the Machine's model says would have
	// finished the migration (nil on other decisions).
	Remedy *Remedy
	At     time.Duration // Sample.Elapsed when decided
}

// Text is the Summary followed, on an Abort, by the Remedy in words.
func (d Decision) Text() string {
	if d.Remedy != nil {
		if r := d.Remedy.String(); r != "" {
			return d.Summary + "; " + r
		}
	}
	return d.Summary
}

// Remedy says what would have finished an aborted migration, computed from
// the policy's model of it (auto's: the dirty set, throughput and rates it
// measured), never guessed. The zero value means nothing the Machine knows
// of would (a link that made no progress).
type Remedy struct {
	Postcopy bool // permitting postcopy (Limits.AllowPostcopy) would finish it: about one pass of the working set
	Pause    bool // permitting a pause (Limits.AllowPause) would finish it, as a stop-and-copy
	Throttle bool // permitting CPU throttling (Limits.NoThrottle off) would let auto make it converge
	// WriteBlocking: permitting write-blocking mirrors (Limits.NoWriteBlocking
	// off) would let disk mirrors that never get READY converge.
	WriteBlocking bool
	// MaxDowntime, when non-zero, is the smallest Limits.MaxDowntime (to
	// 100 ms) under which auto would let QEMU switch over now: the typical
	// dirty set at the measured throughput, with the Margin and the headroom.
	MaxDowntime time.Duration
	// Bandwidth, when non-zero, is the throughput (bytes/s) at which the
	// typical dirty set fits the current maximum downtime (with the Margin
	// and the headroom): a link (or a max-bandwidth) at least this fast
	// would switch over at the next pass.
	Bandwidth float64
}

// None reports whether the Remedy names nothing.
func (r Remedy) None() bool { return r == Remedy{} }

// String is the Remedy in words, without flag names: "would complete with
// postcopy permitted, or with a maximum downtime of 1.6s" ("" for none).
func (r Remedy) String() string {
	var alts []string
	if r.Postcopy {
		alts = append(alts, "postcopy permitted")
	}
	if r.MaxDowntime > 0 {
		alts = append(alts, fmt.Sprintf("a maximum downtime of %v", r.MaxDowntime))
	}
	if r.Throttle {
		alts = append(alts, "CPU throttling permitted")
	}
	if r.Bandwidth > 0 {
		alts = append(alts, fmt.Sprintf("a link of %s/s", bytesStr(r.Bandwidth)))
	}
	if r.Pause {
		alts = append(alts, "a pause permitted (stop-and-copy)")
	}
	if r.WriteBlocking {
		alts = append(alts, "write-blocking mirrors permitted")
	}
	if len(alts) == 0 {
		return ""
	}
	return "would complete with " + strings.Join(alts, ", or with ")
}

// Limits are the user's hard limits. Every policy obeys them.
type Limits struct {
	MaxDowntime     time.Duration // hard ceiling for any downtime limit set; 0 = 300ms
	Budget          time.Duration // whole-migration budget; 0 = none (policy defaults apply)
	ProgressTimeout time.Duration // abort if no progress this long; 0 = policy default
	NoThrottle      bool          // user refused CPU throttling (permitted by default)
	AllowPostcopy   bool
	AllowPause      bool
	// NoWriteBlocking: the user refused write-blocking mirrors (their cost is
	// guest write latency); no policy decides MirrorWriteBlocking.
	NoWriteBlocking bool
}

// DefaultMaxDowntime is the downtime ceiling when Limits.MaxDowntime is zero (QEMU's default downtime-limit).
const DefaultMaxDowntime = 300 * time.Millisecond

// QEMUMaxDowntime is the largest downtime-limit QEMU accepts (2000 s).
const QEMUMaxDowntime = 2000 * time.Second

// Setup is what the engine must configure before it starts the migration:
// migrate-set-parameters downtime-limit (when non-zero) and the throttle
// parameters (when non-nil); the auto-converge capability when AutoConverge;
// postcopy-ram, on both sides, when Postcopy. It already obeys the Limits.
type Setup struct {
	DowntimeLimit time.Duration // to set before migrate starts (0 = leave QEMU's)
	AutoConverge  bool          // enable the auto-converge capability up front (policy may throttle AND user permits)
	Postcopy      bool          // enable postcopy-ram up front (policy may use it AND user permits)
	Throttle      *Throttle     // initial throttle parameters to set before start (nil = leave QEMU's)
	// MeasureDirtyRate asks the engine to measure the guest's dirty rate
	// apart from the migration (Sample.GuestDirtyRate) once it starts.
	MeasureDirtyRate bool
}

// Policy names.
const (
	PolicyAuto     = "auto"
	PolicyQEMU     = "qemu"
	PolicyKubeVirt = "kubevirt"
	PolicyNova     = "nova"
	PolicyProxmox  = "proxmox"
)

// Policies returns the valid policy names, the default first.
func Policies() []string {
	return []string{PolicyAuto, PolicyQEMU, PolicyKubeVirt, PolicyNova, PolicyProxmox}
}
