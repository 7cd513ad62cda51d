package qmp

import (
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"
)

// Event is an asynchronous QMP event.
type Event struct {
	Name string          // e.g. "MIGRATION", "STOP", "BLOCK_JOB_READY"
	Data json.RawMessage // the event's data object, may be nil
	Time time.Time       // QEMU's timestamp
}

// Decode unmarshals the event's data into v.
func (e Event) Decode(v any) error {
	if len(e.Data) == 0 {
		return nil
	}
	return json.Unmarshal(e.Data, v)
}

// Field returns a top-level string field of the event data ("" if absent), for
// filters on "device", "id", "status" and the like.
func (e Event) Field(name string) string {
	var m map[string]json.RawMessage
	if json.Unmarshal(e.Data, &m) != nil {
		return ""
	}
	var s string
	if json.Unmarshal(m[name], &s) != nil {
		return ""
	}
	return s
}

// EventFilter selects events for a subscription. Empty Names matches every
// event; Match (optional) further filters.
type EventFilter struct {
	Names []string
	Match func(Event) bool
	// Buffer is the channel capacity; 0 takes the client default (256).
	Buffer int
}

// ForDevice is a Match function for events whose data has "device" or "id"
// (block jobs, job status, exports) equal to id.
func ForDevice(id string) func(Event) bool {
	return func(e Event) bool { return e.Field("device") == id || e.Field("id") == id }
}

// Subscription receives matching events on C until Close or until the
// connection ends, when C is closed. The reader never blocks on a slow
// subscriber: when C is full the event is dropped and counted.
type Subscription struct {
	C       <-chan Event
	c       chan Event
	filter  EventFilter
	names   map[string]bool
	client  *Client
	dropped atomic.Uint64
	once    sync.Once
	mu      sync.Mutex // guards sends against close
	closed  bool
}

// Subscribe starts a subscription. Subscribe before issuing the command that
// causes the events, and none is missed: the reader delivers events and
// replies in wire order. Events are wake-ups: poll QueryMigrate or
// QueryBlockJobs for the truth, since an event that does not fit the buffer
// is dropped (Subscription.Dropped).
func (c *Client) Subscribe(f EventFilter) *Subscription {
	n := f.Buffer
	if n <= 0 {
		n = c.evBuf
	}
	ch := make(chan Event, n)
	s := &Subscription{C: ch, c: ch, filter: f, client: c}
	if len(f.Names) > 0 {
		s.names = make(map[string]bool, len(f.Names))
		for _, name := range f.Names {
			s.names[name] = true
		}
	}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		s.closeChan()
		return s
	}
	c.subs[s] = struct{}{}
	c.mu.Unlock()
	return s
}

// SubscribeNames is Subscribe for a list of event names.
func (c *Client) SubscribeNames(names ...string) *Subscription {
	return c.Subscribe(EventFilter{Names: names})
}

// Dropped is the number of events dropped because C was full.
func (s *Subscription) Dropped() uint64 { return s.dropped.Load() }

// Close ends the subscription and closes C. It is safe to call more than once.
func (s *Subscription) Close() {
	s.client.mu.Lock()
	delete(s.client.subs, s)
	s.client.mu.Unlock()
	s.closeChan()
}

func (s *Subscription) closeChan() {
	s.once.Do(func() {
		s.mu.Lock()
		s.closed = true
		close(s.c)
		s.mu.Unlock()
	})
}

func (s *Subscription) matches(e Event) bool {
	if s.names != nil && !s.names[e.Name] {
		return false
	}
	return s.filter.Match == nil || s.filter.Match(e)
}

func (s *Subscription) deliver(e Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	select {
	case s.c <- e:
	default:
		s.dropped.Add(1)
	}
}

func (c *Client) dispatch(e Event) {
	c.mu.Lock()
	subs := make([]*Subscription, 0, len(c.subs))
	for s := range c.subs {
		subs = append(subs, s)
	}
	c.mu.Unlock()
	for _, s := range subs {
		if s.matches(e) {
			s.deliver(e)
		}
	}
}
