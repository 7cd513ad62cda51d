package blockmirror

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// Progress is the state of one mirror.
type Progress struct {
	Node     string  // source node name
	Job      string  // mirror job id
	Done     uint64  // bytes copied (query-block-jobs offset)
	Total    uint64  // bytes to copy (len; grows while the guest writes)
	Rate     float64 // bytes per second since the previous sample
	Ready    bool    // READY: source and target in sync, writes mirrored
	CopyMode string  // "background" or "write-blocking"
}

// pollInterval is how often waits re-read query-block-jobs, the truth that
// events only hint at.
const pollInterval = 250 * time.Millisecond

// undoTimeout bounds the clean-up Start runs on its own failure, which must
// happen even when the caller's context is already done.
const undoTimeout = 30 * time.Second

var jobEvents = []string{"BLOCK_JOB_READY", "BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}

// Session is a set of mirrors from one source to one destination QEMU,
// created by Start and ended by Finish+Cleanup or by Abort. Its methods are
// safe for concurrent use; they serialise on a mutex, which a WaitReady or
// Finish in progress holds: cancel its context before calling Abort from
// another goroutine. None starts a goroutine, and contexts bound every
// wait. Job state comes from query-block-jobs, the BLOCK_JOB_* events only
// waking the waits; a job that vanishes without an event is a failure.
type Session struct {
	src, dst   *qmp.Client
	srcF, dstF *qmp.Features
	cfg        Config
	env        Env
	log        *slog.Logger
	token      string // random, per session
	addr       qmp.Address
	derived    bool // addr derived from the migration channel (port may be moved)

	mu            sync.Mutex
	disks         []*disk
	sub           *qmp.Subscription // source job events
	serverStarted bool
	finishing     bool
	finished      bool
	cleaned       bool
}

// Start checks the disks, exports them on the destination and starts one
// mirror per disk on the source, as cfg asks, between the QEMUs of env. Call
// it before migrate-incoming and migrate.
//
// It runs the preflight first (Config.Validate, the disk selection and the
// destination nodes; errors wrap ErrPreflight and nothing has been changed).
// Then, on the destination, nbd-server-start (a derived tcp port is moved on
// while it is taken) and one writable block-export-add per disk under an
// unguessable export name (128 bits from crypto/rand); on the source, one
// NBD client node (blockdev-add driver=nbd) and one blockdev-mirror per disk:
// sync=full, or top when the destination node already has a backing chain
// of the same depth and base name. If a step fails, Start undoes what it did
// before it returns, under a fresh 30 s bound even when ctx has ended.
func Start(ctx context.Context, cfg Config, env Env) (*Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := env.validate(); err != nil {
		return nil, err
	}
	s := &Session{src: env.Source.Client, dst: env.Destination.Client, srcF: env.Source.Features, dstF: env.Destination.Features,
		cfg: cfg, env: env, log: env.logger(), token: randomHex(4), addr: cfg.NBDAddress}
	if s.addr.IsZero() {
		var err error
		if s.addr, err = deriveNBDAddress(env.Migration, s.token); err != nil {
			return nil, err
		}
		s.derived = true
	}
	if err := s.plan(ctx); err != nil {
		return nil, err
	}
	if err := s.start(ctx); err != nil {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		defer cancel()
		if aerr := s.Abort(uctx); aerr != nil {
			return nil, errors.Join(err, fmt.Errorf("blockmirror: undo after failed start: %w", aerr))
		}
		return nil, err
	}
	return s, nil
}

func (s *Session) start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range s.disks {
		if d.create {
			if err := s.createTarget(ctx, d); err != nil {
				return err
			}
		}
	}
	if err := s.startServer(ctx); err != nil {
		return err
	}
	for _, d := range s.disks {
		if err := s.dst.BlockExportAdd(ctx, qmp.BlockExportAddArgs{ID: d.exportID, NodeName: d.dstNode, Writable: true, Name: d.export}); err != nil {
			return fmt.Errorf("blockmirror: destination export of %s: %w", d.name, err)
		}
		d.exported = true
	}
	// Every job id of this session, including those RestartWriteBlocking
	// gives the restarted mirrors, starts with this prefix.
	prefix := s.jobPrefix()
	s.sub = s.src.Subscribe(qmp.EventFilter{Names: jobEvents, Match: func(e qmp.Event) bool { return strings.HasPrefix(e.Field("device"), prefix) }})
	for _, d := range s.disks {
		node := map[string]any{"driver": "nbd", "node-name": d.nbdNode, "server": s.addr.SocketAddress(), "export": d.export}
		if rd := s.cfg.reconnectSeconds(); rd > 0 {
			node["reconnect-delay"] = rd
		}
		if s.env.TLSCreds != "" {
			node["tls-creds"] = s.env.TLSCreds
			if s.env.TLSHostname != "" {
				node["tls-hostname"] = s.env.TLSHostname
			}
		}
		if err := s.src.BlockdevAdd(ctx, node); err != nil {
			return fmt.Errorf("blockmirror: source NBD client for %s at %s: %w", d.name, s.addr, err)
		}
		d.nbdAdded = true
		args := qmp.BlockdevMirrorArgs{JobID: d.job, Device: d.node, Target: d.nbdNode, Sync: d.sync, Speed: s.cfg.Speed,
			BufSize: s.cfg.BufSize, Granularity: s.cfg.Granularity}
		if d.copyMode != "background" {
			args.CopyMode = d.copyMode
		}
		if err := s.src.BlockdevMirror(ctx, args); err != nil {
			return fmt.Errorf("blockmirror: blockdev-mirror of %s: %w", d.name, err)
		}
		d.mirroring = true
		s.log.Info("mirror started", "disk", d.name, "job", d.job, "sync", d.sync, "copy-mode", d.copyMode, "nbd", s.addr.String(), "bytes", d.size)
	}
	return nil
}

// startServer runs nbd-server-start, moving a derived TCP port on while it is
// taken.
func (s *Session) startServer(ctx context.Context) error {
	tries := 1
	if s.derived && s.addr.Network == qmp.TCP {
		tries = nbdPortTries
	}
	var err error
	for i := 0; i < tries; i++ {
		if err = s.dst.NBDServerStart(ctx, s.addr, s.env.TLSCreds); err == nil {
			s.serverStarted = true
			s.log.Debug("destination NBD server started", "addr", s.addr.String())
			return nil
		}
		var qe *qmp.Error
		if !errors.As(err, &qe) {
			break
		}
		s.addr = nextPort(s.addr)
	}
	return fmt.Errorf("blockmirror: destination nbd-server-start: %w", err)
}

// createTarget creates the destination image of d with blockdev-create and
// adds it as a node named d.dstNode.
func (s *Session) createTarget(ctx context.Context, d *disk) error {
	path := s.targetPath(d)
	fileNode := fmt.Sprintf("qmigrate-file-%s-%s", s.token, randomHex(2))
	if err := s.runCreateJob(ctx, d, map[string]any{"driver": "file", "filename": path, "size": d.size}); err != nil {
		return err
	}
	if d.format == "qcow2" {
		// The file is given inline: nodes added with blockdev-add while the
		// destination is inmigrate are inactive and refuse the writes of
		// formatting ("Permission 'write, resize' unavailable on inactive
		// node"); a node the create job opens itself is active.
		if err := s.runCreateJob(ctx, d, map[string]any{"driver": "qcow2", "file": map[string]any{"driver": "file", "filename": path}, "size": d.size}); err != nil {
			return err
		}
	}
	// discard=unmap lets the mirror's zero writes punch holes: a sparse
	// source stays sparse on the destination.
	if err := s.dst.BlockdevAdd(ctx, map[string]any{"driver": "file", "filename": path, "node-name": fileNode, "discard": "unmap"}); err != nil {
		return fmt.Errorf("blockmirror: destination blockdev-add %s: %w", path, err)
	}
	d.createdNodes = append(d.createdNodes, fileNode)
	if err := s.dst.BlockdevAdd(ctx, map[string]any{"driver": d.format, "node-name": d.dstNode, "file": fileNode, "discard": "unmap"}); err != nil {
		return fmt.Errorf("blockmirror: destination blockdev-add %s: %w", d.dstNode, err)
	}
	d.createdNodes = append(d.createdNodes, d.dstNode)
	s.log.Info("destination image created", "disk", d.name, "file", path, "format", d.format, "bytes", d.size)
	return nil
}

// runCreateJob runs one blockdev-create job on the destination to its end and
// dismisses it.
func (s *Session) runCreateJob(ctx context.Context, d *disk, opts map[string]any) error {
	id := fmt.Sprintf("qmigrate-create-%s-%s", s.token, randomHex(2))
	sub := s.dst.Subscribe(qmp.EventFilter{Names: []string{"JOB_STATUS_CHANGE"}, Match: qmp.ForDevice(id)})
	defer sub.Close()
	if err := s.dst.BlockdevCreate(ctx, id, opts); err != nil {
		return fmt.Errorf("blockmirror: destination blockdev-create for %s: %w", d.name, err)
	}
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		jobs, err := s.dst.QueryJobs(ctx)
		if err != nil {
			return fmt.Errorf("blockmirror: destination query-jobs: %w", err)
		}
		for _, j := range jobs {
			if j.ID != id || j.Status != "concluded" {
				continue
			}
			derr := s.dst.JobDismiss(ctx, id)
			if j.Error != "" {
				return fmt.Errorf("blockmirror: destination blockdev-create for %s (%v): %s", d.name, opts["driver"], j.Error)
			}
			if derr != nil {
				return fmt.Errorf("blockmirror: destination job-dismiss %s: %w", id, derr)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("blockmirror: waiting for blockdev-create: %w", ctx.Err())
		case <-sub.C:
		case <-t.C:
		}
	}
}

// drain handles the job events already received and returns how many.
// Caller holds mu.
func (s *Session) drain() int {
	if s.sub == nil {
		return 0
	}
	n := 0
	for {
		select {
		case e, ok := <-s.sub.C:
			if !ok {
				return n
			}
			s.handle(e)
			n++
		default:
			return n
		}
	}
}

// handle applies one job event. Caller holds mu.
func (s *Session) handle(e qmp.Event) {
	id := e.Field("device")
	for _, d := range s.disks {
		if d.job != id {
			continue
		}
		switch e.Name {
		case "BLOCK_JOB_READY":
			d.ready = true
		case "BLOCK_JOB_ERROR":
			if d.endErr == nil && e.Field("action") != "ignore" {
				d.endErr = &JobError{Node: d.node, Job: d.job, Event: e.Name, Msg: fmt.Sprintf("%s error, action %s", e.Field("operation"), e.Field("action"))}
			}
		case "BLOCK_JOB_COMPLETED":
			d.ended, d.mirroring = true, false
			if msg := e.Field("error"); msg != "" {
				var prev *JobError
				if errors.As(d.endErr, &prev) && prev.Event == "BLOCK_JOB_ERROR" {
					msg = prev.Msg + ": " + msg
				}
				d.endErr = &JobError{Node: d.node, Job: d.job, Event: e.Name, Msg: msg}
			} else if s.finishing && d.endErr == nil {
				d.finished = true
				var c struct{ Len, Offset uint64 }
				if e.Decode(&c) == nil {
					d.done, d.total = c.Offset, c.Len
				}
			} else if d.endErr == nil {
				d.endErr = &JobError{Node: d.node, Job: d.job, Event: e.Name, Msg: "completed before it was finished"}
			}
		case "BLOCK_JOB_CANCELLED":
			d.ended, d.mirroring = true, false
			if d.endErr == nil {
				d.endErr = &JobError{Node: d.node, Job: d.job, Event: e.Name}
			}
		}
		s.log.Debug("mirror event", "event", e.Name, "disk", d.name, "job", d.job, "data", string(e.Data))
	}
}

// queryTimeout bounds one poll of query-block-jobs.
const queryTimeout = 10 * time.Second

// queryContext detaches a poll from the caller's context: the caller's
// deadline ends the waits between polls, never a poll in flight. (A context
// that ends while the qmp client writes a command poisons the connection's
// write deadline; this keeps routine deadlines of WaitReady away from that.)
func queryContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), queryTimeout)
}

// sample reads query-block-jobs and updates every disk. Caller holds mu.
func (s *Session) sample(ctx context.Context) ([]Progress, error) {
	s.drain()
	var jobs []qmp.BlockJobInfo
	for try := 0; ; try++ {
		qctx, cancel := queryContext(ctx)
		var err error
		jobs, err = s.src.QueryBlockJobs(qctx)
		cancel()
		if err != nil {
			if s.src.Err() != nil {
				return nil, fmt.Errorf("%w: %w", ErrSourceGone, err)
			}
			return nil, fmt.Errorf("blockmirror: query-block-jobs: %w", err)
		}
		// Events are dispatched before the reply that follows them, so a job
		// missing from the reply has its end event in the channel by now.
		// Events that came in during the query may be newer than the reply:
		// ask again so the sample agrees with them.
		if s.drain() == 0 || try == 2 {
			break
		}
	}
	now := time.Now().UnixNano()
	out := make([]Progress, 0, len(s.disks))
	for _, d := range s.disks {
		if d.mirroring {
			i := -1
			for k := range jobs {
				if jobs[k].Device == d.job {
					i = k
				}
			}
			if i < 0 {
				d.mirroring, d.ended = false, true
				if d.endErr == nil && !d.finished {
					d.endErr = &JobError{Node: d.node, Job: d.job}
				}
			} else {
				j := jobs[i]
				if d.rateAt != 0 && now > d.rateAt && j.Offset >= d.done {
					d.rate = float64(j.Offset-d.done) / (float64(now-d.rateAt) / 1e9)
				}
				d.done, d.total, d.rateAt = j.Offset, j.Len, now
				if j.Ready {
					d.ready = true
				}
				if j.Status == "concluded" && d.endErr == nil && !s.finishing {
					d.endErr = &JobError{Node: d.node, Job: d.job, Event: "", Msg: "concluded: " + j.Error}
				}
			}
		}
		out = append(out, Progress{Node: d.node, Job: d.job, Done: d.done, Total: d.total, Rate: d.rate, Ready: d.ready, CopyMode: d.copyMode})
	}
	return out, nil
}

// failure is the first mirror error, if any. Caller holds mu.
func (s *Session) failure() error {
	var errs []error
	for _, d := range s.disks {
		if d.endErr != nil {
			errs = append(errs, d.endErr)
		}
	}
	return errors.Join(errs...)
}

// Progress samples every mirror (query-block-jobs).
func (s *Session) Progress(ctx context.Context) ([]Progress, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.sample(ctx)
	if err != nil {
		return p, err
	}
	if !s.finishing {
		return p, s.failure()
	}
	return p, nil
}

// wait samples until cond holds, an error shows or ctx ends, waking on job
// events and every pollInterval. Caller holds mu.
func (s *Session) wait(ctx context.Context, cond func() bool, progress func([]Progress)) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		p, err := s.sample(ctx)
		if err != nil {
			return err
		}
		if progress != nil {
			progress(p)
		}
		if err := s.failure(); err != nil {
			return err
		}
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("blockmirror: %w", ctx.Err())
		case <-s.dst.Done():
			return fmt.Errorf("%w: %w", ErrDestinationGone, s.dst.Err())
		case <-s.src.Done():
			return fmt.Errorf("%w: %w", ErrSourceGone, s.src.Err())
		case e, ok := <-s.sub.C:
			if ok {
				s.handle(e)
			}
		case <-t.C:
		}
	}
}

// WaitReady waits until every mirror is READY, calling progress (if not nil)
// with each new sample. A mirror error, cancellation or a QEMU going away
// ends it with an error; the caller then calls Abort.
func (s *Session) WaitReady(ctx context.Context, progress func([]Progress)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.finishing || s.cleaned {
		return fmt.Errorf("%w: WaitReady after Finish or Abort", ErrState)
	}
	return s.wait(ctx, func() bool {
		for _, d := range s.disks {
			if !d.ready {
				return false
			}
		}
		return true
	}, progress)
}

// SetWriteBlocking switches every mirror to write-blocking copy mode
// (block-job-change, QEMU 8.2+): from then on guest writes complete only once
// they reached the destination, so the mirror converges under any write load.
// On older QEMUs it returns an error wrapping ErrUnsupported and changes
// nothing; start with Config.WriteBlocking there, or use RestartWriteBlocking.
func (s *Session) SetWriteBlocking(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srcF == nil || !s.srcF.BlockJobChange {
		return fmt.Errorf("blockmirror: block-job-change (QEMU 8.2+) missing on the source: %w", ErrUnsupported)
	}
	for _, d := range s.disks {
		if !d.mirroring || d.copyMode == "write-blocking" {
			continue
		}
		if err := s.src.BlockJobChange(ctx, d.job, "write-blocking"); err != nil {
			if qmp.IsCommandNotFound(err) {
				return fmt.Errorf("blockmirror: block-job-change: %w: %w", ErrUnsupported, err)
			}
			return fmt.Errorf("blockmirror: block-job-change %s: %w", d.job, err)
		}
		d.copyMode = "write-blocking"
		s.log.Info("mirror switched to write-blocking", "disk", d.name, "job", d.job)
	}
	return nil
}

// RestartWriteBlocking is the switch to write-blocking copy mode on a source
// without block-job-change (before QEMU 8.2): every running mirror that is not
// write-blocking yet is force-cancelled (and waited for until its job is
// gone), then started again with blockdev-mirror on the same NBD client node
// and destination export, with the same sync mode and copy-mode
// write-blocking, under a new job id. The restarted mirror copies its disk
// again from the start (sync=full re-copies the whole disk): that is the
// price, and the mirror is not READY until the new copy is done — call
// WaitReady again. Progress and readiness follow the new job.
//
// It is meant for the mirror phase, before READY; it refuses after Finish or
// Abort (ErrState). If the restart fails part way the error is returned and
// the caller runs Abort, which removes whatever exists.
func (s *Session) RestartWriteBlocking(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.finishing || s.cleaned {
		return fmt.Errorf("%w: RestartWriteBlocking after Finish or Abort", ErrState)
	}
	if _, err := s.sample(ctx); err != nil {
		return err
	}
	if err := s.failure(); err != nil {
		return err
	}
	for _, d := range s.disks {
		if !d.mirroring || d.copyMode == "write-blocking" {
			continue
		}
		if err := s.restartOne(ctx, d); err != nil {
			return err
		}
	}
	return nil
}

// jobPrefix is what every mirror job id of the session starts with.
func (s *Session) jobPrefix() string { return "qmigrate-mirror-" + s.token + "-" }

// restartOne force-cancels d's mirror, waits until the job is gone and starts
// it again in write-blocking mode under a new job id. Caller holds mu.
func (s *Session) restartOne(ctx context.Context, d *disk) error {
	old := d.job
	// From here the old job's events (its BLOCK_JOB_CANCELLED) match no disk
	// and are ignored: the cancel is ours, not a failure.
	d.job = nextJobID(old)
	if err := s.cancelForRestart(ctx, old); err != nil {
		d.job = old // still there, as far as we know: Abort cancels it
		return err
	}
	d.mirroring = false
	d.ready, d.ended, d.endErr = false, false, nil
	d.done, d.rate, d.rateAt = 0, 0, 0
	args := qmp.BlockdevMirrorArgs{JobID: d.job, Device: d.node, Target: d.nbdNode, Sync: d.sync, Speed: s.cfg.Speed,
		BufSize: s.cfg.BufSize, Granularity: s.cfg.Granularity, CopyMode: "write-blocking"}
	if err := s.src.BlockdevMirror(ctx, args); err != nil {
		return fmt.Errorf("blockmirror: blockdev-mirror of %s in write-blocking mode: %w", d.name, err)
	}
	d.mirroring, d.copyMode = true, "write-blocking"
	s.log.Info("mirror restarted in write-blocking mode", "disk", d.name, "old-job", old, "job", d.job, "sync", d.sync, "bytes", d.size)
	return nil
}

// cancelForRestart force-cancels job old and waits until it is gone,
// dismissing it if it concluded. Caller holds mu.
func (s *Session) cancelForRestart(ctx context.Context, old string) error {
	if err := s.src.BlockJobCancel(ctx, old, true); err != nil && !isGone(err) {
		return fmt.Errorf("blockmirror: block-job-cancel %s for the write-blocking restart: %w", old, err)
	}
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		s.drain()
		jobs, err := s.src.QueryBlockJobs(ctx)
		if err != nil {
			if s.src.Err() != nil {
				return fmt.Errorf("%w: %w", ErrSourceGone, err)
			}
			return fmt.Errorf("blockmirror: query-block-jobs: %w", err)
		}
		i := slices.IndexFunc(jobs, func(j qmp.BlockJobInfo) bool { return j.Device == old })
		if i < 0 {
			return nil
		}
		if jobs[i].Status == "concluded" {
			if err := s.src.JobDismiss(ctx, old); err != nil && !isGone(err) {
				return fmt.Errorf("blockmirror: job-dismiss %s: %w", old, err)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("blockmirror: waiting for %s to be cancelled: %w", old, ctx.Err())
		case <-s.src.Done():
			return fmt.Errorf("%w: %w", ErrSourceGone, s.src.Err())
		case <-t.C:
		}
	}
}

// nextJobID is the job id of a restarted mirror: the id with "-wb<n>" added or
// counted up, so it never collides with a job that may still linger.
func nextJobID(id string) string {
	if i := strings.LastIndex(id, "-wb"); i >= 0 {
		if n, err := strconv.Atoi(id[i+3:]); err == nil {
			return id[:i] + "-wb" + strconv.Itoa(n+1)
		}
	}
	return id + "-wb1"
}

// Finish ends every mirror with a soft block-job-cancel and waits for
// BLOCK_JOB_COMPLETED without error: the destination images then hold the
// source's content at this moment. Call it in the pre-switchover window (guest
// stopped). A mirror that is not READY is an error wrapping ErrNotReady, and
// nothing is cancelled: call Abort.
func (s *Session) Finish(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cleaned {
		return fmt.Errorf("%w: Finish after Cleanup or Abort", ErrState)
	}
	if s.finished {
		return nil
	}
	if _, err := s.sample(ctx); err != nil {
		return err
	}
	if err := s.failure(); err != nil {
		return err
	}
	for _, d := range s.disks {
		if !d.ready || !d.mirroring {
			return fmt.Errorf("blockmirror: %s (job %s): %w", d.name, d.job, ErrNotReady)
		}
	}
	s.finishing = true
	for _, d := range s.disks {
		if err := s.src.BlockJobCancel(ctx, d.job, false); err != nil {
			return fmt.Errorf("blockmirror: block-job-cancel %s: %w", d.job, err)
		}
	}
	err := s.wait(ctx, func() bool {
		for _, d := range s.disks {
			if !d.finished {
				return false
			}
		}
		return true
	}, nil)
	if err != nil {
		return err
	}
	s.finished = true
	for _, d := range s.disks {
		s.log.Info("mirror finished", "disk", d.name, "job", d.job, "bytes", d.done)
	}
	return nil
}

// Cleanup removes the NBD client nodes on the source, then the exports
// (waiting until they are gone) and the NBD server on the destination. Call
// it after Finish and switchover, before cont on the destination (the
// destination's capability late-block-activate keeps it from activating its
// images earlier). It tries every step and returns all errors.
func (s *Session) Cleanup(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.finished {
		return fmt.Errorf("%w: Cleanup before Finish (use Abort)", ErrState)
	}
	if s.cleaned {
		return nil
	}
	err := errors.Join(s.delNBDNodes(ctx), s.delExports(ctx, ""), s.stopServer(ctx))
	for _, d := range s.disks {
		d.createdNodes = nil // they are the destination's disks now
	}
	if err == nil {
		s.cleaned = true
		if s.sub != nil {
			s.sub.Close()
		}
	}
	return err
}

// Abort undoes everything Start did, whatever the phase before switchover:
// mirrors are force-cancelled (concluded ones dismissed) and waited for, the
// source NBD nodes deleted, then on the destination (when its QMP connection
// is alive) the exports, the NBD server and any image nodes CreateTargets
// added. A mirror stuck on a destination that no longer answers has its NBD
// connection yanked after a few seconds. The source disks are never
// detached, so the guest keeps running on them. Abort is idempotent: a step
// that fails is retried by the next call; a Start afterwards begins from
// scratch.
func (s *Session) Abort(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cleaned {
		return nil
	}
	var errs []error
	if s.src.Err() == nil {
		errs = append(errs, s.cancelJobs(ctx))
		errs = append(errs, s.delNBDNodes(ctx))
	} else {
		for _, d := range s.disks {
			d.mirroring, d.nbdAdded = false, false
		}
	}
	if s.dst.Err() == nil {
		// A destination that no longer answers (frozen, link cut) must not
		// hold the rollback for the caller's whole deadline.
		dctx, cancel := context.WithTimeout(ctx, abortDestinationTimeout)
		errs = append(errs, s.delExports(dctx, "hard"), s.stopServer(dctx), s.delCreated(dctx))
		cancel()
	} else {
		s.serverStarted = false
		for _, d := range s.disks {
			d.exported, d.createdNodes = false, nil
		}
	}
	err := errors.Join(errs...)
	if err == nil {
		s.cleaned = true
		if s.sub != nil {
			s.sub.Close()
		}
		s.log.Info("block migration aborted; source disks untouched")
	}
	return err
}

// cancelJobs force-cancels every running mirror and waits until none is left.
// Caller holds mu.
func (s *Session) cancelJobs(ctx context.Context) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	asked := map[string]bool{}
	var yankAt time.Time // when to yank the NBD connections of jobs still stuck
	yanked := false
	var left []string // the jobs still there at the last look
	for {
		s.drain()
		jobs, err := s.src.QueryBlockJobs(ctx)
		if err != nil {
			if yanked && len(left) > 0 && ctx.Err() != nil {
				return s.stuckErr(left, ctx.Err())
			}
			return fmt.Errorf("blockmirror: query-block-jobs: %w", err)
		}
		left = left[:0]
		for _, d := range s.disks {
			if !d.mirroring && !d.ended {
				continue
			}
			var j *qmp.BlockJobInfo
			for k := range jobs {
				if jobs[k].Device == d.job {
					j = &jobs[k]
				}
			}
			if j == nil {
				d.mirroring, d.ended = false, true
				continue
			}
			left = append(left, d.job)
			switch {
			case j.Status == "concluded":
				if err := s.src.JobDismiss(ctx, d.job); err != nil && !isGone(err) {
					return fmt.Errorf("blockmirror: job-dismiss %s: %w", d.job, err)
				}
			case j.Status == "pending":
				_ = s.src.JobCancel(ctx, d.job)
			case !asked[d.job]:
				asked[d.job] = true
				if err := s.src.BlockJobCancel(ctx, d.job, true); err != nil && !isGone(err) {
					return fmt.Errorf("blockmirror: block-job-cancel %s: %w", d.job, err)
				}
				s.log.Debug("mirror force-cancelled", "disk", d.name, "job", d.job)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if yankAt.IsZero() {
			yankAt = time.Now().Add(yankAfter)
		} else if !yanked && time.Now().After(yankAt) {
			// A cancelled mirror waits for its in-flight NBD requests; against
			// a destination that hangs (frozen process, cut link) they never
			// return. yank shuts the NBD sockets down so they fail now.
			yanked = true
			s.yank(ctx)
		}
		select {
		case <-ctx.Done():
			if yanked {
				return s.stuckErr(left, ctx.Err())
			}
			return fmt.Errorf("blockmirror: waiting for cancelled mirrors: %w", ctx.Err())
		case <-s.src.Done():
			return fmt.Errorf("%w: %w", ErrSourceGone, s.src.Err())
		case <-t.C:
		}
	}
}

// stuckErr says which cancelled mirrors outlived the yank of their NBD
// connections: their requests in flight wait on a destination that reads
// nothing (a process stopped). Over TCP the yank ends them (measured on
// 10.0); over a unix socket QEMU waits for the socket to turn writable,
// which a shut-down unix socket never reports: they end only once the
// destination reads again or exits. The source's disks and guest are not
// touched meanwhile.
func (s *Session) stuckErr(jobs []string, err error) error {
	return fmt.Errorf("blockmirror: mirrors %s cancelled and their NBD connections yanked, still waiting for NBD requests in flight (a destination that reads nothing, stopped?; over a unix socket they end only once it reads again or exits): %w",
		strings.Join(jobs, ", "), err)
}

// abortDestinationTimeout bounds Abort's clean-up on the destination.
const abortDestinationTimeout = 10 * time.Second

// yankAfter is how long Abort waits for force-cancelled mirrors before it
// yanks their NBD connections.
const yankAfter = 2 * time.Second

// yank runs yank on the source NBD client nodes (QEMU 6.0+). Caller holds mu.
func (s *Session) yank(ctx context.Context) {
	if s.srcF != nil && !s.srcF.HasCommand("yank") {
		return
	}
	var inst []map[string]any
	for _, d := range s.disks {
		if d.nbdAdded && (d.mirroring || !d.ended) {
			inst = append(inst, map[string]any{"type": "block-node", "node-name": d.nbdNode})
		}
	}
	if len(inst) == 0 {
		return
	}
	err := s.src.Execute(ctx, "yank", map[string]any{"instances": inst}, nil)
	s.log.Warn("mirrors stuck after cancel: yanked their NBD connections", "nodes", len(inst), "err", err)
}

// isGone reports whether a QMP error says the object does not exist (any
// more): DeviceNotFound, DeviceNotActive (block-job-cancel of a job that
// ended since it was listed: measured on 10.0, an Abort retried as a
// stuck mirror ended), or a GenericError for a missing job/node/export.
func isGone(err error) bool {
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		return false
	}
	return qe.Class == "DeviceNotFound" || qe.Class == "DeviceNotActive" || qe.Class == "GenericError"
}

// delNBDNodes deletes the source NBD client nodes. Caller holds mu.
func (s *Session) delNBDNodes(ctx context.Context) error {
	var errs []error
	for _, d := range s.disks {
		if !d.nbdAdded {
			continue
		}
		if err := s.src.BlockdevDel(ctx, d.nbdNode); err != nil && !nodeMissing(ctx, s.src, d.nbdNode) {
			errs = append(errs, fmt.Errorf("blockmirror: source blockdev-del %s: %w", d.nbdNode, err))
			continue
		}
		d.nbdAdded = false
	}
	return errors.Join(errs...)
}

// nodeMissing reports whether the node is absent (so a failed blockdev-del
// has nothing left to do).
func nodeMissing(ctx context.Context, c *qmp.Client, node string) bool {
	nodes, err := c.QueryNamedBlockNodes(ctx)
	if err != nil {
		return false
	}
	for _, n := range nodes {
		if n.NodeName == node {
			return false
		}
	}
	return true
}

// delExports removes the destination exports and waits until they are gone.
// mode "" (safe) is retried briefly while the NBD client is still
// disconnecting, then "hard". Caller holds mu.
func (s *Session) delExports(ctx context.Context, mode string) error {
	var ids []string
	for _, d := range s.disks {
		if d.exported {
			ids = append(ids, d.exportID)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	sub := s.dst.Subscribe(qmp.EventFilter{Names: []string{"BLOCK_EXPORT_DELETED"}})
	defer sub.Close()
	deadline := time.Now().Add(2 * time.Second)
	for _, id := range ids {
		for {
			err := s.dst.BlockExportDel(ctx, id, mode)
			if err == nil || exportMissing(ctx, s.dst, id) {
				break
			}
			if mode == "" && time.Now().Before(deadline) {
				select {
				case <-ctx.Done():
					return fmt.Errorf("blockmirror: block-export-del %s: %w", id, ctx.Err())
				case <-time.After(50 * time.Millisecond):
				}
				continue
			}
			if mode == "" {
				mode = "hard"
				continue
			}
			return fmt.Errorf("blockmirror: destination block-export-del %s: %w", id, err)
		}
	}
	// Deletion is asynchronous (BLOCK_EXPORT_DELETED); query-block-exports is
	// the truth.
	if err := waitGone(ctx, "destination exports", exportIDs(s.dst), ids, sub.C); err != nil {
		return err
	}
	for _, d := range s.disks {
		d.exported = false
	}
	return nil
}

func exportMissing(ctx context.Context, c *qmp.Client, id string) bool {
	exps, err := c.QueryBlockExports(ctx)
	if err != nil {
		return false
	}
	for _, e := range exps {
		if e.ID == id {
			return false
		}
	}
	return true
}

// stopServer stops the destination NBD server. Caller holds mu.
func (s *Session) stopServer(ctx context.Context) error {
	if !s.serverStarted {
		return nil
	}
	if err := s.dst.NBDServerStop(ctx); err != nil {
		var qe *qmp.Error
		if !errors.As(err, &qe) { // a QEMU error here means no server is running
			return fmt.Errorf("blockmirror: destination nbd-server-stop: %w", err)
		}
	}
	s.serverStarted = false
	return nil
}

// delCreated removes the nodes CreateTargets added (the image files stay:
// QMP cannot delete files). Caller holds mu.
func (s *Session) delCreated(ctx context.Context) error {
	var errs []error
	for _, d := range s.disks {
		for i := len(d.createdNodes) - 1; i >= 0; i-- {
			n := d.createdNodes[i]
			if err := s.dst.BlockdevDel(ctx, n); err != nil && !nodeMissing(ctx, s.dst, n) {
				errs = append(errs, fmt.Errorf("blockmirror: destination blockdev-del %s: %w", n, err))
				break
			}
			d.createdNodes = d.createdNodes[:i]
		}
	}
	return errors.Join(errs...)
}
