package fleet

import (
	"context"
	"sync"
)

// Slot is what one migration in flight takes from a Limiter.
type Slot struct {
	Name        string // the migration's name
	Source      string // its source host ("" when unnamed)
	Destination string // its destination host
}

// Limiter hands out the slots that bound the migrations in flight. A
// fleet asks for a slot before it starts a migration and gives it back
// once the migration ended. The in-process Local is the default; one
// shared by several processes (several replicas of a manager) replaces it
// with the same contract.
type Limiter interface {
	// TryAcquire takes a slot for s if every limit has room, all of it
	// or nothing: release gives it back (once; it must not block for
	// long). A nil release with a nil error means no room now.
	TryAcquire(ctx context.Context, s Slot) (release func(), err error)
	// Freed returns a channel closed when a slot may have come free since
	// the call: the fleet calls it before TryAcquire and waits on it
	// when there was no room.
	Freed() <-chan struct{}
}

// Local is a Limiter within one process: counts in memory.
type Local struct {
	mu    sync.Mutex
	lim   Limits
	total int
	src   map[string]int
	dst   map[string]int
	freed chan struct{}
	inUse map[uint64]Slot // by key
	next  uint64
}

// NewLimiter returns an in-process Limiter for the counts of l
// (MaxParallel, MaxPerSource, MaxPerDestination; 0 is no limit).
func NewLimiter(l Limits) *Local {
	return &Local{lim: l, src: map[string]int{}, dst: map[string]int{}, freed: make(chan struct{}), inUse: map[uint64]Slot{}}
}

// TryAcquire implements Limiter.
func (l *Local) TryAcquire(ctx context.Context, s Slot) (func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lim.MaxParallel > 0 && l.total >= l.lim.MaxParallel ||
		l.lim.MaxPerSource > 0 && l.src[s.Source] >= l.lim.MaxPerSource ||
		l.lim.MaxPerDestination > 0 && l.dst[s.Destination] >= l.lim.MaxPerDestination {
		return nil, nil
	}
	l.total++
	l.src[s.Source]++
	l.dst[s.Destination]++
	l.next++
	key := l.next
	l.inUse[key] = s
	var once sync.Once
	return func() { once.Do(func() { l.release(key) }) }, nil
}

func (l *Local) release(key uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.inUse[key]
	delete(l.inUse, key)
	l.total--
	l.src[s.Source]--
	l.dst[s.Destination]--
	close(l.freed)
	l.freed = make(chan struct{})
}

// Freed implements Limiter.
func (l *Local) Freed() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.freed
}

// InFlight returns the slots taken now.
func (l *Local) InFlight() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}
