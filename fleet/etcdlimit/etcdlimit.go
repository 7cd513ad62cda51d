// Package etcdlimit is a fleet.Limiter shared by several processes through
// an etcd cluster: the replicas of a manager that run parts of one fleet
// (or several fleets that must share limits) take their slots from it, so
// the limits hold across them.
//
// It lives in a Go module of its own so that the main module does not
// depend on etcd's client.
//
// # How
//
// Each slot taken is a key under Config.Prefix+"slots/", holding the
// migration's name and hosts, attached to the Limiter's lease. TryAcquire
// reads every slot (one consistent read), counts them against the limits,
// and writes its key in a transaction that succeeds only if no other
// acquisition happened since that read (a guard key every acquisition
// rewrites); otherwise it reads again. Release deletes the key. A watch on
// the slots signals Freed when any replica releases one.
//
// The lease is kept alive while the Limiter is open. A replica that dies
// stops renewing it: etcd deletes its slots once the lease's TTL has run
// out, and the other replicas see them freed. The converse holds too: a
// replica cut off from etcd for longer than the TTL loses its slots while
// its migrations may still run, so choose a TTL well above the longest
// outage to ride out. Every replica must use the same Prefix and Limits.
// The bandwidth budgets of fleet.Limits are not shared: they stay per
// process.
package etcdlimit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/qmigrate/qmigrate/fleet"
)

// Config configures a Limiter.
type Config struct {
	// Client is a connected etcd client; the Limiter does not close it.
	Client *clientv3.Client
	// Prefix is where the slots live, the same for every replica sharing
	// the limits: "/qmigrate/fleet/drain-host7/".
	Prefix string
	// Limits are the counts (MaxParallel, MaxPerSource,
	// MaxPerDestination; 0 is no limit), the same for every replica.
	Limits fleet.Limits
	// TTL is the lease's time to live: how long after a replica died its
	// slots come back. 0 = 10s; etcd raises a TTL below its minimum.
	TTL time.Duration
	// ID names this replica in its slots' keys; "" = the lease's ID.
	ID string
}

// Limiter is a fleet.Limiter backed by etcd.
type Limiter struct {
	cfg    Config
	lease  clientv3.LeaseID
	cancel context.CancelFunc
	done   chan struct{}

	mu    sync.Mutex
	freed chan struct{}
	n     uint64
}

// ErrConfig is wrapped by the errors of an invalid Config.
var ErrConfig = errors.New("etcdlimit: invalid config")

// slot is the value of a slot key.
type slot struct {
	Name        string `json:"name"`
	Source      string `json:"source"`
	Destination string `json:"destination"`
}

// New grants the lease, keeps it alive and watches the slots. Close it
// when done: its slots are freed at once.
func New(ctx context.Context, cfg Config) (*Limiter, error) {
	if cfg.Client == nil {
		return nil, fmt.Errorf("%w: no Client", ErrConfig)
	}
	if cfg.Prefix == "" || !strings.HasSuffix(cfg.Prefix, "/") {
		return nil, fmt.Errorf("%w: Prefix %q: want a key prefix ending in /", ErrConfig, cfg.Prefix)
	}
	if cfg.TTL == 0 {
		cfg.TTL = 10 * time.Second
	}
	ttl := int64(math.Ceil(cfg.TTL.Seconds()))
	g, err := cfg.Client.Grant(ctx, ttl)
	if err != nil {
		return nil, fmt.Errorf("etcdlimit: grant lease: %w", err)
	}
	if cfg.ID == "" {
		cfg.ID = fmt.Sprintf("%x", int64(g.ID))
	}
	bg, cancel := context.WithCancel(context.Background())
	ka, err := cfg.Client.KeepAlive(bg, g.ID)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("etcdlimit: keep the lease alive: %w", err)
	}
	l := &Limiter{cfg: cfg, lease: g.ID, cancel: cancel, done: make(chan struct{}), freed: make(chan struct{})}
	watch := func() clientv3.WatchChan {
		return cfg.Client.Watch(clientv3.WithRequireLeader(bg), l.slotsPrefix(), clientv3.WithPrefix(), clientv3.WithFilterPut())
	}
	wch := watch()
	go func() {
		defer close(l.done)
		for {
			select {
			case <-bg.Done():
				return
			case _, ok := <-ka:
				if !ok {
					ka = nil // the lease is lost (Close, or etcd out of reach past the TTL)
				}
			case _, ok := <-wch:
				// A slot deleted (released, or its lease expired), or
				// the watch broken: either way, let the fleet look again.
				l.signal()
				if !ok {
					wch = watch()
				}
			}
		}
	}()
	return l, nil
}

func (l *Limiter) slotsPrefix() string { return l.cfg.Prefix + "slots/" }
func (l *Limiter) guardKey() string    { return l.cfg.Prefix + "guard" }

func (l *Limiter) signal() {
	l.mu.Lock()
	close(l.freed)
	l.freed = make(chan struct{})
	l.mu.Unlock()
}

// Freed implements fleet.Limiter.
func (l *Limiter) Freed() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.freed
}

// TryAcquire implements fleet.Limiter.
func (l *Limiter) TryAcquire(ctx context.Context, s fleet.Slot) (func(), error) {
	c := l.cfg.Client
	val, err := json.Marshal(slot{Name: s.Name, Source: s.Source, Destination: s.Destination})
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.n++
	key := fmt.Sprintf("%s%s-%d", l.slotsPrefix(), l.cfg.ID, l.n)
	l.mu.Unlock()
	for {
		resp, err := c.Get(ctx, l.cfg.Prefix, clientv3.WithPrefix())
		if err != nil {
			return nil, fmt.Errorf("etcdlimit: read the slots: %w", err)
		}
		var guardRev int64
		total, src, dst := 0, 0, 0
		for _, kv := range resp.Kvs {
			k := string(kv.Key)
			if k == l.guardKey() {
				guardRev = kv.ModRevision
				continue
			}
			if !strings.HasPrefix(k, l.slotsPrefix()) {
				continue
			}
			var o slot
			if err := json.Unmarshal(kv.Value, &o); err != nil {
				return nil, fmt.Errorf("etcdlimit: slot %s: %w", k, err)
			}
			total++
			if o.Source == s.Source {
				src++
			}
			if o.Destination == s.Destination {
				dst++
			}
		}
		lim := l.cfg.Limits
		if lim.MaxParallel > 0 && total >= lim.MaxParallel ||
			lim.MaxPerSource > 0 && src >= lim.MaxPerSource ||
			lim.MaxPerDestination > 0 && dst >= lim.MaxPerDestination {
			return nil, nil
		}
		tr, err := c.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(l.guardKey()), "=", guardRev)).
			Then(clientv3.OpPut(key, string(val), clientv3.WithLease(l.lease)), clientv3.OpPut(l.guardKey(), key)).
			Commit()
		if err != nil {
			return nil, fmt.Errorf("etcdlimit: take a slot: %w", err)
		}
		if tr.Succeeded {
			var once sync.Once
			return func() { once.Do(func() { l.release(key) }) }, nil
		}
		// Another acquisition came first: count again.
	}
}

// release deletes a slot. A failure leaves it to the lease.
func (l *Limiter) release(key string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = l.cfg.Client.Delete(ctx, key)
}

// Close revokes the lease (every slot of this Limiter is freed) and stops
// the keep-alive and the watch.
func (l *Limiter) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := l.cfg.Client.Revoke(ctx, l.lease)
	l.cancel()
	<-l.done
	if err != nil {
		return fmt.Errorf("etcdlimit: revoke the lease: %w", err)
	}
	return nil
}

var _ fleet.Limiter = (*Limiter)(nil)
