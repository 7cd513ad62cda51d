package qemulab

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// DefaultMaxBandwidth is the max-bandwidth Migrate sets (64 GiB/s): QEMU's
// default of 128 MiB/s would make every migration 10-20x slower.
const DefaultMaxBandwidth = 1 << 36

// MigrateOptions configure the raw self-test driver.
type MigrateOptions struct {
	// URI the source connects to (default: a unix socket in the
	// destination's folder when Migrate is given Instances).
	URI string
	// IncomingURI the destination listens on (default: URI).
	IncomingURI string
	// MaxBandwidth in bytes/s (default DefaultMaxBandwidth).
	MaxBandwidth uint64
	// Capabilities set on both sides in addition to "events".
	Capabilities map[string]bool
	// Poll is the query-migrate period (default 50 ms).
	Poll time.Duration
	// Progress, when set, sees every query-migrate reply of the source.
	Progress func(*qmp.MigrationInfo)
}

// MigrationError is a migration that ended in a status other than completed.
type MigrationError struct {
	Status qmp.MigrationStatus
	Desc   string
}

func (e *MigrationError) Error() string {
	return fmt.Sprintf("qemulab: migration ended %s: %s", e.Status, e.Desc)
}

// Migrate runs a plain pre-copy from src to dst (an Instance started with
// Incoming) and waits for it to end. It is the lab's own minimal driver
// for self-tests, not the engine.
func Migrate(ctx context.Context, src, dst *Instance, opts MigrateOptions) (*qmp.MigrationInfo, error) {
	if opts.URI == "" {
		opts.URI = "unix:" + filepath.Join(dst.Dir(), "migrate.sock")
	}
	return MigrateQMP(ctx, src.QMP, dst.QMP, opts)
}

// MigrateQMP is Migrate over bare QMP clients; opts.URI is required.
func MigrateQMP(ctx context.Context, src, dst *qmp.Client, opts MigrateOptions) (*qmp.MigrationInfo, error) {
	if err := StartMigration(ctx, src, dst, opts); err != nil {
		return nil, err
	}
	return WaitMigration(ctx, src, opts)
}

// StartMigration sets capabilities and max-bandwidth, runs migrate-incoming
// on dst and migrate on src, and returns without waiting.
func StartMigration(ctx context.Context, src, dst *qmp.Client, opts MigrateOptions) error {
	if opts.URI == "" {
		return fmt.Errorf("qemulab: migrate: no URI")
	}
	if opts.IncomingURI == "" {
		opts.IncomingURI = opts.URI
	}
	if opts.MaxBandwidth == 0 {
		opts.MaxBandwidth = DefaultMaxBandwidth
	}
	caps := map[string]bool{"events": true}
	for k, v := range opts.Capabilities {
		caps[k] = v
	}
	for _, c := range []*qmp.Client{src, dst} {
		if err := c.MigrateSetCapabilities(ctx, caps); err != nil {
			return fmt.Errorf("qemulab: migrate: %w", err)
		}
	}
	if err := src.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: qmp.Ptr(opts.MaxBandwidth)}); err != nil {
		return fmt.Errorf("qemulab: migrate: %w", err)
	}
	if err := dst.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: opts.IncomingURI}); err != nil {
		return fmt.Errorf("qemulab: migrate: %w", err)
	}
	if err := src.Migrate(ctx, qmp.MigrateArgs{URI: opts.URI}); err != nil {
		return fmt.Errorf("qemulab: migrate: %w", err)
	}
	return nil
}

// WaitMigration polls query-migrate on src until the migration ends. It
// returns the final reply, with a *MigrationError unless it completed. A
// completed migration returns once the source's run state left
// finish-migrate: QEMU reports completed a moment before (the engine waits
// the same way, engine/complete.go).
func WaitMigration(ctx context.Context, src *qmp.Client, opts MigrateOptions) (*qmp.MigrationInfo, error) {
	poll := opts.Poll
	if poll == 0 {
		poll = 50 * time.Millisecond
	}
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		info, err := src.QueryMigrate(ctx)
		if err != nil {
			return nil, fmt.Errorf("qemulab: migrate: %w", err)
		}
		if opts.Progress != nil {
			opts.Progress(info)
		}
		switch {
		case info.Status == qmp.StatusCompleted:
			for {
				st, err := src.QueryStatus(ctx)
				if err != nil {
					return info, fmt.Errorf("qemulab: migrate: completed, then: %w", err)
				}
				if st.Status != "finish-migrate" {
					return info, nil
				}
				select {
				case <-ctx.Done():
					return info, fmt.Errorf("qemulab: migrate: completed, the source still in finish-migrate: %w", ctx.Err())
				case <-t.C:
				}
			}
		case info.Status.Terminal():
			return info, &MigrationError{Status: info.Status, Desc: info.ErrorDesc}
		}
		select {
		case <-ctx.Done():
			return info, fmt.Errorf("qemulab: migrate: waiting in status %s: %w", info.Status, ctx.Err())
		case <-t.C:
		}
	}
}

// WaitIncoming polls query-migrate on the destination until its side of the
// migration has ended. Resume a destination whose source was paused (cont)
// only after this: QEMU ignores cont while the incoming migration still runs.
func WaitIncoming(ctx context.Context, dst *qmp.Client) (*qmp.MigrationInfo, error) {
	return WaitMigration(ctx, dst, MigrateOptions{Poll: 20 * time.Millisecond})
}
