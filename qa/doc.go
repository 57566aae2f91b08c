// Package qa runs on-bench QA scenarios against a station: a scenario names
// the units (simulated DUTs or real ports), the method, the faults injected,
// the repetitions and the slots provisioned in parallel, and the outcome
// expected of every unit. The runner provisions the units through the
// station's own Provisioner, checks each outcome against the expectation,
// and writes the evidence as JUnit XML (for CI) and as an HTML report (for
// people).
//
// The package knows the scenario format, the fault names and the reports.
// What a fault does to a DPS or how a simulated DUT is started is the
// station's business: cmd/kiln implements Bench and wires the devserver,
// the store and the DUT processes.
package qa
