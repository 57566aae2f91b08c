package ui

import (
	"strings"

	"github.com/kilnworks/kiln/station"
)

// Verdict is how a finished run is shown to the operator.
type Verdict struct {
	Title     string // PASS, FAIL, DUPLICATE, WRONG UNIT
	Headline  string // what happened, in a few words
	Reason    string // the run's reason, which says what to do (station.Error messages do)
	Duplicate bool   // a duplicate or clone: shown in its own colour
}

// VerdictOf maps a finished run (or the error of a run that could not even
// be recorded) to operator text. It is the one place where error kinds
// become words on the station screen.
func VerdictOf(r *station.Run, err error) Verdict {
	if r != nil && r.Result == station.ResultPass {
		return Verdict{Title: "PASS", Headline: "Unit provisioned and recorded: it may ship"}
	}
	kind := station.KindOf(err)
	reason := ""
	if err != nil {
		reason = err.Error()
	}
	failedStep := ""
	if r != nil {
		if r.ErrorKind != station.KindOther {
			kind = r.ErrorKind
		}
		if r.Error != "" {
			reason = r.Error
		}
		for _, s := range r.Steps {
			if s.Status == station.StepFail {
				failedStep = s.Name
			}
		}
	}
	if reason == "" {
		reason = "the run ended without a result: run the unit again, and call a supervisor if it happens again"
	}
	v := Verdict{Title: "FAIL", Reason: reason}
	switch kind {
	case station.KindConflict:
		if failedStep == station.StepDuplicates {
			v.Title, v.Duplicate = "DUPLICATE", true
			v.Headline = "Already provisioned, or a clone: set the unit aside"
		} else if failedStep == station.StepIdentify {
			v.Title = "WRONG UNIT"
			v.Headline = "The scanned label is not the unit on this port"
		} else {
			v.Headline = "The unit contradicts what is recorded: set it aside"
		}
	case station.KindInvalid:
		v.Headline = "The unit or its label cannot be used as it is"
	case station.KindNotFound:
		v.Headline = "Something the unit needs is missing"
	case station.KindUnauthorized:
		v.Headline = "The unit's identity did not check out: set it aside"
	case station.KindUnavailable:
		v.Headline = "The unit or a service did not answer: check the cable, then run it again"
	case station.KindInternal:
		v.Headline = "Station fault: call a supervisor"
	default:
		v.Headline = "The unit was not provisioned"
	}
	return v
}

// stepTitles are the operator names of the workflow's steps.
var stepTitles = map[string]string{
	station.StepConnect:    "Connect",
	station.StepIdentify:   "Identify",
	station.StepReadEK:     "Read EK",
	station.StepValidateEK: "Validate EK certificate",
	station.StepDuplicates: "Check duplicates",
	station.StepEnroll:     "Enroll",
	station.StepConfigure:  "Write config",
	station.StepRegister:   "Verify on DPS",
	station.StepHub:        "Verify hub",
	station.StepProduction: "Production config",
	station.StepRecord:     "Record",
}

// StepTitle returns the operator name of a step.
func StepTitle(name string) string {
	if t, ok := stepTitles[name]; ok {
		return t
	}
	if name == "" {
		return ""
	}
	return strings.ToUpper(name[:1]) + strings.ReplaceAll(name[1:], "-", " ")
}
