//go:build !linux

package bench

import "os/exec"

// setDeathSignal does nothing here: only Linux has a parent-death signal.
// Children still stop by themselves (every mode has a lifetime).
func setDeathSignal(*exec.Cmd) {}
