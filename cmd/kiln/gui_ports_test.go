package main

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.bug.st/serial/enumerator"

	"github.com/kilnworks/kiln/ui"
)

func TestPortChoices(t *testing.T) {
	got := portChoices([]*enumerator.PortDetails{
		{Name: "/dev/ttyACM0", IsUSB: true, VID: "2e8a", PID: "000a", SerialNumber: "E6614103"},
		{Name: "/dev/ttyUSB0", IsUSB: true, VID: "0403", PID: "6001"},
		{Name: "/dev/ttyS0"},
	})
	want := []ui.Port{
		{Path: "/dev/ttyACM0", Description: "USB 2e8a:000a SN E6614103"},
		{Path: "/dev/ttyUSB0", Description: "USB 0403:6001"},
		{Path: "/dev/ttyS0"},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("portChoices (-want +got):\n%s", d)
	}
}
