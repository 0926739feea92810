package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
)

// TestMeasureAlternates checks the order in which a family's runs are
// made: for each item and concurrency, each repetition runs every side,
// one after the other, with the repetition recorded; a failed run is
// returned and the others still run.
func TestMeasureAlternates(t *testing.T) {
	o := &orchestrator{cfg: &RunConfig{Repeat: 2}, stderr: io.Discard}
	var got []string
	side := func(name string) sideRun {
		return func(_ context.Context, item string, n int) error {
			got = append(got, fmt.Sprintf("%s/c%d/r%d/%s", item, n, o.rep, name))
			if name == "keyless" && item == "b" && n == 8 && o.rep == 1 {
				return errors.New("boom")
			}
			return nil
		}
	}
	errs := o.measure(context.Background(), family{
		items:         []string{"a", "b"},
		concurrencies: []int{1, 8},
		sides:         []sideRun{side("base"), side("keyless")},
	})
	var want []string
	for _, item := range []string{"a", "b"} {
		for _, n := range []int{1, 8} {
			for rep := range 2 {
				for _, s := range []string{"base", "keyless"} {
					want = append(want, fmt.Sprintf("%s/c%d/r%d/%s", item, n, rep, s))
				}
			}
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("runs:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(errs) != 1 || errs[0].Error() != "boom" {
		t.Errorf("errors = %v, want [boom]", errs)
	}
}

func TestSelectedOf(t *testing.T) {
	all := &RunConfig{}
	if got := all.selectedOf("resume", resumeKinds); !slices.Equal(got, resumeKinds) {
		t.Errorf("no selection: selectedOf(resume) = %q, want every kind", got)
	}
	c := &RunConfig{Scenarios: []string{"keyops/ecdsa", "resume/tls12", "edgemem/h2"}}
	for _, tc := range []struct {
		group string
		items []string
		want  []string
	}{
		{"keyops", keyOps, []string{OpECDSASign}},
		{"handshake", handshakeKinds, nil},
		{"resume", resumeKinds, []string{ResumeTLS12}},
		{"edgemem", memProtos, []string{"h2"}},
	} {
		if got := c.selectedOf(tc.group, tc.items); !slices.Equal(got, tc.want) {
			t.Errorf("selectedOf(%s) = %q, want %q", tc.group, got, tc.want)
		}
	}
	o := &orchestrator{cfg: c}
	if got := o.keyopsFamily().items; !slices.Equal(got, []string{OpECDSASign}) {
		t.Errorf("keyopsFamily().items = %q", got)
	}
	if got := o.handshakeFamily().items; len(got) != 0 {
		t.Errorf("handshakeFamily().items = %q, want none", got)
	}
	if got := o.resumeFamily().items; !slices.Equal(got, []string{ResumeTLS12}) {
		t.Errorf("resumeFamily().items = %q", got)
	}
}

func TestServersTLS(t *testing.T) {
	s := &servers{edgeAddr: "127.0.0.1:1", hsmAddr: "127.0.0.1:2", softAddr: "127.0.0.1:3"}
	for name, want := range map[string]string{"keyless": s.edgeAddr, "hsm": s.hsmAddr, "soft": s.softAddr} {
		addr, watch, err := s.tls(name)
		if err != nil || addr != want || watch != "" {
			t.Errorf("tls(%q) = %q, %q, %v; want %q, no processes to watch", name, addr, watch, err, want)
		}
	}
	if _, _, err := s.tls("origin"); err == nil {
		t.Error(`tls("origin") = nil error, want one`)
	}
	if f := (&orchestrator{cfg: &RunConfig{}}).handshakeFamily(); len(f.sides) != 3 {
		t.Errorf("handshakeFamily has %d sides, want 3 (hsm, soft, keyless)", len(f.sides))
	}
	if f := (&orchestrator{cfg: &RunConfig{}}).resumeFamily(); len(f.sides) != 2 {
		t.Errorf("resumeFamily has %d sides, want 2 (soft, keyless)", len(f.sides))
	}
}
