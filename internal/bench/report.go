package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
)

// PrintTable writes rows as aligned text tables, one per kind: each figure
// with its baseline and their ratio, the link figures, the memory figures,
// the reported ratios and the target checks, then a summary of the
// targets.
func PrintTable(w io.Writer, rows []Row) {
	section := func(kind, title, header string, line func(Row) string) {
		var lines []string
		for _, r := range rows {
			if r.Kind == kind {
				lines = append(lines, line(r))
			}
		}
		if len(lines) == 0 {
			return
		}
		fmt.Fprintf(w, "%s\n", title)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, header)
		for _, l := range lines {
			fmt.Fprintln(tw, l)
		}
		tw.Flush()
		fmt.Fprintln(w)
	}
	section("keyops", "KEY OPERATIONS: keyless = client process → gRPC/mTLS → keyserver → SoftHSM; baseline = same key in-process through hsm",
		"name\tkeyless/s\tp50 µs\tp99 µs\tinproc/s\tp50 µs\tp99 µs\tratio\tempty p50 µs\tcpu ratio\tcpu µs/op keyless\tbaseline\tbusy\tops/msg in out\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", r.Name, num(r.OpsPerSec), num(r.P50us), num(r.P99us),
				nump(r.Baseline), num(r.BaselineP50us), num(r.BaselineP99us), ratioStr(r), num(r.EmptyCallP50us),
				rat(r.CPURatio), cpuStr(r.CPU), cpuStr(r.BaselineCPU), busy(r.MachineBusy), sharingStr(r))
		})
	section("handshake", "FULL HANDSHAKES: keyless = edge + keyserver; baseline = crypto/tls with the same SoftHSM key in-process; soft = crypto/tls with a software key",
		"name\tkeyless/s\tp50 µs\tp99 µs\tinproc-hsm/s\tp50 µs\tp99 µs\tratio\tsoft-key/s\tratio\tcpu ratio\tcpu µs/op keyless\tbaseline\tbusy\tops/msg in out\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", r.Name, num(r.OpsPerSec), num(r.P50us), num(r.P99us),
				nump(r.Baseline), num(r.BaselineP50us), num(r.BaselineP99us), ratioStr(r), nump(r.SoftKey), rat(r.SoftKeyRatio),
				rat(r.CPURatio), cpuStr(r.CPU), cpuStr(r.BaselineCPU), busy(r.MachineBusy), sharingStr(r))
		})
	section("resume", "RESUMED HANDSHAKES (no key operation): keyless = edge; baseline = crypto/tls with a software key",
		"name\tkeyless/s\tp50 µs\tp99 µs\tsoft-key/s\tp50 µs\tp99 µs\tratio\tcpu ratio\tcpu µs/op keyless\tbaseline\tbusy\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", r.Name, num(r.OpsPerSec), num(r.P50us), num(r.P99us),
				nump(r.Baseline), num(r.BaselineP50us), num(r.BaselineP99us), ratioStr(r),
				rat(r.CPURatio), cpuStr(r.CPU), cpuStr(r.BaselineCPU), busy(r.MachineBusy))
		})
	section("link", "LINK: full handshakes through an edge whose keyserver link goes through the delay relay (one relay, edge and connection for every RTT); errors are failed handshakes, shed the edge's refusals",
		"name\thandshakes/s\tp50 ms\tp99 ms\terrors\tshed\tcall errors\tcall ms edge ks\tHSM queue\tedge in flight\trelay max KB up down\tcpu µs/op\tbusy\tops/msg in out\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", r.Name, num(r.OpsPerSec), msStr(r.P50us), msStr(r.P99us),
				r.Errors, r.EdgeShed, codesStr(r.KeyserverCallErrors), pairStr(r.EdgeCallMeanMs, r.KeyserverOpMeanMs),
				pairStr(r.HSMQueue[0], r.HSMQueue[1]), pairStr(r.EdgeInFlight[0], r.EdgeInFlight[1]),
				inflightStr(r.RelayMaxInflight), cpuStr(r.CPU), busy(r.MachineBusy), sharingStr(r))
		})
	section("link-keyops", "LINK KEY OPERATIONS: one client connection through the delay relay to the keyserver; frames/op = HTTP/2 frames per operation on that connection, out (to the keyserver) and in",
		"name\tops/s\tp50 ms\tp99 ms\terrors\tempty p50 ms\tframes/op out: DATA HDR PING WU\tin: DATA HDR PING WU\trelay max KB up down\tops/msg in out\tcpu µs/op\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t", r.Name, num(r.OpsPerSec), msStr(r.P50us), msStr(r.P99us),
				r.Errors, msStr(r.EmptyCallP50us), framesDir(r.FramesPerOp, "out"), framesDir(r.FramesPerOp, "in"),
				inflightStr(r.RelayMaxInflight), sharingStr(r), cpuStr(r.CPU))
		})
	section("memory", "EDGE MEMORY",
		"name\tconnections\tKiB heap/conn\tnote\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%d\t%s\t%s\t", r.Name, r.Concurrency, nump(r.Value), r.Note)
		})
	section("fleet", "FLEET: links = per link an edge's two connections (link and health watch), one stream and one identity, one operation in flight on each; baseline = one link with as many in flight; same keyserver",
		"name\tlinks/s\tp50 µs\tp99 µs\tone-link/s\tp50 µs\tp99 µs\tratio\tcpu µs/op links\tone link\tbusy\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", r.Name, num(r.OpsPerSec), num(r.P50us), num(r.P99us),
				nump(r.Baseline), num(r.BaselineP50us), num(r.BaselineP99us), ratioStr(r), cpuStr(r.CPU), cpuStr(r.BaselineCPU), busy(r.MachineBusy))
		})
	section("reported", "REPORTED (ratios of an earlier round, not judged: on two shared CPUs they measure CPU sharing too)",
		"figure\tvalue\tthat round wanted\tfrom\t",
		func(r Row) string {
			v := "-"
			if r.Value != nil {
				v = fmt.Sprintf("%g", *r.Value)
			}
			return fmt.Sprintf("%s\t%s\t%s\t%s\t", strings.TrimPrefix(r.Name, "reported/"), v, r.Want, r.Note)
		})
	section("target", "TARGETS",
		"target\tvalue\twant\tmet\tfrom\t",
		func(r Row) string {
			met := "MISSED"
			if r.Met != nil && *r.Met {
				met = "met"
			}
			v := "-"
			if r.Value != nil {
				v = fmt.Sprintf("%g", *r.Value)
			}
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t", r.Name, v, r.Want, met, r.Note)
		})
	printSummary(w, rows)
}

// printSummary writes one line per target family (the name up to its
// first "/", as "W1"): how many of its targets were met, and the ones
// missed with their values.
func printSummary(w io.Writer, rows []Row) {
	type tally struct {
		met, all int
		missed   []string
	}
	var order []string
	fams := map[string]*tally{}
	for _, r := range rows {
		if r.Kind != "target" {
			continue
		}
		fam, _, _ := strings.Cut(r.Name, "/")
		t := fams[fam]
		if t == nil {
			t = &tally{}
			fams[fam] = t
			order = append(order, fam)
		}
		t.all++
		if r.Met != nil && *r.Met {
			t.met++
		} else {
			v := "-"
			if r.Value != nil {
				v = fmt.Sprintf("%g", *r.Value)
			}
			t.missed = append(t.missed, fmt.Sprintf("%s %s (want %s)", strings.TrimPrefix(r.Name, fam+"/"), v, r.Want))
		}
	}
	if len(order) == 0 {
		return
	}
	fmt.Fprintln(w, "TARGET SUMMARY")
	for _, fam := range order {
		t := fams[fam]
		line := fmt.Sprintf("  %s: %d of %d met", fam, t.met, t.all)
		if len(t.missed) > 0 {
			line += "; missed: " + strings.Join(t.missed, ", ")
		}
		fmt.Fprintln(w, line)
	}
	fmt.Fprintln(w)
}

// pairStr shows two figures as "12.5 3", or "-" when both are zero.
func pairStr(a, b float64) string {
	if a == 0 && b == 0 {
		return "-"
	}
	return fmt.Sprintf("%g %g", a, b)
}

// msStr shows microseconds as milliseconds, or "-" for zero.
func msStr(us float64) string {
	if us == 0 {
		return "-"
	}
	if us < 10_000 {
		return fmt.Sprintf("%.2f", us/1000)
	}
	return fmt.Sprintf("%.1f", us/1000)
}

// inflightStr shows the relay's most bytes in flight, up and down, in KB,
// as "66.1 65.9", or "-".
func inflightStr(v []int64) string {
	if len(v) != 2 {
		return "-"
	}
	return fmt.Sprintf("%.1f %.1f", float64(v[0])/1000, float64(v[1])/1000)
}

// framesDir shows the frames per operation of one direction ("out" or
// "in"): DATA, HEADERS, PING and WINDOW_UPDATE, as "1.00 0.00 0.00 0.01".
func framesDir(m map[string]float64, dir string) string {
	if len(m) == 0 {
		return "-"
	}
	var parts []string
	for _, t := range []string{"DATA", "HEADERS", "PING", "WINDOW_UPDATE"} {
		parts = append(parts, fmt.Sprintf("%.2f", m[dir+" "+t]))
	}
	return strings.Join(parts, " ")
}

// framesStr shows frames per operation of both directions, for progress
// lines: "out DATA 1.00 HEADERS 0.00 PING 0.00 WINDOW_UPDATE 0.00, in …".
func framesStr(m map[string]float64) string {
	return "out DATA HDR PING WU " + framesDir(m, "out") + ", in " + framesDir(m, "in")
}

// ratioStr shows a row's ratio and, when the figure was repeated, the
// range of one repetition's ratio, as "0.89 (0.78–0.95)".
func ratioStr(r Row) string {
	if len(r.RatioRange) != 2 {
		return rat(r.Ratio)
	}
	return fmt.Sprintf("%s (%.2f–%.2f)", rat(r.Ratio), r.RatioRange[0], r.RatioRange[1])
}

// sharingStr shows the operations per stream message received by the
// keyserver and the results per message it sent, as "2.7 1.7", or "-".
func sharingStr(r Row) string {
	if r.OpsPerRequest == 0 && r.ResultsPerResponse == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f %.1f", r.OpsPerRequest, r.ResultsPerResponse)
}

// cpuStr shows CPU µs per operation by process, "other" last, as
// "client 120 keyserver 510 | other 40".
func cpuStr(m map[string]float64) string {
	if len(m) == 0 {
		return "-"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if k != "other" {
			parts = append(parts, fmt.Sprintf("%s %.0f", cpuAbbrev(k), m[k]))
		}
	}
	return strings.Join(parts, " ") + fmt.Sprintf(" | other %.0f", m["other"])
}

// cpuAbbrev shortens process names for the table.
func cpuAbbrev(name string) string {
	switch name {
	case "keyserver":
		return "ks"
	case "loadgen":
		return "lg"
	case "server":
		return "srv"
	}
	return name
}

func busy(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", v*100)
}

func num(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", v)
}

func nump(v *float64) string {
	if v == nil {
		return "-"
	}
	if *v < 100 {
		return fmt.Sprintf("%.1f", *v)
	}
	return fmt.Sprintf("%.0f", *v)
}

func rat(v *float64) string {
	if v == nil {
		return "-"
	}
	return fmt.Sprintf("%.2f", *v)
}

// WriteJSONFile writes rows to path as an indented JSON list.
func WriteJSONFile(path string, rows []Row) error {
	if rows == nil {
		rows = []Row{}
	}
	b, err := json.MarshalIndent(rows, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("bench: write results: %w", err)
	}
	return nil
}

// writeJSON writes v as one JSON line: how child processes report.
func writeJSON(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
