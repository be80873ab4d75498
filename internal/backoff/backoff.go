// Package backoff owns the one doubling back-off of connectable: every
// retry, re-check and probe schedule in the tree is a Backoff, so that the
// rule (start at Min, double on each failure, stop at Max, start over on
// success) is written once.
//
// Typical usage:
//
//	b := backoff.Backoff{Min: time.Second, Max: 30 * time.Second}
//	for {
//		if err := try(); err == nil {
//			b.Reset()
//			...
//		}
//		time.Sleep(b.Next())
//	}
//
// A Backoff is a value without a lock: its owner serialises its use.
package backoff

import "time"

// Backoff is a doubling delay between Min and Max. The zero value with Min
// and Max set is ready to use.
type Backoff struct {
	Min, Max time.Duration
	cur      time.Duration
}

// Next returns the delay before the next try: Min after a Reset, then twice
// the previous one, at most Max.
func (b *Backoff) Next() time.Duration {
	switch {
	case b.cur == 0:
		b.cur = b.Min
	default:
		b.cur = min(2*b.cur, b.Max)
	}
	b.cur = max(min(b.cur, b.Max), 0)
	if b.Max < b.Min {
		b.cur = b.Min
	}
	return b.cur
}

// Current returns the delay Next last returned, 0 after a Reset.
func (b *Backoff) Current() time.Duration { return b.cur }

// Reset starts the schedule over: the next delay is Min.
func (b *Backoff) Reset() { b.cur = 0 }

// Streak returns the delay after n failures in a row without changing b: 0
// for n <= 0, Min for 1, doubling, at most Max.
func (b Backoff) Streak(n int) time.Duration {
	if n <= 0 {
		return 0
	}
	b.Reset()
	var d time.Duration
	for i := 0; i < n; i++ {
		d = b.Next()
		if d >= b.Max {
			break
		}
	}
	return d
}
