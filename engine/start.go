package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
	"golang.org/x/sys/unix"
)

// start waits for the mirrors, starts the incoming side, then the migration.
func (r *run) start(ctx context.Context) error {
	if r.mirror != nil {
		r.enter(stageMirror)
		if err := r.waitMirrors(ctx); err != nil {
			return err
		}
	}
	r.enter(stageStart)
	// Subscribe before the commands that cause the events.
	r.srcSub = r.src.SubscribeNames("MIGRATION", "MIGRATION_PASS", "STOP")
	r.dstSub = r.dst.SubscribeNames("MIGRATION", "RESUME")

	if r.ch.Scheme == transport.FD {
		if err := r.passFDs(ctx); err != nil {
			return err
		}
	}
	r.dstAt = dstIncoming // from the first attempt on, the destination is not reusable
	if err := r.migrateIncoming(ctx); err != nil {
		return r.callErr(ctx, SideDestination, "migrate-incoming", err)
	}
	r.pushSocketUndo()
	ch, err := ask(r, ctx, SideDestination, "read listening port", func(c context.Context) (transport.Channel, error) {
		return resolvePort(c, r.dst, r.ch)
	})
	if err != nil {
		return r.callErr(ctx, SideDestination, "read listening port", err)
	}
	if err := r.listensAt(ch); err != nil {
		return r.errorf(SideDestination, "read listening port", err)
	}
	r.pushMigrationUndo()
	if err := r.migrate(ctx, r.migCh); err != nil {
		return r.callErr(ctx, SideSource, "migrate", err)
	}
	if r.stage == stageStart { // (a STOP seen while migrate waited for its answer moved it on)
		r.enter(stagePrecopy)
	}
	return nil
}

// listensAt records where the destination listens (ch, its port
// resolved) and so where the source connects: the same channel, or URI
// when Config.Listen differs (NAT, a proxy), its port 0 meaning the one
// the destination listens on.
func (r *run) listensAt(ch transport.Channel) error {
	r.listen, r.migCh = ch, ch
	if r.cfg.Listen == "" {
		return nil
	}
	uri, err := r.uri.WithPort(&qmp.MigrationInfo{SocketAddress: []qmp.SocketAddress{ch.SocketAddress()}})
	if err != nil {
		return err
	}
	r.migCh = uri
	return nil
}

// pushSocketUndo pushes the removal of a unix migration socket the
// destination listened on. A destination whose incoming migration failed
// exits (exit-on-error, sent as true, QEMU's default, where the destination
// takes it), leaving the socket file behind; one whose migration never
// connected stays in inmigrate with its listener (not reusable, left to its
// owner), and its socket is left to it. The engine holds no listener of its
// own.
func (r *run) pushSocketUndo() {
	if r.ch.Scheme == transport.Unix {
		r.pushUndo("", "destination: remove migration socket", func(ctx context.Context) (string, error) {
			// After a cancel the destination exits (exit-on-error); give it
			// a moment, then remove the socket it leaves behind. One that
			// completed its incoming migration as the cancel landed stays,
			// no longer listening. One that does not answer is left alone.
			if r.silent.isMute(SideDestination) {
				return "", nil
			}
			if r.dstAt != dstKept {
				t := time.NewTimer(2 * time.Second)
				defer t.Stop()
				select {
				case <-r.dst.Done():
				case <-t.C:
					return "", nil // still there and listening: the destination owns it
				case <-ctx.Done():
					return "", nil
				}
			}
			if err := transport.RemoveSocket(r.ch); err != nil {
				return "", err
			}
			return "destination: removed migration socket " + r.ch.Path, nil
		})
	}
}

// pushMigrationUndo pushes what undoes a started migration: the source
// must end up running again after any rollback; then the migration must be
// cancelled first (undo runs in reverse).
func (r *run) pushMigrationUndo() {
	r.pushUndo(SideSource, "source: resume guest", r.undoResumeSource)
	// Not skipped when the source stopped answering: it then cuts the
	// stream from the destination's side.
	r.pushUndo("", "source: cancel migration", r.undoCancel)
}

// migrateIncoming runs migrate-incoming in the destination's form, newest
// first: where QEMU refuses an argument of that form with QAPI's exact
// error (the command did not run), it retries in the older form
// (transport.Form.Fallback) and keeps the form that worked. exit-on-error
// is sent as true, QEMU's default, where the destination takes it.
func (r *run) migrateIncoming(ctx context.Context) error {
	for {
		args := r.ch.IncomingArgs(r.dstForm, true)
		r.log.Debug("migrate-incoming", "channel", r.ch.String(), "channels-form", args.Channels != nil, "exit-on-error", args.ExitOnError != nil)
		err := r.do(ctx, SideDestination, "migrate-incoming", func(c context.Context) error { return r.dst.MigrateIncoming(c, args) })
		if err == nil {
			return nil
		}
		older, ok := r.dstForm.Fallback(err)
		if !ok {
			return err
		}
		r.log.Debug("migrate-incoming refused an argument: older form next", "err", err)
		r.dstForm = older
	}
}

// migrate runs migrate on the source towards ch in the source's form,
// found out the same way as migrateIncoming's (the source may be another
// QEMU version than the destination). migrate has no exit-on-error: only
// the channels form falls back.
func (r *run) migrate(ctx context.Context, ch transport.Channel) error {
	for {
		args := ch.MigrateArgs(r.srcForm)
		r.log.Debug("migrate", "channel", ch.String(), "channels-form", args.Channels != nil)
		err := r.do(ctx, SideSource, "migrate", func(c context.Context) error { return r.src.Migrate(c, args) })
		if err == nil {
			return nil
		}
		older, ok := r.srcForm.Fallback(err)
		if !ok || older.Channels == r.srcForm.Channels {
			return err
		}
		r.log.Debug("migrate refused an argument: older form next", "err", err)
		r.srcForm = older
	}
}

// waitMirrors polls the mirrors until all are READY. Each poll is a
// strategy sample of the mirror phase (Mirroring); its decisions are applied
// (MirrorWriteBlocking, Abort) and fed back. The budget's safety net holds
// here too: Elapsed counts from the start of Migrate.
func (r *run) waitMirrors(ctx context.Context) error {
	poll := r.cfg.pollInterval()
	timer := time.NewTimer(poll)
	defer timer.Stop()
	for {
		ps, err := ask(r, ctx, SideSource, "query-block-jobs", r.mirror.Progress)
		if err != nil {
			if ctx.Err() != nil {
				return r.cancelled(ctx, "wait for mirrors")
			}
			if isUnanswered(err) {
				return err
			}
			return r.mirrorErr("wait for mirrors", err)
		}
		r.diskProgress(ps)
		ready := true
		for _, p := range ps {
			ready = ready && p.Ready
		}
		if ready {
			return nil
		}
		if !r.m.Done() {
			s := r.sample(&qmp.MigrationInfo{}) // no RAM migration yet: Status "", RAM fields zero
			s.Mirroring = true
			if err := r.decide(ctx, r.m.Step(s)); err != nil {
				return err
			}
		}
		if err := r.budgetSpent(poll, " waiting for the mirrors"); err != nil {
			return err
		}
		timer.Reset(poll)
		select {
		case <-ctx.Done():
			return r.cancelled(ctx, "wait for mirrors")
		case <-r.dst.Done():
			return r.mirrorErr("wait for mirrors", fmt.Errorf("%w: %w", blockmirror.ErrDestinationGone, r.dst.Err()))
		case <-r.src.Done():
			return r.mirrorErr("wait for mirrors", fmt.Errorf("%w: %w", blockmirror.ErrSourceGone, r.src.Err()))
		case q := <-r.job.reqs:
			if err := r.serve(ctx, q); err != nil {
				return err
			}
		case <-timer.C:
		}
	}
}

// mirrorErr is the error for a failed look at the mirrors (op): a QEMU
// gone is ErrSourceGone or ErrDestinationGone, naming that side, as
// elsewhere; any other failure names no side.
func (r *run) mirrorErr(op string, err error) error {
	switch {
	case errors.Is(err, blockmirror.ErrSourceGone):
		return r.errorf(SideSource, op, fmt.Errorf("%w: %w", ErrSourceGone, err))
	case errors.Is(err, blockmirror.ErrDestinationGone):
		return r.errorf(SideDestination, op, fmt.Errorf("%w: %w", ErrDestinationGone, err))
	}
	return r.errorf("", op, err)
}

// passFDs makes a socketpair and hands one end to each QEMU (getfd). QEMU
// consumes the descriptor at migrate-incoming / migrate; the undo closes
// whatever was not consumed. The engine's own copies are closed at once.
func (r *run) passFDs(ctx context.Context) error {
	name := "qmigrate-" + randomHex(6)
	r.ch.FDName = name
	dfd, sfd, err := transport.Socketpair()
	if err != nil {
		return r.errorf("", "socketpair", err)
	}
	defer unix.Close(dfd)
	defer unix.Close(sfd)
	for _, p := range []struct {
		side Side
		fd   int
	}{{SideDestination, dfd}, {SideSource, sfd}} {
		c := r.client(p.side)
		if err := r.do(ctx, p.side, "getfd", func(ctx context.Context) error { return c.Getfd(ctx, name, p.fd) }); err != nil {
			return r.callErr(ctx, p.side, "getfd", err)
		}
		side := p.side
		r.pushUndo("", string(side)+": close migration fd", func(ctx context.Context) (string, error) {
			if c.Err() != nil {
				return "", nil // QEMU gone, and its fds with it
			}
			if err := r.do(ctx, side, "closefd", func(ctx context.Context) error { return c.Closefd(ctx, name) }); err != nil {
				var qe *qmp.Error
				if errors.As(err, &qe) {
					return "", nil // consumed by the migration: nothing to close
				}
				return "", err
			}
			return fmt.Sprintf("%s: closed unused migration fd %s", side, name), nil
		})
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (r *run) diskProgress(ps []blockmirror.Progress) {
	var done, total uint64
	for i := range ps {
		p := ps[i]
		done += p.Done
		total += p.Total
		r.emit(Event{Kind: EventDisk, Disk: &p})
	}
	r.storageDone, r.storageTotal = done, total
}
