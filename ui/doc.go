// Package ui holds Kiln's station GUI: the Station screen a line technician
// works at (scan → run → PASS/FAIL → next, one tile per slot, health tiles),
// the Records screen (search, and export of one unit's evidence), the
// Batches screen (seal, push, export and enable batches, with progress),
// the Devserver screen (the embedded DPS) and the Settings screen, with an
// operator login whose supervisor role needs a password. It declares the
// small interfaces it needs (Provisioner, Records, BatchActions, Auth,
// Settings, Devserver, Simulator) and imports station and Fyne only: it
// never creates the Fyne app, cmd/kiln does, so the screens test headless
// with fyne.io/fyne/v2/test.
//
// Provisioning, batch work and password checks run off the UI goroutine;
// every widget change they cause is handed to the UI goroutine (fyne.Do, or
// Config.Do).
package ui
