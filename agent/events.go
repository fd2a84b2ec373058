package agent

import (
	"context"
	"sync"
	"time"
)

// Event is one thing that happened on this node.
type Event struct {
	Seq       uint64
	Time      time.Time
	Type      string
	Container string
	Message   string
	Attrs     map[string]string
}

// Event types.
const (
	EventContainerStarted = "container.started"
	EventContainerExited  = "container.exited"
	EventContainerRemoved = "container.removed"
	EventContainerReload  = "container.reattached"
	EventEventsDropped    = "events.dropped"
	EventSysctlDenied     = "sysctl.denied"
)

// eventBus fans events out to subscribers and keeps a short history.
// Publishing never blocks: a subscriber that falls behind by more than its
// buffer gets an events.dropped event and the newest events.
type eventBus struct {
	mu      sync.Mutex
	seq     uint64
	history []Event
	max     int
	subs    map[*subscriber]struct{}
	now     func() time.Time
}

type subscriber struct {
	ch      chan Event
	dropped uint64
}

func newEventBus(historySize int) *eventBus {
	return &eventBus{max: historySize, subs: map[*subscriber]struct{}{}, now: time.Now}
}

// Publish records e and hands it to every subscriber.
func (b *eventBus) Publish(e Event) Event {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	e.Seq = b.seq
	if e.Time.IsZero() {
		e.Time = b.now().UTC()
	}
	b.history = append(b.history, e)
	if len(b.history) > b.max {
		b.history = append(b.history[:0:0], b.history[len(b.history)-b.max:]...)
	}
	for s := range b.subs {
		if s.dropped > 0 {
			select {
			case s.ch <- Event{Seq: e.Seq, Time: e.Time, Type: EventEventsDropped, Message: "subscriber fell behind; events were dropped"}:
				s.dropped = 0
			default:
				s.dropped++
				continue
			}
		}
		select {
		case s.ch <- e:
		default:
			s.dropped++
		}
	}
	return e
}

// Subscribe returns the history (if replay) and a channel of new events,
// closed when ctx is done.
func (b *eventBus) Subscribe(ctx context.Context, replay bool) ([]Event, <-chan Event) {
	s := &subscriber{ch: make(chan Event, 256)}
	b.mu.Lock()
	var past []Event
	if replay {
		past = append(past, b.history...)
	}
	b.subs[s] = struct{}{}
	b.mu.Unlock()
	out := make(chan Event)
	go func() {
		defer close(out)
		defer func() {
			b.mu.Lock()
			delete(b.subs, s)
			b.mu.Unlock()
		}()
		for {
			select {
			case <-ctx.Done():
				return
			case e := <-s.ch:
				select {
				case out <- e:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return past, out
}
