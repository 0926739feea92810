// Package deploy holds the files an operator deploys beside the programs:
// Prometheus alerting rules (prometheus/) and a Grafana dashboard
// (grafana/). Its tests check them against promtool and against the metric
// names the code registers.
package deploy

import (
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// promtool runs promtool with args and fails the test on an error.
func promtool(t *testing.T, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatal("promtool is not installed (make test installs it; on Debian: apt-get install prometheus)")
	}
	out, err := exec.Command("promtool", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestRulesCheck(t *testing.T) {
	promtool(t, "check", "rules", "prometheus/keyless-rules.yml")
}

func TestRulesUnit(t *testing.T) {
	promtool(t, "test", "rules", "prometheus/keyless-rules.test.yml")
}

// codeMetrics returns the names of the metrics the repository's Go code
// registers: "keyless" Namespace/Subsystem/Name triples, full
// "keyless_..." Names, and the names of prometheus.NewDesc (collectors).
func codeMetrics(t *testing.T) map[string]bool {
	t.Helper()
	triple := regexp.MustCompile(`Namespace:\s*"keyless",\s*Subsystem:\s*"(\w+)",\s*Name:\s*"(\w+)"`)
	full := regexp.MustCompile(`(?:Name:\s*|prometheus\.NewDesc\(\s*)"(keyless_\w+)"`)
	names := map[string]bool{}
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range triple.FindAllStringSubmatch(string(src), -1) {
			names["keyless_"+m[1]+"_"+m[2]] = true
		}
		for _, m := range full.FindAllStringSubmatch(string(src), -1) {
			names[m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"keyless_edge_handshakes_total", "keyless_keyserver_operations_total", "keyless_keyserver_hsm_sessions"} {
		if !names[n] {
			t.Fatalf("the scan of the code did not find %s; it finds %d names", n, len(names))
		}
	}
	return names
}

// queried returns the keyless metric names in text (PromQL), without the
// _bucket, _sum and _count suffixes of histogram series.
func queried(text string) []string {
	var out []string
	for _, n := range regexp.MustCompile(`\bkeyless_[a-z0-9_]+`).FindAllString(text, -1) {
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			n = strings.TrimSuffix(n, suffix)
		}
		out = append(out, n)
	}
	return out
}

func TestRulesUseExistingMetrics(t *testing.T) {
	names := codeMetrics(t)
	rules, err := os.ReadFile("prometheus/keyless-rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range queried(string(rules)) {
		if !names[n] {
			t.Errorf("keyless-rules.yml uses %s, which the code does not register", n)
		}
	}
}

// panel is the part of a Grafana panel the test reads.
type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
}

func TestDashboard(t *testing.T) {
	data, err := os.ReadFile("grafana/keyless-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string  `json:"uid"`
		Title  string  `json:"title"`
		Panels []panel `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("the dashboard is not valid JSON: %v", err)
	}
	if dash.UID == "" || dash.Title == "" || len(dash.Panels) == 0 {
		t.Fatalf("the dashboard has uid %q, title %q and %d panels; want all three", dash.UID, dash.Title, len(dash.Panels))
	}
	names := codeMetrics(t)
	used := map[string]bool{}
	ids := map[int]bool{}
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d is used twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q queries nothing", p.Title)
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q does not use the datasource variable", p.Title)
		}
		for _, tg := range p.Targets {
			metrics := queried(tg.Expr)
			if len(metrics) == 0 {
				t.Errorf("panel %q target %s queries no keyless metric: %s", p.Title, tg.RefID, tg.Expr)
			}
			for _, n := range metrics {
				used[n] = true
				if !names[n] {
					t.Errorf("panel %q queries %s, which the code does not register", p.Title, n)
				}
			}
		}
	}
	// What the dashboard is for: both programs, and the edge's view of
	// each keyserver.
	for _, n := range []string{"keyless_keyserver_operations_total", "keyless_keyserver_operation_duration_seconds",
		"keyless_keyserver_hsm_up", "keyless_keyserver_hsm_queue_depth", "keyless_edge_handshakes_total",
		"keyless_edge_keyserver_up", "keyless_edge_keyserver_call_duration_seconds", "keyless_edge_keyserver_call_retries_total"} {
		if !used[n] {
			t.Errorf("the dashboard does not show %s", n)
		}
	}
	var missing []string
	for n := range names {
		if !used[n] {
			missing = append(missing, n)
		}
	}
	sort.Strings(missing)
	t.Logf("metrics not on the dashboard: %s", strings.Join(missing, ", "))
}
