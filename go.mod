module github.com/kilnworks/kiln

go 1.26

require (
	github.com/creack/pty v1.1.24
	github.com/google/go-cmp v0.7.0
	github.com/google/go-tpm v0.9.8
	github.com/google/go-tpm-tools v0.4.10
	github.com/mattn/go-sqlite3 v1.14.53
	go.bug.st/serial v1.8.0
)

require golang.org/x/sys v0.45.0 // indirect
