package engine

import (
	"context"
	"errors"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
)

// switchOver handles pre-switchover: finish the mirrors, then continue.
func (r *run) switchOver(ctx context.Context) error {
	r.enter(stageSwitchover)
	if r.mirror != nil {
		r.log.Debug("finishing mirrors")
		if err := r.mirror.Finish(ctx); err != nil {
			if ctx.Err() != nil {
				return r.cancelled(ctx, "finish mirrors")
			}
			if errors.Is(err, blockmirror.ErrSourceGone) || errors.Is(err, blockmirror.ErrDestinationGone) {
				return r.mirrorErr("finish mirrors", err) // naming the QEMU that went away
			}
			// The source's (a connection closed under a command is its
			// QEMU gone).
			return r.callErr(ctx, SideSource, "finish mirrors", err)
		}
	}
	r.log.Debug("migrate-continue pre-switchover")
	if err := r.do(ctx, SideSource, "migrate-continue", func(c context.Context) error {
		return r.src.MigrateContinue(c, qmp.StatusPreSwitchover)
	}); err != nil {
		return r.callErr(ctx, SideSource, "migrate-continue", err)
	}
	return nil
}
