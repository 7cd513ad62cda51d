package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// Job is one migration in flight: Start returns it once the migration
// runs, and it is watched (Progress, Subscribe), steered (SetBandwidth,
// SetMaxDowntime, SetBudget, StartPostcopy, ForceComplete, Abort) and
// waited for (Wait, Done) from any goroutine. One goroutine of its own owns
// the migration's state, as in Migrate; the methods hand it requests and
// wait for the outcome. A request is served at the job's next poll (at most
// Config.PollInterval after it is made, plus the QMP command it needs).
type Job struct {
	r      *run
	cancel context.CancelFunc
	reqs   chan request
	start  chan struct{} // closed once the migration runs
	done   chan struct{} // closed once the Result is final

	mu    sync.Mutex
	prog  Progress
	subs  map[*Subscription]struct{}
	res   *Result
	stage stage
}

// Progress is a consistent snapshot of a job.
type Progress struct {
	Phase     Phase
	Stage     string        // finer than Phase: prepare, mirror, start, precopy, paused, stopcopy, switchover, postcopy, postcopy-paused, recovering, sourcedone, complete, rollback, rescue, ended
	Elapsed   time.Duration // since Start
	Stats     *Stats        // the latest poll; nil before the first
	Limits    Limits        // the limits in force
	Decisions []strategy.Decision
	Result    *Result // once the job ended; nil before
}

// Limits are the user's limits in force in a job; the job's Set methods
// change them, and each change is an EventLimits.
type Limits struct {
	Bandwidth   uint64        // max-bandwidth on the source, bytes/s (UnlimitedBandwidth: none)
	MaxDowntime time.Duration // the ceiling of any downtime limit (strategy.Limits.MaxDowntime, 0 = 300 ms)
	Budget      time.Duration // the whole migration's budget (0: none)
	// DowntimeLimit is the downtime-limit in force on the source, as the
	// engine last set it (read back in prepare).
	DowntimeLimit time.Duration
}

// Errors of the job's steering methods.
var (
	// ErrJobEnded: the job ended before or while the request was served.
	ErrJobEnded = errors.New("engine: the migration has ended")
	// ErrNotNow: the request is not possible in the migration's current
	// stage (wrapped in a *StageError naming it).
	ErrNotNow = errors.New("not possible in the migration's current stage")
	// ErrNotPermitted: the request needs something the configuration did
	// not permit (postcopy without Strategy.Limits.AllowPostcopy).
	ErrNotPermitted = errors.New("not permitted by the migration's configuration")
)

// StageError is a request refused in the stage the migration is in.
type StageError struct {
	Op    string // the request: "StartPostcopy", "SetMaxDowntime", ...
	Stage string // the stage it was refused in (Progress.Stage)
}

func (e *StageError) Error() string {
	return fmt.Sprintf("engine: %s: %v (stage %s)", e.Op, ErrNotNow, e.Stage)
}

func (e *StageError) Unwrap() error { return ErrNotNow }

// Start prepares both QEMUs and starts the migration. It returns once the
// migration runs, with the Job that sees it through; or, when it could not
// start, a nil Job and the error, with everything it changed rolled back
// (the guest runs on the source) and the Result in the observer's result
// event. ctx bounds the whole migration, as for Migrate: cancelling it is
// Abort. A manager whose jobs outlive the request that started them passes
// context.WithoutCancel(ctx).
func Start(ctx context.Context, cfg Config) (*Job, error) {
	return startWith(ctx, cfg, (*run).execute)
}

// startWith launches body (execute, or adopt) and waits until the
// migration runs or the job ended.
func startWith(ctx context.Context, cfg Config, body func(*run, context.Context) error) (*Job, error) {
	j := launch(ctx, cfg, body)
	select {
	case <-j.start:
		return j, nil
	case <-j.done:
	}
	select {
	case <-j.start: // it ran, and ended already: the Job has its Result
		return j, nil
	default:
	}
	if j.res.Err != nil {
		return nil, j.res.Err
	}
	return j, nil
}

// Migrate runs one migration from cfg.Source to cfg.Destination and returns
// when the guest runs on the destination (Status "completed", nil error), or
// when the migration failed or was cancelled and the rollback ran (the guest
// runs on the source). It is Start followed by Wait. The Result is never
// nil: an invalid config returns one with Status "failed" and an error
// wrapping ErrInvalidConfig, without touching either QEMU, and the observer
// gets only the result event.
func Migrate(ctx context.Context, cfg Config) (*Result, error) {
	j := launch(ctx, cfg, (*run).execute)
	<-j.done
	return j.res, j.res.Err
}

// launch validates cfg and runs body (the migration) on a goroutine of its
// own.
func launch(ctx context.Context, cfg Config, body func(*run, context.Context) error) *Job {
	t0 := time.Now()
	j := &Job{reqs: make(chan request), start: make(chan struct{}), done: make(chan struct{}), subs: map[*Subscription]struct{}{}}
	err := cfg.Validate()
	var m *strategy.Machine
	if err == nil {
		if m, err = strategy.New(cfg.Strategy); err != nil {
			err = fmt.Errorf("%w: Strategy: %v", ErrInvalidConfig, err)
		}
	}
	if err != nil {
		// Nothing was touched. The Result and the observer's one event
		// say so like for any other failure.
		res := &Result{Status: StatusFailed, Total: time.Since(t0), Err: err}
		if cfg.Observer != nil {
			cfg.Observer(Event{Kind: EventResult, Elapsed: res.Total, Result: res})
		}
		j.res = res
		j.prog = Progress{Phase: PhasePrepare, Stage: stageEnded.String(), Elapsed: res.Total, Result: res}
		close(j.done)
		return j
	}
	ch, _ := transport.Parse(cfg.URI) // Validate checked it
	uri := ch
	if cfg.Listen != "" {
		ch, _ = transport.Parse(cfg.Listen) // the destination listens there
	}
	r := &run{
		cfg:    cfg,
		log:    cfg.logger(),
		t0:     t0,
		res:    &Result{},
		ch:     ch,
		migCh:  uri,
		uri:    uri,
		listen: ch,
		m:      m,
		phase:  PhasePrepare,
		stage:  stagePrepare,
		seen:   1 << stagePrepare,
		prevSC: map[string]bool{},
		prevDC: map[string]bool{},
		job:    j,
		token:  randomHex(6),
	}
	j.r = r
	j.prog = Progress{Phase: PhasePrepare, Stage: stagePrepare.String(), Limits: r.limits()}
	jctx, cancel := context.WithCancel(ctx)
	j.cancel = cancel
	go func() {
		defer cancel()
		err := body(r, jctx)
		r.finish(err)
		j.mu.Lock()
		j.res = r.res
		j.prog.Result = r.res
		for s := range j.subs {
			s.close()
		}
		j.subs = nil
		j.mu.Unlock()
		close(j.done)
	}()
	return j
}

// Done is closed once the job ended and its Result is final.
func (j *Job) Done() <-chan struct{} { return j.done }

// Wait waits for the job to end and returns its Result and error (as
// Migrate does). ctx bounds only the wait: the migration goes on.
func (j *Job) Wait(ctx context.Context) (Result, error) {
	select {
	case <-j.done:
		return *j.res, j.res.Err
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// Progress returns a snapshot of the job: a copy, safe to keep.
func (j *Job) Progress() Progress {
	j.mu.Lock()
	defer j.mu.Unlock()
	p := j.prog
	p.Decisions = append([]strategy.Decision(nil), p.Decisions...)
	if p.Result == nil && j.r != nil {
		p.Elapsed = time.Since(j.r.t0)
	}
	return p
}

// SetBandwidth changes the migration's bandwidth limit (bytes/s; 0 or
// UnlimitedBandwidth: none) on the source at once. Possible until the
// source completed. A rollback restores the value from before the
// migration, not this one.
func (j *Job) SetBandwidth(bps uint64) error {
	return j.call(request{op: "SetBandwidth", bps: bps})
}

// SetMaxDowntime changes the user's maximum downtime (0: 300 ms, at most
// strategy.QEMUMaxDowntime). The strategy obeys it from its next step; a
// downtime limit in force above it is lowered at once. Possible until the
// switchover begins.
func (j *Job) SetMaxDowntime(d time.Duration) error {
	return j.call(request{op: "SetMaxDowntime", d: d})
}

// SetBudget changes the whole migration's budget (0: none), counted from
// Start. Possible until the switchover begins.
func (j *Job) SetBudget(d time.Duration) error {
	return j.call(request{op: "SetBudget", d: d})
}

// StartPostcopy switches the migration to postcopy now. It needs
// Strategy.Limits.AllowPostcopy (and QEMUs that could enable it:
// ErrNotPermitted otherwise) and pre-copy running (ErrNotNow). From here
// the migration cannot be rolled back.
func (j *Job) StartPostcopy() error { return j.call(request{op: "StartPostcopy"}) }

// ForceComplete pauses the guest on the source so that QEMU finishes with
// a stop-and-copy, whatever its downtime (the caller's decision: it needs
// no Strategy.Limits.AllowPause). Only in pre-copy (ErrNotNow otherwise).
func (j *Job) ForceComplete() error { return j.call(request{op: "ForceComplete"}) }

// Abort cancels the migration: it rolls back, the guest runs on the source
// (Status "cancelled"). It does not wait for the rollback (Wait does).
// Refused (ErrNotNow) once postcopy began or the source completed: the
// migration then finishes.
func (j *Job) Abort() error {
	if err := j.refuse("Abort", stage.cancellable); err != nil {
		return err
	}
	j.cancel()
	return nil
}

// refuse says why op cannot be done now: the job ended, or its stage does
// not permit it.
func (j *Job) refuse(op string, permits func(stage) bool) error {
	select {
	case <-j.done:
		return ErrJobEnded
	default:
	}
	j.mu.Lock()
	st := j.stage
	j.mu.Unlock()
	if !permits(st) {
		return &StageError{Op: op, Stage: st.String()}
	}
	return nil
}

// request is a steering call handed to the job's goroutine.
type request struct {
	op    string
	bps   uint64
	d     time.Duration
	reply chan error
}

func (j *Job) call(q request) error {
	if err := j.refuse(q.op, q.possibleIn); err != nil {
		return err
	}
	q.reply = make(chan error, 1)
	select {
	case j.reqs <- q:
	case <-j.done:
		return ErrJobEnded
	}
	select {
	case err := <-q.reply:
		return err
	case <-j.done:
		select {
		case err := <-q.reply:
			return err
		default:
			return ErrJobEnded
		}
	}
}

// possibleIn reports whether the request can be served in stage s.
func (q request) possibleIn(s stage) bool {
	switch q.op {
	case "SetBandwidth":
		return s < stageSourceDone
	case "StartPostcopy", "ForceComplete":
		return s == stagePrecopy
	}
	return s <= stagePrecopy // SetMaxDowntime, SetBudget: before the switchover
}

// serve carries out a request on the job's goroutine and answers it. The
// error returned ends the migration (a command its QEMU did not answer);
// the request's own failure goes to its caller only.
func (r *run) serve(ctx context.Context, q request) error {
	err, fatal := r.steer(ctx, q)
	q.reply <- err
	return fatal
}

func (r *run) steer(ctx context.Context, q request) (err, fatal error) {
	if !q.possibleIn(r.stage) {
		return &StageError{Op: q.op, Stage: r.stage.String()}, nil
	}
	lim := r.m.Limits()
	switch q.op {
	case "SetBandwidth":
		bps := q.bps
		if bps == 0 {
			bps = UnlimitedBandwidth
		}
		if err := r.setSourceParams(ctx, "max-bandwidth", paramsBandwidth(bps)); err != nil {
			return err, fatalOf(err)
		}
		r.cfg.Bandwidth = bps
	case "SetMaxDowntime", "SetBudget":
		if q.d < 0 {
			return fmt.Errorf("%w: %s: negative (%v)", ErrBadInput, q.op, q.d), nil
		}
		if q.op == "SetBudget" {
			lim.Budget = q.d
		} else {
			lim.MaxDowntime = q.d
		}
		if err := r.m.SetLimits(lim); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrBadInput, q.op, err), nil
		}
		r.cfg.Strategy.Limits = lim
		if q.op == "SetMaxDowntime" && r.downtimeLimit > r.capDowntime(r.downtimeLimit) {
			d := r.capDowntime(r.downtimeLimit)
			if err := r.setSourceParams(ctx, "downtime-limit", paramsDowntime(d)); err != nil {
				return err, fatalOf(err)
			}
			r.downtimeLimit = d
		}
	case "StartPostcopy":
		if !r.setup.Postcopy {
			return fmt.Errorf("%w: StartPostcopy: postcopy-ram was not enabled (Strategy.Limits.AllowPostcopy, and QEMUs that support it with this channel)", ErrNotPermitted), nil
		}
		d := strategy.Decision{Action: strategy.StartPostcopy, Summary: "postcopy: asked for by the manager", Reason: "asked for through the job (StartPostcopy)", At: r.elapsed()}
		return r.applied(ctx, d, r.apply(ctx, d))
	case "ForceComplete":
		d := strategy.Decision{Action: strategy.PauseSource, Summary: "pause the source for a stop-and-copy: asked for by the manager", Reason: "asked for through the job (ForceComplete)", At: r.elapsed()}
		return r.applied(ctx, d, r.pauseSource(ctx))
	}
	l := r.limits()
	r.emit(Event{Kind: EventLimits, Limits: &l})
	return nil, nil
}

// applied records a lever applied on the caller's request like a decision
// of the strategy (Result.Decisions, an EventDecision, fed back).
func (r *run) applied(ctx context.Context, d strategy.Decision, aerr error) (err, fatal error) {
	if ferr := r.record(ctx, d, aerr); ferr != nil {
		return aerr, ferr
	}
	return aerr, nil
}

// fatalOf is the part of a steering command's failure that ends the
// migration: a QEMU that did not answer.
func fatalOf(err error) error {
	if isUnanswered(err) {
		return err
	}
	return nil
}

// limits are the limits in force.
func (r *run) limits() Limits {
	return Limits{
		Bandwidth:     r.cfg.bandwidth(),
		MaxDowntime:   r.cfg.Strategy.Limits.MaxDowntime,
		Budget:        r.cfg.Strategy.Limits.Budget,
		DowntimeLimit: r.downtimeLimit,
	}
}

// publish updates the job's snapshot with ev and hands ev to the
// subscribers.
func (j *Job) publish(ev Event) {
	j.mu.Lock()
	defer j.mu.Unlock()
	p := &j.prog
	p.Elapsed = ev.Elapsed
	switch ev.Kind {
	case EventPhase:
		p.Phase = ev.Phase
	case EventStats:
		p.Stats = ev.Stats
		p.Limits.DowntimeLimit = ev.Stats.DowntimeLimit
	case EventDecision:
		p.Decisions = append(p.Decisions, *ev.Decision)
	case EventLimits:
		p.Limits = *ev.Limits
	}
	for s := range j.subs {
		s.push(ev)
	}
}

// setStage records the stage for the steering methods' checks.
func (j *Job) setStage(s stage) {
	j.mu.Lock()
	j.stage = s
	j.prog.Stage = s.String()
	j.mu.Unlock()
}

// Subscribe returns a subscription to the job's events from now on, in
// order; a job that ended already gives a closed channel. A subscriber
// never blocks the job: its events queue (without bound) until read. The
// channel closes after the result event, or on Close.
func (j *Job) Subscribe() *Subscription {
	s := &Subscription{out: make(chan Event), stop: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	s.C = s.out
	j.mu.Lock()
	if j.res != nil && j.subs == nil {
		j.mu.Unlock()
		close(s.out)
		return s
	}
	j.subs[s] = struct{}{}
	j.mu.Unlock()
	s.job = j
	go s.forward()
	return s
}

// Subscription is a subscriber's view of a job's events (Job.Subscribe).
type Subscription struct {
	C <-chan Event

	job    *Job
	out    chan Event
	stop   chan struct{}
	once   sync.Once
	mu     sync.Mutex
	cond   *sync.Cond
	queue  []Event
	closed bool // no more events: the job ended or Close was called
}

// Close ends the subscription; its channel closes (events still queued are
// dropped).
func (s *Subscription) Close() {
	if s.job != nil {
		s.job.mu.Lock()
		delete(s.job.subs, s)
		s.job.mu.Unlock()
	}
	s.once.Do(func() { close(s.stop) })
	s.close()
}

func (s *Subscription) push(ev Event) {
	s.mu.Lock()
	if !s.closed {
		s.queue = append(s.queue, ev)
		s.cond.Signal()
	}
	s.mu.Unlock()
}

func (s *Subscription) close() {
	s.mu.Lock()
	s.closed = true
	s.cond.Signal()
	s.mu.Unlock()
}

// forward hands the queued events to the channel, in order.
func (s *Subscription) forward() {
	defer close(s.out)
	for {
		s.mu.Lock()
		for len(s.queue) == 0 && !s.closed {
			s.cond.Wait()
		}
		if len(s.queue) == 0 {
			s.mu.Unlock()
			return
		}
		ev := s.queue[0]
		s.queue = s.queue[1:]
		s.mu.Unlock()
		select {
		case s.out <- ev:
		case <-s.stop:
			return
		}
	}
}
