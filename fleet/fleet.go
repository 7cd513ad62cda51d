package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qmp"
)

// item is one migration of the fleet as it goes through its attempts.
type item struct {
	idx      int // in Plan.Migrations
	rank     int // its place in the start order
	m        Migration
	attempts int
	first    time.Time // its first start
	res      Result
	// The last attempt's outcome, handed back to the dispatcher.
	eres       *engine.Result
	err        error
	retryTo    *Target // a fresh destination to retry on
	notStarted bool    // the attempt never started (cancelled while waiting for bandwidth)
}

type fleet struct {
	p     Plan
	lim   Limiter
	t0    time.Time
	hosts map[string]*hostBudget

	obsMu sync.Mutex
}

// Run runs the plan's migrations under its limits and returns when every
// one has ended: a Result for each and the summary. Cancelling ctx
// cancels the fleet: no migration starts any more, every running one rolls
// back (or, past its switchover, finishes), and Run returns once they all
// ended. The error is a *PlanError (nothing was started) or nil: the
// outcome of each migration is in its Result.
func Run(ctx context.Context, p Plan) (*Report, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	f := &fleet{p: p, lim: p.Limiter, t0: time.Now(), hosts: map[string]*hostBudget{}}
	if f.lim == nil {
		f.lim = NewLimiter(p.Limits)
	}
	for h, bw := range p.Limits.HostBandwidth {
		f.hosts[h] = newHostBudget(bw)
	}
	items := make([]*item, len(p.Migrations))
	for i, m := range p.Migrations {
		items[i] = &item{idx: i, m: m, res: Result{Name: m.Name, SourceHost: m.SourceHost, DestinationHost: m.DestinationHost}}
	}
	if p.SmallestFirst {
		f.sizes(ctx, items)
	}
	pending := slices.Clone(items)
	slices.SortStableFunc(pending, func(a, b *item) int {
		if a.m.Priority != b.m.Priority {
			return b.m.Priority - a.m.Priority
		}
		if p.SmallestFirst {
			as, bs := a.m.Size, b.m.Size
			switch {
			case as == bs:
			case as == 0:
				return 1
			case bs == 0:
				return -1
			case as < bs:
				return -1
			default:
				return 1
			}
		}
		return a.idx - b.idx
	})
	for r, it := range pending {
		it.rank = r
	}

	done := make(chan *item)
	running := 0
	for len(pending) > 0 || running > 0 {
		if ctx.Err() != nil {
			for _, it := range pending {
				f.end(it, NotStarted, fmt.Errorf("fleet cancelled before it started: %w", context.Cause(ctx)))
			}
			pending = nil
			if running == 0 {
				break
			}
			f.settle(ctx, <-done, &pending)
			running--
			continue
		}
		freed := f.lim.Freed()
		for i := 0; i < len(pending); {
			it := pending[i]
			release, err := f.lim.TryAcquire(ctx, Slot{Name: it.m.Name, Source: it.m.SourceHost, Destination: it.m.DestinationHost})
			if err != nil && ctx.Err() != nil {
				break
			}
			if err != nil {
				pending = slices.Delete(pending, i, i+1)
				f.end(it, NotStarted, fmt.Errorf("fleet: limiter: %w", err))
				continue
			}
			if release == nil {
				i++
				continue
			}
			pending = slices.Delete(pending, i, i+1)
			running++
			go func() {
				f.attempt(ctx, it, release)
				done <- it
			}()
		}
		if len(pending) == 0 && running == 0 {
			break
		}
		select {
		case <-ctx.Done():
		case <-freed:
		case it := <-done:
			running--
			f.settle(ctx, it, &pending)
		}
	}

	rep := &Report{Summary: Summary{Total: time.Since(f.t0)}}
	for _, it := range items {
		rep.Results = append(rep.Results, it.res)
		s := &rep.Summary
		switch it.res.Outcome {
		case Completed:
			s.Completed++
		case RolledBack:
			s.RolledBack++
		case Failed:
			s.Failed++
		case Unknown:
			s.Unknown++
		default:
			s.NotStarted++
		}
		s.Bytes += it.res.Bytes
		s.Downtime += it.res.Downtime
		s.MaxDowntime = max(s.MaxDowntime, it.res.Downtime)
		s.Retries += max(0, it.res.Attempts-1)
	}
	// The guests whose state is unknown come first: they need a person.
	slices.SortStableFunc(rep.Results, func(a, b Result) int {
		ua, ub := a.Outcome == Unknown, b.Outcome == Unknown
		switch {
		case ua && !ub:
			return -1
		case ub && !ua:
			return 1
		}
		return 0
	})
	return rep, nil
}

// attempt runs one attempt of it, holding its slot, and decides whether
// it is retried (it.retryTo).
func (f *fleet) attempt(ctx context.Context, it *item, release func()) {
	it.attempts++
	it.retryTo = nil
	if it.first.IsZero() {
		it.first = time.Now()
		it.res.Queued = it.first.Sub(f.t0)
	}
	cfg := it.m.Config
	own := cfg.Observer
	var last *engine.Result
	cfg.Observer = func(ev engine.Event) {
		if ev.Kind == engine.EventResult {
			last = ev.Result
		}
		if own != nil {
			own(ev)
		}
		f.emit(Event{Name: it.m.Name, Kind: EventEngine, Attempt: it.attempts, Engine: ev})
	}
	hb := f.hosts[it.m.SourceHost]
	var share uint64
	if hb != nil {
		var err error
		share, err = hb.admit(ctx, it, cfg.Bandwidth)
		if err != nil {
			release()
			it.attempts--
			it.eres, it.err, it.notStarted = nil, fmt.Errorf("fleet cancelled before it started: %w", err), true
			return
		}
		cfg.Bandwidth = share
	}
	f.emit(Event{Name: it.m.Name, Kind: EventStart, Attempt: it.attempts, Bandwidth: share,
		SourceHost: it.m.SourceHost, DestinationHost: it.m.DestinationHost})
	job, err := engine.Start(ctx, cfg)
	if hb != nil {
		hb.started(it, job, ctx.Err() == nil)
	}
	if job != nil {
		var res engine.Result
		res, err = job.Wait(context.WithoutCancel(ctx))
		last = &res
		if hb != nil {
			hb.leave(it, ctx.Err() == nil)
		}
	}
	if last == nil {
		last = &engine.Result{Status: engine.StatusFailed, Err: err}
	}
	it.eres, it.err = last, err
	release()

	if outcome(last, err) != Failed || ctx.Err() != nil || it.attempts > f.p.Retries ||
		f.p.NewDestination == nil || errors.Is(err, engine.ErrInvalidConfig) {
		return
	}
	t, nerr := f.p.NewDestination(ctx, it.m, it.attempts+1)
	if nerr != nil {
		it.err = errors.Join(err, fmt.Errorf("fleet: no fresh destination for a retry: %w", nerr))
		return
	}
	it.retryTo = &t
}

// settle records the end of an attempt: the migration is queued again on
// its fresh destination, or its Result is final.
func (f *fleet) settle(ctx context.Context, it *item, pending *[]*item) {
	r := &it.res
	r.Attempts = it.attempts
	r.Engine = it.eres
	if it.eres != nil {
		r.Bytes += it.eres.TransferredBytes
	}
	r.SourceHost, r.DestinationHost = it.m.SourceHost, it.m.DestinationHost
	if it.retryTo != nil && ctx.Err() == nil {
		t := *it.retryTo
		f.emit(Event{Name: it.m.Name, Kind: EventRetry, Attempt: it.attempts, Err: it.err})
		it.m.Config.Destination = t.Destination
		if t.URI != "" {
			it.m.Config.URI = t.URI
		}
		if t.Host != "" {
			it.m.DestinationHost = t.Host
		}
		i, _ := slices.BinarySearchFunc(*pending, it.rank, func(x *item, r int) int { return x.rank - r })
		*pending = slices.Insert(*pending, i, it)
		return
	}
	o := outcome(it.eres, it.err)
	if it.notStarted && it.attempts == 0 {
		o = NotStarted
	}
	if o == Completed {
		r.Downtime = it.eres.Downtime
	}
	f.end(it, o, it.err)
}

// end makes it's Result final.
func (f *fleet) end(it *item, o Outcome, err error) {
	r := &it.res
	r.Outcome, r.Err = o, err
	if o == Completed {
		r.Err = nil
	}
	if !it.first.IsZero() {
		r.Time = time.Since(it.first)
	}
	res := *r
	f.emit(Event{Name: it.m.Name, Kind: EventEnd, Attempt: it.attempts, Result: &res})
}

// outcome classifies an attempt's engine result.
func outcome(res *engine.Result, err error) Outcome {
	switch {
	case res != nil && res.Status == engine.StatusCompleted && err == nil:
		return Completed
	case res != nil && res.StateUnknown, errors.Is(err, engine.ErrPostcopyFailed):
		return Unknown
	case res != nil && res.Status == engine.StatusCancelled, errors.Is(err, engine.ErrCancelled):
		return RolledBack
	}
	return Failed
}

func (f *fleet) emit(ev Event) {
	if f.p.Observer == nil {
		return
	}
	f.obsMu.Lock()
	defer f.obsMu.Unlock()
	f.p.Observer(ev)
}

// sizes reads the RAM size of the guests whose Size is 0 from their source
// QEMU, for SmallestFirst. A size that cannot be read stays 0 (last).
func (f *fleet) sizes(ctx context.Context, items []*item) {
	var wg sync.WaitGroup
	for _, it := range items {
		if it.m.Size != 0 {
			continue
		}
		wg.Go(func() {
			if n, err := guestSize(ctx, it.m.Config); err == nil {
				it.m.Size = n
			}
		})
	}
	wg.Wait()
}

// guestSize asks the source QEMU for its guest's RAM size.
func guestSize(ctx context.Context, cfg engine.Config) (uint64, error) {
	timeout := cfg.ConnectTimeout
	if timeout == 0 {
		timeout = engine.DefaultConnectTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c := cfg.Source.Client
	if c == nil {
		var err error
		if c, err = qmp.DialAddress(ctx, cfg.Source.Address); err != nil {
			return 0, err
		}
		defer c.Close()
	}
	var mem struct {
		BaseMemory uint64 `json:"base-memory"`
	}
	if err := c.Execute(ctx, "query-memory-size-summary", nil, &mem); err != nil {
		return 0, err
	}
	return mem.BaseMemory, nil
}
