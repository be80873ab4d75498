package backoff

import (
	"testing"
	"time"
)

func TestNext(t *testing.T) {
	b := Backoff{Min: time.Second, Max: 5 * time.Second}
	want := []time.Duration{1, 2, 4, 5, 5}
	for i, w := range want {
		if got := b.Next(); got != w*time.Second {
			t.Fatalf("delay %d: got %v; want %v", i, got, w*time.Second)
		}
	}
	if got := b.Current(); got != 5*time.Second {
		t.Errorf("Current: got %v; want 5s", got)
	}
	b.Reset()
	if got := b.Current(); got != 0 {
		t.Errorf("Current after Reset: got %v; want 0", got)
	}
	if got := b.Next(); got != time.Second {
		t.Errorf("after Reset: got %v; want 1s", got)
	}
}

func TestMaxBelowMin(t *testing.T) {
	b := Backoff{Min: 2 * time.Second, Max: time.Second}
	for i := 0; i < 3; i++ {
		if got := b.Next(); got != 2*time.Second {
			t.Fatalf("delay %d: got %v; want Min, 2s", i, got)
		}
	}
}

func TestStreak(t *testing.T) {
	b := Backoff{Min: time.Second, Max: 30 * time.Second}
	for n, want := range map[int]time.Duration{-1: 0, 0: 0, 1: time.Second, 2: 2 * time.Second, 5: 16 * time.Second, 6: 30 * time.Second, 1000: 30 * time.Second} {
		if got := b.Streak(n); got != want {
			t.Errorf("Streak(%d): got %v; want %v", n, got, want)
		}
	}
	if b.Current() != 0 {
		t.Errorf("Streak changed its receiver's copy: Current %v", b.Current())
	}
}
