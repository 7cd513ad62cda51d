package engine

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/qmigrate/qmigrate/qmp"
)

// The TLS credentials of a migration (Config.TLS) live in one object per
// QEMU, the same id on both: the client end on the source, the server end
// on the destination. addTLS creates them in prepare, before the mirrors
// (their NBD connections use them) and before the parameters that name
// them; dropTLS removes them, from the rollback or once the migration
// completed.

// addTLS creates the credentials objects on both sides, concurrently, and
// pushes the removal of each one created. A QEMU that refuses its object
// (a file missing or unreadable on its host, a certificate its sanity
// checks reject) is bad input: the rollback removes the other side's.
func (r *run) addTLS(ctx context.Context) error {
	t := r.cfg.TLS
	if t == nil {
		return nil
	}
	r.tlsID = tlsID(r.token)
	sides := [2]Side{SideSource, SideDestination}
	objs := [2]map[string]any{t.SourceObject(r.tlsID), t.DestinationObject(r.tlsID)}
	var errs [2]error
	var wg sync.WaitGroup
	for i, side := range sides {
		wg.Go(func() {
			c := r.client(side)
			r.log.Debug("add TLS credentials", "side", side, "object", objs[i])
			errs[i] = r.do(ctx, side, "object-add", func(ctx context.Context) error { return c.Execute(ctx, "object-add", objs[i], nil) })
		})
	}
	wg.Wait()
	for i, side := range sides {
		if errs[i] == nil {
			r.pushUndo(side, string(side)+": remove TLS credentials", func(ctx context.Context) (string, error) { return r.dropTLS(ctx, side) })
		}
	}
	for i, side := range sides {
		err := errs[i]
		if err == nil {
			continue
		}
		if isQMPError(err) && ctx.Err() == nil {
			return r.badInput(CheckTLS, side, "object-add "+fmt.Sprint(objs[i]["qom-type"]),
				fmt.Errorf("the %s QEMU refused the TLS credentials in %s: %w", side, objs[i]["dir"], err))
		}
		return r.callErr(ctx, side, "object-add", err)
	}
	return nil
}

// dropTLS points side's TLS parameters back to what they were (when
// configure set them) and deletes its credentials object. A QEMU that is
// gone took its object with it.
func (r *run) dropTLS(ctx context.Context, side Side) (string, error) {
	c := r.client(side)
	if c.Err() != nil {
		return "", nil
	}
	if restore := r.tlsRestore[side]; restore != (qmp.MigrationParameters{}) {
		if err := r.do(ctx, side, "migrate-set-parameters", func(ctx context.Context) error { return c.MigrateSetParameters(ctx, restore) }); err != nil {
			if errors.Is(err, qmp.ErrClosed) {
				return "", nil // it exited meanwhile (a failed incoming migration)
			}
			if !isQMPError(err) {
				return "", err
			}
			// The object goes all the same: a parameter naming a missing
			// object fails the next migration that uses it, clearly.
			r.log.Debug("TLS parameters not restored", "side", side, "err", err)
		}
	}
	if err := r.do(ctx, side, "object-del", func(ctx context.Context) error {
		return c.Execute(ctx, "object-del", map[string]string{"id": r.tlsID}, nil)
	}); err != nil {
		if errors.Is(err, qmp.ErrClosed) {
			return "", nil
		}
		return "", fmt.Errorf("object-del %s: %w", r.tlsID, err)
	}
	return fmt.Sprintf("%s: TLS credentials %s removed", side, r.tlsID), nil
}

// finishTLS removes the credentials from both sides once the migration
// completed. A failure does not undo the migration; it is reported in
// Result.UndoErrors.
func (r *run) finishTLS(ctx context.Context) {
	if r.tlsID == "" {
		return
	}
	var errs [2]error
	var wg sync.WaitGroup
	for i, side := range [2]Side{SideSource, SideDestination} {
		wg.Go(func() { _, errs[i] = r.dropTLS(ctx, side) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			r.res.UndoErrors = append(r.res.UndoErrors, fmt.Sprintf("%s: TLS clean-up: %v", [2]Side{SideSource, SideDestination}[i], err))
		}
	}
}

// tlsParameters adds the TLS parameters to what configure sets on each
// side: with Config.TLS the credentials object and the host name on the
// source, the object and the authorization on the destination; without
// it, a tls-creds an earlier run left set is cleared (QEMU would
// otherwise try TLS with whatever object it names).
func (r *run) tlsParameters(sp, dp *qmp.MigrationParameters, sprev, dprev *qmp.MigrationParameters) {
	if t := r.cfg.TLS; t != nil {
		sp.TLSCreds, sp.TLSHostname = qmp.Ptr(r.tlsID), qmp.Ptr(t.Hostname)
		dp.TLSCreds = qmp.Ptr(r.tlsID)
		if t.Authz != "" {
			// Only when asked for: QEMU 7.2 takes an empty tls-authz for
			// the id of an authorization object, finds none and refuses
			// every x509 client; and an authorization the destination's
			// manager set is left in force.
			dp.TLSAuthz = qmp.Ptr(t.Authz)
		}
		// What dropTLS sets back: the TLS part of each side's restoration.
		r.tlsRestore = map[Side]qmp.MigrationParameters{
			SideSource:      tlsPart(restoreParams(*sp, sprev)),
			SideDestination: tlsPart(restoreParams(*dp, dprev)),
		}
		return
	}
	for _, p := range []struct{ set, prev *qmp.MigrationParameters }{{sp, sprev}, {dp, dprev}} {
		if p.prev != nil && p.prev.TLSCreds != nil && *p.prev.TLSCreds != "" {
			p.set.TLSCreds = qmp.Ptr("")
		}
	}
}

// tlsPart is p's TLS parameters alone.
func tlsPart(p qmp.MigrationParameters) qmp.MigrationParameters {
	return qmp.MigrationParameters{TLSCreds: p.TLSCreds, TLSHostname: p.TLSHostname, TLSAuthz: p.TLSAuthz}
}

func orEmpty(s *string) *string {
	if s == nil {
		return qmp.Ptr("")
	}
	return qmp.Ptr(*s)
}

// tlsHint explains a TLS migration that failed on the source with a
// connection error before anything was sent: a destination that refuses
// the source's certificate (another CA, its tls-authz) closes the
// connection, and QEMU puts the reason only in the destination's log.
func (r *run) tlsHint(info *qmp.MigrationInfo) string {
	if r.cfg.TLS == nil || (info.RAM != nil && info.RAM.Transferred > 0) {
		return ""
	}
	d := info.ErrorDesc
	for _, s := range []string{"TLS channel", "Connection reset by peer", "Broken pipe"} {
		if strings.Contains(d, s) {
			return " (over TLS: a destination that refuses the source's credentials, or its tls-authz, closes the connection and gives its reason only in the destination QEMU's log)"
		}
	}
	return ""
}

// tlsID is the id of a migration's TLS credentials objects.
func tlsID(token string) string { return ownPrefix + "tls-" + token }
