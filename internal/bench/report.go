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
// with its baseline and their ratio, then the memory figures and the
// target checks.
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
	section("memory", "EDGE MEMORY",
		"name\tconnections\tKiB heap/conn\tnote\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%d\t%s\t%s\t", r.Name, r.Concurrency, nump(r.Value), r.Note)
		})
	section("fleet", "FLEET: links = one connection, stream and identity per link, one operation in flight on each; baseline = one link with as many in flight; same keyserver",
		"name\tlinks/s\tp50 µs\tp99 µs\tone-link/s\tp50 µs\tp99 µs\tratio\tcpu µs/op links\tone link\tbusy\t",
		func(r Row) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", r.Name, num(r.OpsPerSec), num(r.P50us), num(r.P99us),
				nump(r.Baseline), num(r.BaselineP50us), num(r.BaselineP99us), ratioStr(r), cpuStr(r.CPU), cpuStr(r.BaselineCPU), busy(r.MachineBusy))
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
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t", strings.TrimPrefix(r.Name, "target/"), v, r.Want, met, r.Note)
		})
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
