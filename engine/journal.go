package engine

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// The journal is what qmigrate saw on a QEMU before it changed anything
// there, kept on that QEMU itself so that it outlives the process: a secret
// object (QEMU's generic holder of a string, readable back with qom-get)
// named qmigrate-journal-TOKEN whose data is the journal's JSON. Adopt
// reads it to rebuild the undo stack, so that a rollback after a manager
// died restores the real "before", not QEMU's defaults. Every object,
// export, node and job qmigrate creates carries the qmigrate- prefix and the
// migration's token (qmigrate-tls-TOKEN, qmigrate-mirror-TOKEN-..., ...):
// Adopt touches nothing else.
//
// The journal is written on both QEMUs before the first change, removed
// last by the rollback (it is the first undo step pushed) and removed once
// the migration completed.
type journal struct {
	V       int                      `json:"v"`
	Token   string                   `json:"token"`
	Side    Side                     `json:"side"`
	Started time.Time                `json:"started"`
	Running bool                     `json:"running,omitempty"` // the source's guest ran when the migration began
	Caps    map[string]bool          `json:"caps"`              // every capability, as it was
	Params  *qmp.MigrationParameters `json:"params"`            // every parameter, as it was
	TLS     bool                     `json:"tls,omitempty"`     // credentials objects qmigrate-tls-TOKEN were to be created
	Storage bool                     `json:"storage,omitempty"` // disks were to be mirrored
}

const (
	journalVersion = 1
	journalPrefix  = "qmigrate-journal-"
	// ownPrefix starts the id of everything qmigrate creates on a QEMU.
	ownPrefix = "qmigrate-"
)

func journalID(token string) string { return journalPrefix + token }

// writeJournal records both sides' state as prepare found it, on each
// QEMU, and pushes its removal (the last step of a rollback).
func (r *run) writeJournal(ctx context.Context, si, di *sideInfo) error {
	infos := map[Side]*sideInfo{SideSource: si, SideDestination: di}
	var errs [2]error
	var wg sync.WaitGroup
	for i, side := range [2]Side{SideSource, SideDestination} {
		j := journal{V: journalVersion, Token: r.token, Side: side, Started: r.t0.UTC(), Caps: infos[side].caps,
			Params: infos[side].params, TLS: r.cfg.TLS != nil, Storage: r.cfg.Storage != nil}
		if side == SideSource {
			j.Running = r.srcWasRunning
		}
		data, err := json.Marshal(j)
		if err != nil {
			return r.errorf(side, "write journal", err)
		}
		c := r.client(side)
		props := map[string]any{"format": "base64", "data": base64.StdEncoding.EncodeToString(data)}
		wg.Go(func() {
			errs[i] = r.do(ctx, side, "object-add", func(ctx context.Context) error {
				return c.ObjectAdd(ctx, "secret", journalID(r.token), props)
			})
		})
	}
	wg.Wait()
	for i, side := range [2]Side{SideSource, SideDestination} {
		if errs[i] == nil {
			// A destination that went silent is not asked (it is not
			// reusable once its incoming migration started, and Adopt
			// reads only the source's journal for the rollback).
			undoSide := side
			if side == SideDestination {
				undoSide = ""
			}
			r.pushUndo(undoSide, string(side)+": remove journal", func(ctx context.Context) (string, error) { return r.dropJournal(ctx, side) })
		}
	}
	for i, side := range [2]Side{SideSource, SideDestination} {
		if errs[i] != nil {
			return r.callErr(ctx, side, "object-add "+journalID(r.token), errs[i])
		}
	}
	return nil
}

// dropJournal removes the journal from side. A QEMU that is gone took it
// with it.
func (r *run) dropJournal(ctx context.Context, side Side) (string, error) {
	c := r.client(side)
	if c == nil || c.Err() != nil || (side == SideDestination && r.silent.isMute(side)) {
		return "", nil
	}
	id := journalID(r.token)
	if err := r.do(ctx, side, "object-del", func(ctx context.Context) error { return c.ObjectDel(ctx, id) }); err != nil {
		if errors.Is(err, qmp.ErrClosed) {
			return "", nil
		}
		return "", fmt.Errorf("object-del %s: %w", id, err)
	}
	return fmt.Sprintf("%s: journal %s removed", side, id), nil
}

// finishJournal removes both journals once the migration completed; a
// failure is reported in UndoErrors.
func (r *run) finishJournal(ctx context.Context) {
	if r.token == "" {
		return
	}
	for _, side := range [2]Side{SideSource, SideDestination} {
		if _, err := r.dropJournal(ctx, side); err != nil {
			r.res.UndoErrors = append(r.res.UndoErrors, fmt.Sprintf("%s: journal clean-up: %v", side, err))
		}
	}
}

// owned lists the ids of the objects qmigrate created on a QEMU (the
// qmigrate- prefix), sorted.
func ownedObjects(ctx context.Context, c *qmp.Client) ([]string, error) {
	props, err := c.QomList(ctx, "/objects")
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, p := range props {
		if strings.HasPrefix(p.Name, ownPrefix) && strings.HasPrefix(p.Type, "child<") {
			ids = append(ids, p.Name)
		}
	}
	sort.Strings(ids)
	return ids, nil
}

// readJournals reads the journals qmigrate left on a QEMU (normally one).
// A journal that cannot be read back is an error: its migration is not
// adopted blind.
func readJournals(ctx context.Context, c *qmp.Client, ids []string) ([]journal, error) {
	var out []journal
	for _, id := range ids {
		if !strings.HasPrefix(id, journalPrefix) {
			continue
		}
		var data string
		if err := c.QomGet(ctx, "/objects/"+id, "data", &data); err != nil {
			return nil, fmt.Errorf("qom-get %s data: %w", id, err)
		}
		raw, err := base64.StdEncoding.DecodeString(data)
		if err != nil {
			return nil, fmt.Errorf("journal %s: %w", id, err)
		}
		var j journal
		if err := json.Unmarshal(raw, &j); err != nil {
			return nil, fmt.Errorf("journal %s: %w", id, err)
		}
		if j.V != journalVersion || journalID(j.Token) != id {
			return nil, fmt.Errorf("journal %s: version %d or token %q not understood", id, j.V, j.Token)
		}
		out = append(out, j)
	}
	return out, nil
}
