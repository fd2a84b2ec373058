package agent

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/ferry-agent/ferry/agent/api"
)

func TestEventBusReplayAndFollow(t *testing.T) {
	b := newEventBus(3)
	for i := 0; i < 5; i++ {
		b.Publish(Event{Type: "t", Message: string(rune('a' + i))})
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	past, ch := b.Subscribe(ctx, true)
	if len(past) != 3 || past[0].Message != "c" || past[2].Seq != 5 {
		t.Fatalf("history %+v, want the last 3 (c..e)", past)
	}
	b.Publish(Event{Type: "t", Message: "f"})
	select {
	case e := <-ch:
		if e.Message != "f" || e.Seq != 6 {
			t.Fatalf("got %+v", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	cancel()
	for range ch {
	}
}

func TestEventBusSlowSubscriberDoesNotBlock(t *testing.T) {
	b := newEventBus(10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, ch := b.Subscribe(ctx, false)
	done := make(chan struct{})
	go func() {
		for i := 0; i < 2000; i++ {
			b.Publish(Event{Type: "t"})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Publish blocked on a subscriber that does not read")
	}
	sawDrop := false
drain:
	for {
		select {
		case e := <-ch:
			if e.Type == EventEventsDropped {
				sawDrop = true
			}
		case <-time.After(100 * time.Millisecond):
			break drain
		}
	}
	b.Publish(Event{Type: "t"})
	deadline := time.After(2 * time.Second)
	for !sawDrop {
		select {
		case e := <-ch:
			sawDrop = e.Type == EventEventsDropped
		case <-deadline:
			t.Fatal("the slow subscriber was not told events were dropped")
		}
	}
}

func TestChunkWriterReusesItsBuffer(t *testing.T) {
	var got [][]byte
	var parts []string
	w := &chunkWriter{id: "m-1", part: "images", send: func(c *api.ImageChunk) error {
		got = append(got, append([]byte(nil), c.Data...)) // Send encodes before it returns
		parts = append(parts, c.Part+"/"+c.MigrationId)
		return nil
	}}
	data := make([]byte, 2*chunkSize+10)
	for i := range data {
		data[i] = byte(i)
	}
	if n, err := w.Write(data[:7]); n != 7 || err != nil {
		t.Fatal(n, err)
	}
	if n, err := w.Write(data[7:]); n != len(data)-7 || err != nil {
		t.Fatal(n, err)
	}
	if err := w.flush(); err != nil {
		t.Fatal(err)
	}
	var all []byte
	for _, g := range got {
		all = append(all, g...)
	}
	if len(got) != 3 || !bytes.Equal(all, data) || w.n != int64(len(data)) {
		t.Fatalf("%d chunks, %d bytes, n=%d", len(got), len(all), w.n)
	}
	if parts[0] != "images/m-1" || parts[1] != "images/" {
		t.Errorf("migration id on chunks: %v", parts)
	}
}
