package main

import (
	"flag"
	"io"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/devserver"
)

func TestServeQuotaFlags(t *testing.T) {
	dpsCounts := devserver.Quotas{MaxEnrollments: 1_000_000, MaxRegistrations: 1_000_000,
		MaxSymmetricKeyGroups: 100, MaxX509Groups: 100, MaxMessageBytes: 96 << 10, MaxBulkItems: 10}
	withRates := dpsCounts
	withRates.RegistrationsPerMinute, withRates.OperationsPerMinute = 1000, 1000
	withRates.PollsPerDevice, withRates.PollWindow = 5, 10*time.Second
	custom := withRates
	custom.PollsPerDevice, custom.PollWindow, custom.MaxEnrollments, custom.MaxMessageBytes = 2, 4*time.Second, -1, 4096
	custom.MaxBulkItems = -1

	tests := []struct {
		name    string
		args    []string
		want    devserver.Quotas
		wantErr bool
	}{
		{"DPS's by default", nil, withRates, false},
		{"line speed", []string{"--throttle=false"}, dpsCounts, false},
		{"custom", []string{"--polls-per-device", "2", "--poll-window", "4s", "--max-enrollments", "0", "--max-message-bytes", "4096", "--max-bulk-items", "0"}, custom, false},
		{"negative rate", []string{"--operations-per-minute", "-1"}, devserver.Quotas{}, true},
		{"negative count", []string{"--max-registrations", "-5"}, devserver.Quotas{}, true},
		{"no message size", []string{"--max-message-bytes", "0"}, devserver.Quotas{}, true},
		{"zero poll window", []string{"--poll-window", "0s"}, devserver.Quotas{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := flag.NewFlagSet("serve", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			read := quotaFlags(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			got, err := read()
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want error %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("quotas (-want +got):\n%s", d)
			}
		})
	}
}

func TestServeThrottleText(t *testing.T) {
	q := devserver.DPSQuotas()
	if got, want := throttleText(q), "1000 registrations/min, 1000 service operations/min, 5 polls per device per 10s (429 with retry-after beyond; --throttle=false for line speed)"; got != want {
		t.Errorf("DPS's: %q, want %q", got, want)
	}
	if got := throttleText(devserver.Quotas{}); got != "off (line speed)" {
		t.Errorf("none: %q", got)
	}
}
