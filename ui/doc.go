// Package ui holds Kiln's station GUI: the Station screen a line technician
// works at (scan → run → PASS/FAIL → next), the Records screen (search and
// export of one unit's evidence) and the Devserver screen (the embedded
// DPS). It declares the small interfaces it needs (Provisioner, Records,
// Devserver, Simulator) and imports station and Fyne only: it never creates
// the Fyne app, cmd/kiln does, so the screens test headless with
// fyne.io/fyne/v2/test.
//
// Provisioning runs off the UI goroutine; every widget change it causes is
// handed to the UI goroutine (fyne.Do, or Config.Do).
package ui
