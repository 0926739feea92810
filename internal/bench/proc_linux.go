package bench

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes the kernel kill the child when the orchestrator
// dies, so that no process outlives a bench run.
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
