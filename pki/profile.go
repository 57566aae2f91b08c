package pki

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"text/template"
	"time"

	"go.step.sm/crypto/x509util"

	"github.com/kilnworks/kiln/station"
)

// DefaultLeafTemplate is the x509util template for device leaves when a
// Profile gives none: the subject CN is the unit's registration ID (checked
// against the CSR before the template runs), the key may sign, and the
// certificate is for TLS client authentication only.
const DefaultLeafTemplate = `{
	"subject": {"commonName": {{ toJson .Subject.CommonName }}},
	"keyUsage": ["digitalSignature"],
	"extKeyUsage": ["clientAuth"],
	"basicConstraints": {"isCA": false}
}`

// Profile says what leaves the station issues. The zero Profile issues
// one-year leaves from DefaultLeafTemplate for EC-P256 device keys, without
// caps.
type Profile struct {
	// Validity is a leaf's lifetime; zero means one year.
	Validity time.Duration
	// AllowedKeys lists the device key types accepted in CSRs, e.g.
	// {EC-P256} or {"RSA-2048+"} (a trailing "+" admits larger RSA keys too).
	// Empty means EC-P256 only.
	AllowedKeys []KeyType
	// Template is the x509util template text for leaves. It sees the usual
	// x509util data (.Subject, .SANs, .Insecure.CR) plus .Kiln with
	// RegistrationID, Batch and Operator. Empty means DefaultLeafTemplate.
	Template string
	// MaxPerBatch caps the leaves issued for one batch; zero means no cap.
	MaxPerBatch int
	// MaxPerShift caps the leaves issued in one shift; zero means no cap.
	MaxPerShift int
}

func (p Profile) validity() time.Duration {
	if p.Validity <= 0 {
		return 365 * 24 * time.Hour
	}
	return p.Validity
}

func (p Profile) allowedKeys() []KeyType {
	if len(p.AllowedKeys) == 0 {
		return []KeyType{ECDSAP256}
	}
	return p.AllowedKeys
}

func (p Profile) allows(k KeyType) bool {
	return slices.ContainsFunc(p.allowedKeys(), func(a KeyType) bool { return a.allows(k) })
}

// leafTemplate is a Profile's template, parsed once.
type leafTemplate struct {
	tmpl *template.Template
}

// parseTemplate parses text with x509util's functions. x509util's "fail"
// records its message in shared state; it is replaced by one that only
// returns an error, so a cached template is safe for concurrent use.
func parseTemplate(text string) (*leafTemplate, error) {
	if strings.TrimSpace(text) == "" {
		text = DefaultLeafTemplate
	}
	funcs := x509util.GetFuncMap()
	funcs["fail"] = func(msg string) (string, error) { return "", errors.New(msg) }
	t, err := template.New("leaf").Funcs(funcs).Parse(text)
	if err != nil {
		return nil, station.Errorf("parse leaf template", station.KindInvalid, "%w: fix the profile's template", err)
	}
	return &leafTemplate{tmpl: t}, nil
}

// option returns the x509util option that runs the cached template for csr.
func (lt *leafTemplate) option(csr *x509.CertificateRequest, req IssueRequest) x509util.Option {
	return func(cr *x509.CertificateRequest, o *x509util.Options) error {
		data := x509util.CreateTemplateData(req.RegistrationID, nil)
		data.SetCertificateRequest(cr)
		data.Set("Kiln", map[string]string{
			"RegistrationID": req.RegistrationID,
			"Batch":          req.Batch,
			"Operator":       req.Operator,
		})
		buf := new(bytes.Buffer)
		if err := lt.tmpl.Execute(buf, data); err != nil {
			return station.Errorf("run leaf template", station.KindInvalid, "%w: fix the profile's template", err)
		}
		if !json.Valid(buf.Bytes()) {
			return station.Errorf("run leaf template", station.KindInvalid, "the profile's template produced invalid JSON: fix the template")
		}
		o.CertBuffer = buf
		return nil
	}
}
