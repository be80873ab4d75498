package main

import (
	"runtime"
	"testing"
)

func TestSetProcs(t *testing.T) {
	prev := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(prev) })
	for _, tc := range []struct {
		start int
		env   string
		want  int
	}{
		{start: 1, want: 1},
		{start: 2, want: 1},
		{start: 3, want: 1},
		{start: 8, want: 4},
		{start: 8, env: "8", want: 8}, // the operator's number stands
		{start: 2, env: "2", want: 2},
	} {
		runtime.GOMAXPROCS(tc.start)
		got := setProcs(func(k string) string {
			if k == "GOMAXPROCS" {
				return tc.env
			}
			return ""
		})
		if got != tc.want || runtime.GOMAXPROCS(0) != tc.want {
			t.Errorf("start %d, GOMAXPROCS=%q: setProcs = %d, in effect %d, want %d",
				tc.start, tc.env, got, runtime.GOMAXPROCS(0), tc.want)
		}
	}
}
