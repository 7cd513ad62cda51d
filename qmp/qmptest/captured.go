package qmptest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/qmigrate/qmigrate/qmp"
)

// CapturedError reads a QMP error captured from real QEMU (a JSON object
// with "class" and "desc", as qmp/internal/capture writes them under
// testdata/qmp/VERSION/errors). It returns nil, nil when there is no
// capture: QEMU accepted the request.
func CapturedError(path string) (*qmp.Error, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var e qmp.Error
	if err := json.Unmarshal(raw, &e); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &e, nil
}

// MatchError says how got differs from the error real QEMU gave (want, from
// CapturedError): nil when got is a *qmp.Error with want's class and
// description, or when both are nil (QEMU accepted the request, and so did
// whatever answered got).
func MatchError(got error, want *qmp.Error) error {
	if want == nil {
		if got != nil {
			return fmt.Errorf("QEMU accepted the request, got %v", got)
		}
		return nil
	}
	var qe *qmp.Error
	if !errors.As(got, &qe) {
		return fmt.Errorf("want QEMU's %s %q, got %v", want.Class, want.Desc, got)
	}
	if qe.Class != want.Class || qe.Desc != want.Desc {
		return fmt.Errorf("want QEMU's %s %q, got %s %q", want.Class, want.Desc, qe.Class, qe.Desc)
	}
	return nil
}
