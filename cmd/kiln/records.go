package main

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/kilnworks/kiln/station"
)

func runRecords(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("say list or show: kiln records list [--serial S] [--result pass|fail] [--since DATE] [--limit N] [--json], kiln records show RUN-ID|SERIAL [--json]")
	}
	switch args[0] {
	case "list":
		return recordsList(ctx, e, args[1:])
	case "show":
		return recordsShow(ctx, e, args[1:])
	}
	return usagef("unknown records command %q: use list or show", args[0])
}

func recordsList(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	fs := newFlags(e, "records list")
	var f station.RunFilter
	fs.StringVar(&f.Serial, "serial", "", "only runs of this serial number")
	fs.Func("result", "only runs with this result: pass, fail or running", func(s string) error {
		switch r := station.Result(s); r {
		case station.ResultPass, station.ResultFail, station.ResultRunning:
			f.Result = r
			return nil
		}
		return fmt.Errorf("%q is not pass, fail or running", s)
	})
	fs.Func("since", "only runs started at or after this date (2006-01-02) or time (RFC 3339)", func(s string) error {
		t, err := parseTime(s)
		f.Since = t
		return err
	})
	fs.Func("until", "only runs started before this date or time", func(s string) error {
		t, err := parseTime(s)
		f.Until = t
		return err
	})
	fs.IntVar(&f.Limit, "limit", 50, "at most this many runs, newest first")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	store, err := c.openStore(ctx)
	if err != nil {
		return err
	}
	defer store.Close()
	runs, err := store.Runs(ctx, f)
	if err != nil {
		return err
	}
	if *asJSON {
		out := make([]runRecord, 0, len(runs))
		for _, r := range runs {
			out = append(out, runJSON(r))
		}
		return writeJSON(e, out)
	}
	if len(runs) == 0 {
		fmt.Fprintln(e.stdout, "no runs match")
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RUN\tSTARTED\tSERIAL\tRESULT\tSECONDS\tPORT\tOPERATOR\tREASON")
	for _, r := range runs {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%.2f\t%s\t%s\t%s\n", r.ID, r.Started.Local().Format(time.DateTime), r.Serial,
			r.Result, r.Duration().Seconds(), r.Port, r.Operator, clip(r.Error, 60))
	}
	return tw.Flush()
}

func recordsShow(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	fs := newFlags(e, "records show")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args, true); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("name one run ID or serial number")
	}
	store, err := c.openStore(ctx)
	if err != nil {
		return err
	}
	defer store.Close()
	key := fs.Arg(0)
	var run *station.Run
	if id, perr := strconv.ParseInt(key, 10, 64); perr == nil {
		run, err = store.Run(ctx, id)
	} else {
		var runs []*station.Run
		runs, err = store.Runs(ctx, station.RunFilter{Serial: key, Limit: 1})
		if err == nil && len(runs) == 0 {
			err = station.Errorf("show record", station.KindNotFound, "no run of serial %s: check the serial with kiln records list", key)
		}
		if err == nil {
			run = runs[0]
		}
	}
	if err != nil {
		return err
	}
	unit, err := store.UnitBySerial(ctx, run.Serial)
	if err != nil && station.KindOf(err) != station.KindNotFound {
		return err
	}
	if unit != nil && unit.RunID != run.ID {
		unit = nil // the unit was recorded by another run of the same serial
	}
	if *asJSON {
		return writeJSON(e, struct {
			Run  runRecord     `json:"run"`
			Unit *station.Unit `json:"unit,omitempty"`
		}{runJSON(run), unit})
	}
	w := e.stdout
	fmt.Fprintf(w, "run %d  %s  %s\n", run.ID, run.Serial, run.Result)
	fmt.Fprintf(w, "  started    %s (%s)\n", run.Started.Local().Format(time.RFC3339), secs(run.Duration()))
	fmt.Fprintf(w, "  station    %s, port %s, operator %s, method %s\n", run.Station, run.Port, run.Operator, run.Method)
	if run.Model != "" || run.Firmware != "" {
		fmt.Fprintf(w, "  device     model %s, firmware %s\n", run.Model, run.Firmware)
	}
	if run.RegistrationID != "" {
		fmt.Fprintf(w, "  reg. ID    %s\n", run.RegistrationID)
	}
	if run.EKHash != "" {
		fmt.Fprintf(w, "  EK sha256  %s\n", run.EKHash)
	}
	if run.DPSStatus != "" {
		fmt.Fprintf(w, "  DPS        %s, hub %s, device %s\n", run.DPSStatus, run.AssignedHub, run.DeviceID)
	}
	if !run.TelemetryAt.IsZero() {
		fmt.Fprintf(w, "  telemetry  seen by the hub %s\n", run.TelemetryAt.Local().Format(time.RFC3339Nano))
	}
	fmt.Fprintf(w, "  link       %d bytes out, %d bytes in\n", run.BytesOut, run.BytesIn)
	if run.Error != "" {
		fmt.Fprintf(w, "  reason     %s\n", run.Error)
	}
	fmt.Fprintln(w, "  steps")
	for _, s := range run.Steps {
		printStep(w, s)
	}
	if unit != nil {
		fmt.Fprintf(w, "  unit       recorded %s\n", unit.Created.Local().Format(time.RFC3339))
		if len(unit.EKPublic) > 0 {
			fmt.Fprintf(w, "  EK public  %s\n", clip(hex.EncodeToString(unit.EKPublic), 64))
		}
		if len(unit.EKCert) > 0 {
			fmt.Fprintf(w, "  EK cert    %d bytes DER\n", len(unit.EKCert))
		}
		if len(unit.Certificate) > 0 {
			subject := "(does not parse)"
			if c, err := x509.ParseCertificate(unit.Certificate); err == nil {
				subject = fmt.Sprintf("%s, issued by %s, valid to %s", c.Subject, c.Issuer, c.NotAfter.Format(time.DateOnly))
			}
			fmt.Fprintf(w, "  cert       %s\n  serial     %s\n  thumbprint %s (SHA-256)\n  key        in %s storage\n", subject, unit.CertSerial, unit.CertThumbprint, unit.KeyStorage)
		}
		if unit.EnrollmentGroup != "" {
			fmt.Fprintf(w, "  group      %s\n", unit.EnrollmentGroup)
		}
		if unit.SymKeySHA256 != "" {
			fmt.Fprintf(w, "  key sha256 %s\n", unit.SymKeySHA256)
		}
	}
	return nil
}

func writeJSON(e *env, v any) error {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func parseTime(s string) (time.Time, error) {
	if t, err := time.ParseInLocation(time.DateOnly, s, time.Local); err == nil {
		return t, nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither a date (2006-01-02) nor an RFC 3339 time", s)
	}
	return t, nil
}

func clip(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}
