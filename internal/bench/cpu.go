package bench

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// cpuSample is the CPU time used so far by some processes and by the whole
// machine, in clock ticks.
type cpuSample struct {
	procs   map[string]uint64 // by name
	busy    uint64            // all CPUs, not idle
	total   uint64            // all CPUs, idle included
	missing bool              // /proc could not be read
}

// procCPU returns the user+system CPU time of a process, all threads, in
// clock ticks, from /proc/PID/stat.
func procCPU(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseProcStat(string(b))
}

// parseProcStat returns utime+stime from the contents of /proc/PID/stat.
// The command name (field 2) is in parentheses and may hold spaces, so
// fields are counted from the last ')'.
func parseProcStat(s string) (uint64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bench: malformed /proc stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, errors.New("bench: short /proc stat")
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("bench: /proc stat: %w", err)
	}
	return u + st, nil
}

// parseMachineStat returns the busy and total clock ticks of all CPUs from
// the contents of /proc/stat (its first "cpu" line). Busy is everything
// but idle and iowait.
func parseMachineStat(s string) (busy, total uint64, err error) {
	line, _, _ := strings.Cut(s, "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, errors.New("bench: malformed /proc/stat")
	}
	for i, v := range f[1:] {
		if i >= 8 { // guest times are already in user and nice
			break
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("bench: /proc/stat: %w", err)
		}
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total, nil
}

// sampleCPU reads the CPU times of the processes in pids (by name) and of
// the machine. Processes that cannot be read are left out.
func sampleCPU(pids map[string]int) cpuSample {
	s := cpuSample{procs: make(map[string]uint64, len(pids))}
	for name, pid := range pids {
		if t, err := procCPU(pid); err == nil {
			s.procs[name] = t
		} else {
			s.missing = true
		}
	}
	b, err := os.ReadFile("/proc/stat")
	if err == nil {
		s.busy, s.total, err = parseMachineStat(string(b))
	}
	if err != nil {
		s.missing = true
	}
	return s
}

// cpuPerOp turns two samples into microseconds of CPU per operation for
// each process, plus "other" (the rest of the machine: processes not
// watched, including anything else running on it), and the fraction of
// the machine that was busy.
func cpuPerOp(a, b cpuSample, ops int64) (map[string]float64, float64) {
	if ops <= 0 || a.missing || b.missing || b.total <= a.total {
		return nil, 0
	}
	perOp := func(ticks uint64) float64 {
		return round1(float64(ticks) / clockTicks * 1e6 / float64(ops))
	}
	out := make(map[string]float64, len(b.procs)+1)
	var ours uint64
	for name, t := range b.procs {
		if t0, ok := a.procs[name]; ok && t >= t0 {
			out[name] = perOp(t - t0)
			ours += t - t0
		}
	}
	busy := b.busy - a.busy
	if busy > ours {
		out["other"] = perOp(busy - ours)
	} else {
		out["other"] = 0
	}
	return out, round3(float64(busy) / float64(b.total-a.total))
}

// parseWatch parses "name=pid,name=pid".
func parseWatch(s string) (map[string]int, error) {
	out := make(map[string]int)
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item == "" {
			continue
		}
		name, v, ok := strings.Cut(item, "=")
		pid, err := strconv.Atoi(v)
		if !ok || name == "" || err != nil || pid <= 0 {
			return nil, fmt.Errorf("bench: -watch %q: want name=pid", item)
		}
		out[name] = pid
	}
	return out, nil
}
