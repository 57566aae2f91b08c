// Package fynelocale gives Fyne a locale it can parse when the process has
// none (LANG unset, C or POSIX, as under systemd, cron and CI). Fyne reads
// the locale while it initialises and logs an error for "C" on every kiln
// command; importing this package first (its import path sorts before
// golang.org/x/text, which Fyne's locale code waits for) sets LANG to
// en_US.UTF-8 in that case only. A real locale is left alone.
package fynelocale

import "os"

func init() {
	if os.Getenv("LC_ALL") != "" && os.Getenv("LC_ALL") != "C" && os.Getenv("LC_ALL") != "POSIX" {
		return
	}
	switch os.Getenv("LANG") {
	case "", "C", "POSIX", "C.UTF-8", "C.utf8":
		os.Unsetenv("LC_ALL")
		os.Setenv("LANG", "en_US.UTF-8")
	}
}
