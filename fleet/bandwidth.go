package fleet

import (
	"context"
	"errors"
	"slices"
	"sync"

	"github.com/qmigrate/qmigrate/engine"
)

// hostBudget shares one source host's bandwidth budget among the
// migrations running from it. Shares change one step at a time, under its
// lock: the ones that go down first (each SetBandwidth returns once the
// source QEMU has the new value), then the ones that go up, so the sum of
// what the sources were told never exceeds the budget. A migration that is
// starting (engine.Start has not returned: it may be mirroring its disks)
// keeps the share it started with until it runs, counted in the sum; the
// lock is not held meanwhile.
type hostBudget struct {
	mu      sync.Mutex
	budget  uint64
	members map[*item]*share
	changed chan struct{} // closed when a member leaves or starts running
}

// share is one migration's part of a host's budget.
type share struct {
	cap   uint64      // the migration's own Config.Bandwidth, 0: none
	alloc uint64      // what its source QEMU was told (bytes/s); 0 once it no longer sends RAM
	job   *engine.Job // nil while it starts
	gone  bool        // past the source's completion, rolling back or ended: it sends no more RAM
}

func newHostBudget(budget uint64) *hostBudget {
	return &hostBudget{budget: budget, members: map[*item]*share{}, changed: make(chan struct{})}
}

// admit adds it to the host and returns its share; started must follow.
// When the others' shares cannot be lowered enough to leave it any (one
// still starting, or a source that refused the change), it waits for one
// of them to leave or to run.
func (h *hostBudget) admit(ctx context.Context, it *item, cap uint64) (uint64, error) {
	for {
		h.mu.Lock()
		me := &share{cap: cap}
		h.members[it] = me
		targets := h.split()
		h.lower(targets)
		var used uint64
		for o, s := range h.members {
			if o != it {
				used += s.alloc
			}
		}
		if used < h.budget {
			me.alloc = min(targets[it], h.budget-used)
			if me.alloc > 0 {
				h.mu.Unlock()
				return me.alloc, nil
			}
		}
		delete(h.members, it)
		changed := h.changed
		h.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// started records the job admit's member got, or its leaving when it did
// not start (job nil), and splits the budget again.
func (h *hostBudget) started(it *item, job *engine.Job, resplit bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if job == nil {
		h.remove(it)
	} else if s := h.members[it]; s != nil {
		s.job = job
		h.signal()
	}
	if resplit {
		h.resplit()
	}
}

// leave removes a member whose job ended; with resplit the others get
// its share.
func (h *hostBudget) leave(it *item, resplit bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.remove(it)
	if resplit {
		h.resplit()
	}
}

func (h *hostBudget) remove(it *item) {
	if _, ok := h.members[it]; !ok {
		return
	}
	delete(h.members, it)
	h.signal()
}

func (h *hostBudget) signal() {
	close(h.changed)
	h.changed = make(chan struct{})
}

func (h *hostBudget) resplit() {
	targets := h.split()
	h.lower(targets)
	h.raise(targets)
}

// split divides the budget among the members still sending, each up to
// its own cap, the rest shared evenly (water-filling).
func (h *hostBudget) split() map[*item]uint64 {
	type m struct {
		it  *item
		cap uint64
	}
	var ms []m
	for it, s := range h.members {
		if s.gone {
			continue
		}
		c := s.cap
		if c == 0 || c > h.budget {
			c = h.budget
		}
		ms = append(ms, m{it, c})
	}
	slices.SortFunc(ms, func(a, b m) int {
		if a.cap != b.cap {
			if a.cap < b.cap {
				return -1
			}
			return 1
		}
		return a.it.idx - b.it.idx
	})
	out := map[*item]uint64{}
	left := h.budget
	for i, x := range ms {
		t := min(x.cap, left/uint64(len(ms)-i))
		out[x.it] = t
		left -= t
	}
	return out
}

// lower sets every running member above its target to the target, all at
// once, and returns when each source QEMU has it (or refused it).
func (h *hostBudget) lower(targets map[*item]uint64) {
	set := map[*share]uint64{}
	for it, s := range h.members {
		if t, ok := targets[it]; ok && s.job != nil && !s.gone && t > 0 && t < s.alloc {
			set[s] = t
		}
	}
	h.apply(set)
}

// raise sets every running member below its target to the target, as far
// as the budget allows: a member still starting may hold more than its
// target until it runs, and that is not handed out twice.
func (h *hostBudget) raise(targets map[*item]uint64) {
	var used uint64
	for _, s := range h.members {
		used += s.alloc
	}
	free := uint64(0)
	if used < h.budget {
		free = h.budget - used
	}
	set := map[*share]uint64{}
	its := make([]*item, 0, len(h.members))
	for it := range h.members {
		its = append(its, it)
	}
	slices.SortFunc(its, func(a, b *item) int { return a.idx - b.idx })
	for _, it := range its {
		s := h.members[it]
		t, ok := targets[it]
		if !ok || s.job == nil || s.gone || t <= s.alloc || free == 0 {
			continue
		}
		n := min(t, s.alloc+free)
		free -= n - s.alloc
		set[s] = n
	}
	h.apply(set)
}

// apply sets the members' bandwidth, all at once, and returns when each
// source QEMU has it (or refused it).
func (h *hostBudget) apply(set map[*share]uint64) {
	var wg sync.WaitGroup
	for s, t := range set {
		wg.Go(func() {
			err := s.job.SetBandwidth(t)
			switch {
			case err == nil:
				s.alloc = t
			case errors.Is(err, engine.ErrJobEnded) || errors.Is(err, engine.ErrNotNow):
				// Ended, or past the point where it sends RAM (the
				// source completed, or rolling back).
				s.alloc, s.gone = 0, true
			}
			// Any other refusal leaves the value in force as it was.
		})
	}
	wg.Wait()
}
