package qa

import (
	"encoding/xml"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// JUnit XML, in the shape CI systems read (Jenkins, GitLab, GitHub
// reporters): a testsuite per scenario; in it a testcase per unit and step
// (classname scenario.unit, name the step) and one "expectation" testcase
// per unit. A failure is an expectation not met; a step that fails as the
// scenario expects is not a failure, its reason is in system-out.

// JUnitSuites is the <testsuites> document.
type JUnitSuites struct {
	XMLName  xml.Name     `xml:"testsuites"`
	Name     string       `xml:"name,attr"`
	Tests    int          `xml:"tests,attr"`
	Failures int          `xml:"failures,attr"`
	Errors   int          `xml:"errors,attr"`
	Skipped  int          `xml:"skipped,attr"`
	Time     float64      `xml:"time,attr"`
	Suites   []JUnitSuite `xml:"testsuite"`
}

// JUnitSuite is one scenario.
type JUnitSuite struct {
	Name       string          `xml:"name,attr"`
	Tests      int             `xml:"tests,attr"`
	Failures   int             `xml:"failures,attr"`
	Errors     int             `xml:"errors,attr"`
	Skipped    int             `xml:"skipped,attr"`
	Time       float64         `xml:"time,attr"`
	Timestamp  string          `xml:"timestamp,attr"`
	Properties []JUnitProperty `xml:"properties>property,omitempty"`
	Cases      []JUnitCase     `xml:"testcase"`
}

// JUnitProperty is a name and value of a suite.
type JUnitProperty struct {
	Name  string `xml:"name,attr"`
	Value string `xml:"value,attr"`
}

// JUnitCase is one unit's step, or its expectation.
type JUnitCase struct {
	Name      string        `xml:"name,attr"`
	ClassName string        `xml:"classname,attr"`
	Time      float64       `xml:"time,attr"`
	Failure   *JUnitMessage `xml:"failure,omitempty"`
	Skipped   *JUnitMessage `xml:"skipped,omitempty"`
	SystemOut string        `xml:"system-out,omitempty"`
}

// JUnitMessage is a failure or a skip with its reason.
type JUnitMessage struct {
	Message string `xml:"message,attr"`
	Type    string `xml:"type,attr,omitempty"`
	Text    string `xml:",chardata"`
}

// JUnit builds the JUnit document of a report.
func JUnit(rep *Report) *JUnitSuites {
	doc := &JUnitSuites{Name: "kiln qa", Time: rep.Duration.Seconds()}
	for _, s := range rep.Scenarios {
		suite := JUnitSuite{Name: s.Name, Time: s.Duration.Seconds(), Timestamp: s.Started.UTC().Format(time.RFC3339)}
		passed, total := s.Yield()
		suite.Properties = []JUnitProperty{
			{"method", string(s.Method)},
			{"slots", fmt.Sprint(s.Slots)},
			{"outcome", string(s.Outcome)},
			{"yield", fmt.Sprintf("%d/%d", passed, total)},
		}
		if s.Scenario != nil {
			for _, f := range s.Scenario.Faults {
				suite.Properties = append(suite.Properties, JUnitProperty{"fault", f.String()})
			}
		}
		if s.Reason != "" {
			suite.Properties = append(suite.Properties, JUnitProperty{"reason", s.Reason})
		}
		for _, u := range s.Units {
			suite.Cases = append(suite.Cases, unitCases(s, u)...)
		}
		for _, c := range suite.Cases {
			suite.Tests++
			if c.Failure != nil {
				suite.Failures++
			}
			if c.Skipped != nil {
				suite.Skipped++
			}
		}
		doc.Tests += suite.Tests
		doc.Failures += suite.Failures
		doc.Skipped += suite.Skipped
		doc.Suites = append(doc.Suites, suite)
	}
	return doc
}

func unitCases(s *ScenarioResult, u *UnitResult) []JUnitCase {
	class := s.Name + "." + u.Name()
	if u.Outcome == NotAvailable {
		return []JUnitCase{{Name: "expectation", ClassName: class, Skipped: &JUnitMessage{Message: u.Why}}}
	}
	var cases []JUnitCase
	if u.Run != nil {
		for _, st := range u.Run.Steps {
			c := JUnitCase{Name: st.Name, ClassName: class, Time: st.Duration.Seconds()}
			var out []string
			if st.Detail != "" {
				out = append(out, st.Detail)
			}
			switch st.Status {
			case station.StepSkip:
				c.Skipped = &JUnitMessage{Message: st.Detail}
			case station.StepWarn:
				out = append(out, "warning: "+st.Error)
			case station.StepFail:
				if u.Outcome == Met {
					out = append(out, "failed as expected ("+u.Expect+"): "+st.Error)
				} else {
					c.Failure = &JUnitMessage{Message: st.Error, Type: u.Kind, Text: u.Why}
				}
			}
			c.SystemOut = strings.Join(out, "\n")
			cases = append(cases, c)
		}
	}
	c := JUnitCase{Name: "expectation", ClassName: class, Time: u.Duration.Seconds()}
	c.SystemOut = fmt.Sprintf("serial %s on %s, slot %d: expected %s", u.Serial, u.Port, u.Slot, u.Expect)
	if u.Error != "" {
		c.SystemOut += "\nreason: " + u.Error
	}
	if u.Outcome != Met {
		c.Failure = &JUnitMessage{Message: u.Why, Type: "expectation", Text: u.Error}
	}
	return append(cases, c)
}

// WriteJUnit writes the report as JUnit XML.
func WriteJUnit(w io.Writer, rep *Report) error {
	if _, err := io.WriteString(w, xml.Header); err != nil {
		return err
	}
	enc := xml.NewEncoder(w)
	enc.Indent("", "  ")
	if err := enc.Encode(JUnit(rep)); err != nil {
		return fmt.Errorf("write JUnit XML: %w", err)
	}
	_, err := io.WriteString(w, "\n")
	return err
}
