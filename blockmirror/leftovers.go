package blockmirror

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// Prefixes of what a Session creates on the QEMUs: every id and node name
// starts with OwnPrefix, so that a process that did not start the session
// (one adopting a migration after the first died) recognises them and
// touches nothing else.
const (
	OwnPrefix    = "qmigrate-"
	jobPrefix    = OwnPrefix + "mirror-"
	nbdPrefix    = OwnPrefix + "nbd-"
	exportPrefix = OwnPrefix + "export-"
)

// Leftovers is what a session left on the two QEMUs, found by its prefix.
type Leftovers struct {
	Jobs     []string // mirror jobs on the source
	NBDNodes []string // NBD client nodes on the source
	Exports  []string // exports on the destination
	// OtherExports counts the destination's exports that are not
	// qmigrate's: the NBD server is left running for them.
	OtherExports int
}

// Empty reports whether nothing was found.
func (l Leftovers) Empty() bool {
	return len(l.Jobs) == 0 && len(l.NBDNodes) == 0 && len(l.Exports) == 0
}

// FindLeftovers lists what sessions left on src and dst (either may be
// nil: not looked at).
func FindLeftovers(ctx context.Context, src, dst *qmp.Client) (Leftovers, error) {
	var l Leftovers
	if src != nil && src.Err() == nil {
		jobs, err := src.QueryBlockJobs(ctx)
		if err != nil {
			return l, fmt.Errorf("blockmirror: source query-block-jobs: %w", err)
		}
		for _, j := range jobs {
			if strings.HasPrefix(j.Device, jobPrefix) {
				l.Jobs = append(l.Jobs, j.Device)
			}
		}
		nodes, err := src.QueryNamedBlockNodes(ctx)
		if err != nil {
			return l, fmt.Errorf("blockmirror: source query-named-block-nodes: %w", err)
		}
		for _, n := range nodes {
			if strings.HasPrefix(n.NodeName, nbdPrefix) {
				l.NBDNodes = append(l.NBDNodes, n.NodeName)
			}
		}
	}
	if dst != nil && dst.Err() == nil {
		exps, err := dst.QueryBlockExports(ctx)
		if err != nil {
			return l, fmt.Errorf("blockmirror: destination query-block-exports: %w", err)
		}
		for _, e := range exps {
			if strings.HasPrefix(e.ID, exportPrefix) {
				l.Exports = append(l.Exports, e.ID)
			} else {
				l.OtherExports++
			}
		}
	}
	return l, nil
}

// RemoveLeftovers removes what FindLeftovers found: the source's mirror
// jobs are force-cancelled (the source's disks stay as they are: a mirror
// only reads them) and their NBD nodes deleted; the destination's exports
// are deleted, and its NBD server stopped when no export of someone else's
// remains. It returns what it did, one line each.
func RemoveLeftovers(ctx context.Context, src, dst *qmp.Client, l Leftovers) ([]string, error) {
	var did []string
	var errs []error
	for _, id := range l.Jobs {
		if err := src.BlockJobCancel(ctx, id, true); err != nil && !isMissing(err) {
			errs = append(errs, fmt.Errorf("blockmirror: source block-job-cancel %s: %w", id, err))
			continue
		}
		did = append(did, "source: mirror job "+id+" cancelled")
	}
	if len(l.Jobs) > 0 {
		if err := waitGone(ctx, "source mirror jobs", jobIDs(src), l.Jobs, nil); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range l.NBDNodes {
		if err := src.BlockdevDel(ctx, n); err != nil && !isMissing(err) {
			errs = append(errs, fmt.Errorf("blockmirror: source blockdev-del %s: %w", n, err))
			continue
		}
		did = append(did, "source: NBD node "+n+" deleted")
	}
	for _, id := range l.Exports {
		if err := dst.BlockExportDel(ctx, id, "hard"); err != nil && !isMissing(err) {
			errs = append(errs, fmt.Errorf("blockmirror: destination block-export-del %s: %w", id, err))
			continue
		}
		did = append(did, "destination: export "+id+" deleted")
	}
	if len(l.Exports) > 0 && l.OtherExports == 0 && len(errs) == 0 {
		if err := dst.NBDServerStop(ctx); err != nil && !isMissing(err) {
			errs = append(errs, fmt.Errorf("blockmirror: destination nbd-server-stop: %w", err))
		} else {
			did = append(did, "destination: NBD server stopped")
		}
	}
	return did, errors.Join(errs...)
}

// isMissing: QEMU refused because the thing is not there (any QMP error
// here: a cancelled job, a deleted node or export, no NBD server).
func isMissing(err error) bool {
	var qe *qmp.Error
	return errors.As(err, &qe)
}

// waitGone polls list every 20 ms (and at every event on wake, when not
// nil) until none of ids is in it.
func waitGone(ctx context.Context, what string, list func(context.Context) ([]string, error), ids []string, wake <-chan qmp.Event) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		now, err := list(ctx)
		if err != nil {
			return fmt.Errorf("blockmirror: %s: %w", what, err)
		}
		left := 0
		for _, id := range now {
			if slices.Contains(ids, id) {
				left++
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("blockmirror: %d %s still there: %w", left, what, ctx.Err())
		case <-wake:
		case <-t.C:
		}
	}
}

// jobIDs lists the ids of c's block jobs.
func jobIDs(c *qmp.Client) func(context.Context) ([]string, error) {
	return func(ctx context.Context) ([]string, error) {
		jobs, err := c.QueryBlockJobs(ctx)
		ids := make([]string, 0, len(jobs))
		for _, j := range jobs {
			ids = append(ids, j.Device)
		}
		return ids, err
	}
}

// exportIDs lists the ids of c's block exports.
func exportIDs(c *qmp.Client) func(context.Context) ([]string, error) {
	return func(ctx context.Context) ([]string, error) {
		exps, err := c.QueryBlockExports(ctx)
		ids := make([]string, 0, len(exps))
		for _, e := range exps {
			ids = append(ids, e.ID)
		}
		return ids, err
	}
}
