package agent

import (
	"bufio"
	"bytes"
	"io/fs"
	"os"
	"strings"

	"github.com/kilnworks/kiln/station"
)

// DetectInfo reads what it can about the device it runs on: serial number and
// model from the device tree (/proc/device-tree) or DMI (/sys/class/dmi/id),
// firmware from /etc/os-release. Missing values are left empty for flags to
// fill in; capabilities are left to New.
func DetectInfo() station.DeviceInfo { return DetectInfoFS(os.DirFS("/")) }

// DetectInfoFS is DetectInfo on the root file system fsys (paths without a
// leading slash), e.g. a mounted image.
func DetectInfoFS(fsys fs.FS) station.DeviceInfo {
	return station.DeviceInfo{
		Serial:   first(fsys, "proc/device-tree/serial-number", "sys/firmware/devicetree/base/serial-number", "sys/class/dmi/id/product_serial"),
		Model:    first(fsys, "proc/device-tree/model", "sys/firmware/devicetree/base/model", "sys/class/dmi/id/product_name"),
		Firmware: osRelease(fsys),
	}
}

// first returns the first non-empty, usable value among the files.
func first(fsys fs.FS, names ...string) string {
	for _, n := range names {
		b, err := fs.ReadFile(fsys, n)
		if err != nil {
			continue
		}
		s := strings.TrimSpace(string(bytes.TrimRight(b, "\x00")))
		switch strings.ToLower(s) {
		case "", "none", "to be filled by o.e.m.", "default string", "system serial number", "not specified", "0":
			continue
		}
		return s
	}
	return ""
}

// osRelease returns a firmware description from os-release: IMAGE_VERSION
// when the image sets one, else PRETTY_NAME, else NAME VERSION_ID.
func osRelease(fsys fs.FS) string {
	for _, n := range []string{"etc/os-release", "usr/lib/os-release"} {
		f, err := fsys.Open(n)
		if err != nil {
			continue
		}
		kv := map[string]string{}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
			if !ok || strings.HasPrefix(k, "#") {
				continue
			}
			kv[k] = strings.Trim(v, `"'`)
		}
		f.Close()
		switch {
		case kv["IMAGE_VERSION"] != "":
			name := kv["IMAGE_ID"]
			if name == "" {
				name = kv["ID"]
			}
			return strings.TrimSpace(name + " " + kv["IMAGE_VERSION"])
		case kv["PRETTY_NAME"] != "":
			return kv["PRETTY_NAME"]
		case kv["NAME"] != "":
			return strings.TrimSpace(kv["NAME"] + " " + kv["VERSION_ID"])
		}
	}
	return ""
}
