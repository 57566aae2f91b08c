package main

import (
	"context"

	"github.com/kilnworks/kiln/agent"
)

// runAgent is `kiln agent`: the device-side agent, with the simulator as an
// extra TPM choice (kiln-agent, the binary DUTs ship, has no simulator).
func runAgent(ctx context.Context, e *env, args []string) error {
	var o agent.Options
	fs := newFlags(e, "agent")
	o.Flags(fs, "/dev/tpmrm0, swtpm:HOST:PORT, swtpm:unix:PATH or sim")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	log := e.logger()
	return agent.Run(ctx, o, openTPMTransport, log)
}
