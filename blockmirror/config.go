package blockmirror

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// Config is what the user chooses: the disks to migrate and how. The zero
// value mirrors every writable, non-shared disk to an NBD server derived
// from the migration channel's address. What the caller sets up around it
// (the QEMUs, TLS credentials, logging) is in Start's Env.
type Config struct {
	// Disks are the block nodes to mirror, by node name, device name or qdev
	// id/path. Empty selects every writable disk with a medium that is not
	// in Shared. Read-only and shared disks are never mirrored: naming one
	// here is a preflight error.
	//
	// Each disk needs on the destination a writable node of the same
	// virtual size, found by the same qdev or device name (its root node) or
	// else the same node name (see CreateTargets). Source and destination
	// may not use the same image file when the NBD address shows both QEMUs
	// on one host (a unix socket or loopback).
	Disks []string
	// NBDAddress is where the destination's NBD server listens: an absolute
	// unix socket path, or a tcp host and port (qmp.ParseAddress reads
	// "unix:/path" and "tcp:host:port"). The zero Address derives it from
	// the migration channel (Env.Migration): for tcp the same host and the
	// next free port after the migration port (49152 when that is 0 or too
	// close to 65535), for
	// unix a socket beside the migration socket. An fd: migration has no
	// address to derive from and needs it set.
	NBDAddress qmp.Address
	// CreateTargets creates missing destination images over QMP
	// (blockdev-create, same format and virtual size as the source) and adds
	// them as block nodes of the same name. The caller still adds the devices.
	CreateTargets bool
	// TargetDir is where CreateTargets puts new images on the destination
	// host: TargetDir/<basename of the source image>. "" = the source image's
	// own path (the usual layout between two hosts).
	TargetDir string
	// WriteBlocking starts every mirror in write-blocking copy mode (guest
	// writes complete only once they reached the destination), so a mirror
	// converges under any write load at the price of write latency.
	WriteBlocking bool
	// Speed limits each mirror's background copy, in bytes per second
	// (blockdev-mirror speed); 0 is unlimited. Write-blocking guest writes are
	// not limited. Change it later with qmp's BlockJobSetSpeed on Progress.Job.
	Speed uint64
	// BufSize and Granularity tune blockdev-mirror (buf-size: bytes in
	// flight, QEMU default 16 MiB; granularity: dirty-tracking unit, a power of
	// two in [512 B, 64 MiB], default the cluster size or 64 KiB). 0 = default.
	BufSize     uint64
	Granularity uint32
	// Shared are node names on storage both hosts see; they are never
	// mirrored and may not appear in Disks.
	Shared []string
	// ReconnectDelay is how long a mirror's NBD requests wait for the
	// source to reconnect after their connection broke (a reset by the
	// network or a middlebox) before the mirror fails: QEMU's NBD
	// reconnect-delay, in whole seconds (rounded up), with the requests
	// that failed retried once connected again. 0 means
	// DefaultReconnectDelay (1 s); negative fails the mirror at once,
	// QEMU's own default. The price: a destination that died is seen by
	// the mirror this much later, and while QEMU drains the NBD node
	// (Abort's blockdev-del, a mirror finishing) its main loop, monitor
	// included, waits out the delay (measured on 7.2 and 10.0: Abort after
	// a killed destination 0.25 s without, 1.25 s with 1 s, 5.26 s with
	// 5 s; with 5 s a destination killed at the pre-switchover window held
	// the source's monitor past the engine's rollback bound). A yank does
	// not reach a connection being re-established.
	ReconnectDelay time.Duration
}

// DefaultReconnectDelay is Config.ReconnectDelay's default.
const DefaultReconnectDelay = time.Second

// maxReconnectDelay bounds Config.ReconnectDelay.
const maxReconnectDelay = time.Hour

// reconnectSeconds is the reconnect-delay the NBD client nodes get (0:
// none).
func (c Config) reconnectSeconds() uint32 {
	d := c.ReconnectDelay
	switch {
	case d < 0:
		return 0
	case d == 0:
		d = DefaultReconnectDelay
	}
	return uint32((d + time.Second - 1) / time.Second)
}

// Sentinel errors. Match them with errors.Is.
var (
	// ErrPreflight wraps every error found before anything was changed on
	// either QEMU.
	ErrPreflight = errors.New("blockmirror: preflight")
	// ErrUnsupported is errors.ErrUnsupported: the QEMU lacks a command
	// (block-job-change before 8.2).
	ErrUnsupported = errors.ErrUnsupported
	// ErrMirrorFailed wraps a mirror that ended with an error, was cancelled or
	// vanished before it was finished ([*JobError] carries the details).
	ErrMirrorFailed = errors.New("blockmirror: mirror failed")
	// ErrNotReady: Finish was called on a mirror that never reached READY.
	ErrNotReady = errors.New("blockmirror: mirror not ready")
	// ErrDestinationGone: the destination QMP connection ended.
	ErrDestinationGone = errors.New("blockmirror: destination QEMU gone")
	// ErrSourceGone: the source QMP connection ended.
	ErrSourceGone = errors.New("blockmirror: source QEMU gone")
	// ErrState: a method was called in the wrong phase (Finish after Abort...).
	ErrState = errors.New("blockmirror: wrong state")
)

// JobError describes a mirror job that failed.
type JobError struct {
	Node  string // source node
	Job   string // job id
	Event string // BLOCK_JOB_ERROR, BLOCK_JOB_COMPLETED, BLOCK_JOB_CANCELLED or "" (vanished)
	Msg   string // QEMU's error text, when it gave one
}

func (e *JobError) Error() string {
	s := fmt.Sprintf("blockmirror: mirror %s of %s", e.Job, e.Node)
	switch e.Event {
	case "BLOCK_JOB_CANCELLED":
		s += " was cancelled"
	case "":
		s += " vanished"
	default:
		s += " failed (" + e.Event + ")"
	}
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

// Unwrap makes errors.Is(err, ErrMirrorFailed) true.
func (e *JobError) Unwrap() error { return ErrMirrorFailed }

// Validate checks the Config on its own (no QEMU needed). Errors wrap
// ErrPreflight.
func (c Config) Validate() error {
	seen := map[string]bool{}
	for _, d := range c.Disks {
		if d == "" {
			return fmt.Errorf("%w: empty disk name", ErrPreflight)
		}
		if seen[d] {
			return fmt.Errorf("%w: disk %q selected twice", ErrPreflight, d)
		}
		seen[d] = true
	}
	for _, s := range c.Shared {
		if s == "" {
			return fmt.Errorf("%w: empty shared node name", ErrPreflight)
		}
		if seen[s] {
			return fmt.Errorf("%w: disk %q is both selected and shared", ErrPreflight, s)
		}
	}
	if !c.NBDAddress.IsZero() {
		if err := checkNBDAddress(c.NBDAddress); err != nil {
			return err
		}
	}
	if c.ReconnectDelay > maxReconnectDelay {
		return fmt.Errorf("%w: ReconnectDelay %v is more than %v", ErrPreflight, c.ReconnectDelay, maxReconnectDelay)
	}
	if c.TargetDir != "" && !c.CreateTargets {
		return fmt.Errorf("%w: TargetDir set without CreateTargets", ErrPreflight)
	}
	if c.TargetDir != "" && !strings.HasPrefix(c.TargetDir, "/") {
		return fmt.Errorf("%w: TargetDir %q is not absolute", ErrPreflight, c.TargetDir)
	}
	return nil
}

// Env is what the caller of Start supplies around the user's Config: the
// two QEMUs, the migration channel's address and the TLS credentials it set
// up on both, and where to log.
type Env struct {
	Source, Destination QEMU
	// Migration is the address the destination listens on for the
	// migration stream, from which a zero Config.NBDAddress is derived; the
	// zero Address for a channel without one (fd:).
	Migration qmp.Address
	// TLSCreds encrypts the NBD connections with QEMU's TLS: the id of a
	// tls-creds object that exists on both QEMUs, its server end on the
	// destination (nbd-server-start) and its client end on the source (the
	// NBD client nodes), as the engine makes them for transport.TLS. ""
	// is plain NBD.
	TLSCreds string
	// TLSHostname is the name the destination's x509 certificate must
	// carry (the NBD client's tls-hostname); "" means the host of a tcp
	// NBD address. A unix NBD address with x509 credentials needs it.
	TLSHostname string
	// Logger receives progress and clean-up messages; nil discards.
	Logger *slog.Logger
}

// QEMU is one side of the mirrors: its QMP client and the features probed
// from its schema (ProbeFeatures; nil when unknown).
type QEMU struct {
	Client   *qmp.Client
	Features *qmp.Features
}

func (e Env) validate() error {
	if e.Source.Client == nil || e.Destination.Client == nil {
		return fmt.Errorf("%w: nil QMP client", ErrPreflight)
	}
	if e.TLSHostname != "" && e.TLSCreds == "" {
		return fmt.Errorf("%w: TLSHostname set without TLSCreds", ErrPreflight)
	}
	return nil
}

func (e Env) logger() *slog.Logger {
	if e.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return e.Logger
}
