package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
)

// InspectConfig names the QEMUs Inspect reads.
type InspectConfig struct {
	Source Endpoint
	// Destination is optional: the zero Endpoint is not read.
	Destination Endpoint
	// ConnectTimeout bounds connecting and every answer
	// (DefaultConnectTimeout when 0).
	ConnectTimeout time.Duration
}

// Status is what Inspect read: each QEMU's state and what qmigrate left on
// it.
type Status struct {
	Source      SideStatus
	Destination *SideStatus // nil when not asked for
	// Storage are the block jobs, NBD client nodes (source) and exports
	// (destination) that carry qmigrate's prefix.
	Storage blockmirror.Leftovers
}

// SideStatus is one QEMU's state.
type SideStatus struct {
	Side         Side
	RunState     string                   // query-status
	Migration    *qmp.MigrationInfo       // query-migrate
	Capabilities map[string]bool          // query-migrate-capabilities
	Parameters   *qmp.MigrationParameters // query-migrate-parameters
	// Objects are the ids of the objects qmigrate created (the qmigrate-
	// prefix): journals, TLS credentials.
	Objects []string
	// Journals are the journals among Objects, read back (normally none
	// or one).
	Journals []JournalInfo
}

// JournalInfo is a journal qmigrate keeps on a QEMU while a migration is
// in flight: what it found there before it changed anything.
type JournalInfo struct {
	ID      string    // the object's id, qmigrate-journal-TOKEN
	Token   string    // the migration's token, in the id of each of its objects
	Started time.Time // when the migration that wrote it began
	// SourceRunning: the source's guest ran when the migration began
	// (source journal only).
	SourceRunning bool
	TLS, Storage  bool // the migration was to use TLS, to mirror disks
	Capabilities  map[string]bool
	Parameters    *qmp.MigrationParameters
}

// Inspect reads the source (and the destination when given) without
// changing anything: only query-* commands, qom-list and qom-get. A QEMU
// that cannot be connected to is an *Error wrapping a *ConnectError and
// ErrBadInput (Check CheckConnect); a query that fails is ErrBadInput with
// Check CheckInspect.
func Inspect(ctx context.Context, cfg InspectConfig) (*Status, error) {
	r := &run{cfg: Config{ConnectTimeout: cfg.ConnectTimeout}, log: Config{}.logger(), t0: time.Now(), phase: PhasePrepare}
	eps := []struct {
		side Side
		ep   Endpoint
	}{{SideSource, cfg.Source}}
	if cfg.Destination != (Endpoint{}) {
		eps = append(eps, struct {
			side Side
			ep   Endpoint
		}{SideDestination, cfg.Destination})
	}
	clients := make([]*qmp.Client, len(eps))
	errs := make([]error, len(eps))
	var wg sync.WaitGroup
	for i, e := range eps {
		wg.Go(func() { clients[i], errs[i] = r.connect(ctx, e.side, e.ep) })
	}
	wg.Wait()
	for i, c := range clients {
		if c != nil && eps[i].ep.Client == nil {
			defer c.Close()
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err // one *Error per side that failed
	}
	qctx, cancel := context.WithTimeout(ctx, r.answerTimeout())
	defer cancel()
	st := &Status{}
	for i, e := range eps {
		s, err := inspectSide(qctx, e.side, clients[i])
		if err != nil {
			if ctx.Err() != nil {
				return nil, r.cancelled(ctx, "inspect")
			}
			return nil, r.badInput(CheckInspect, e.side, "inspect", err)
		}
		if i == 0 {
			st.Source = *s
		} else {
			st.Destination = s
		}
	}
	var dst *qmp.Client
	if len(clients) > 1 {
		dst = clients[1]
	}
	l, err := blockmirror.FindLeftovers(qctx, clients[0], dst)
	if err != nil {
		if ctx.Err() != nil {
			return nil, r.cancelled(ctx, "find leftovers")
		}
		return nil, r.badInput(CheckInspect, "", "find leftovers", err)
	}
	st.Storage = l
	return st, nil
}

// inspectSide reads one QEMU.
func inspectSide(ctx context.Context, side Side, c *qmp.Client) (*SideStatus, error) {
	s := &SideStatus{Side: side}
	rs, err := c.QueryStatus(ctx)
	if err != nil {
		return nil, fmt.Errorf("query-status: %w", err)
	}
	s.RunState = rs.Status
	if s.Migration, err = c.QueryMigrate(ctx); err != nil {
		return nil, fmt.Errorf("query-migrate: %w", err)
	}
	if s.Capabilities, err = c.QueryMigrateCapabilities(ctx); err != nil {
		return nil, fmt.Errorf("query-migrate-capabilities: %w", err)
	}
	if s.Parameters, err = c.QueryMigrateParameters(ctx); err != nil {
		return nil, fmt.Errorf("query-migrate-parameters: %w", err)
	}
	if s.Objects, err = ownedObjects(ctx, c); err != nil {
		return nil, fmt.Errorf("qom-list /objects: %w", err)
	}
	js, err := readJournals(ctx, c, s.Objects)
	if err != nil {
		return nil, err
	}
	for _, j := range js {
		s.Journals = append(s.Journals, JournalInfo{ID: journalID(j.Token), Token: j.Token, Started: j.Started,
			SourceRunning: j.Running, TLS: j.TLS, Storage: j.Storage, Capabilities: j.Caps, Parameters: j.Params})
	}
	return s, nil
}
