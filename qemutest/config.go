package qemutest

import (
	"encoding/json"
	"fmt"

	"github.com/qmigrate/qmigrate/qmp"
)

// Migration capabilities and parameters: query-migrate-capabilities,
// migrate-set-capabilities (refused on a source with a migration in
// progress), query-migrate-parameters and migrate-set-parameters (typed as
// QEMU's schema types them; downtime-limit checked against QEMU's range).

// capNames are the capabilities the fake knows, in QEMU's order.
func capNames() []string {
	return []string{"xbzrle", "auto-converge", "events", "postcopy-ram", "return-path",
		"pause-before-switchover", "multifd", "late-block-activate", "validate-uuid", "postcopy-preempt"}
}

// defaultParams are QEMU's defaults for the parameters the fake knows.
func defaultParams() map[string]any {
	return map[string]any{
		"max-bandwidth": uint64(134217728), "max-postcopy-bandwidth": uint64(0), "downtime-limit": uint64(300), "multifd-channels": 2,
		"cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
		"throttle-trigger-threshold": 50, "cpu-throttle-tailslow": false,
		"tls-creds": "", "tls-hostname": "", "tls-authz": "",
	}
}

func (q *QEMU) installConfig() {
	q.handle("query-migrate-capabilities", func(json.RawMessage) (any, error) {
		var out []map[string]any
		for _, c := range capNames() {
			out = append(out, map[string]any{"capability": c, "state": q.caps[c]})
		}
		return out, nil
	})
	q.handle("migrate-set-capabilities", q.setCapabilities)
	q.handle("query-migrate-parameters", func(json.RawMessage) (any, error) { return q.params, nil })
	q.handle("migrate-set-parameters", q.setParameters)
}

func (q *QEMU) setCapabilities(args json.RawMessage) (any, error) {
	var a struct {
		Capabilities []qmp.MigrationCapabilityStatus `json:"capabilities"`
	}
	if err := json.Unmarshal(args, &a); err != nil {
		return nil, err
	}
	if q.side == Source && q.p.active() {
		return nil, errGeneric("There's a migration process in progress")
	}
	for _, c := range a.Capabilities {
		if _, ok := q.caps[c.Capability]; !ok {
			return nil, errGeneric(fmt.Sprintf("Parameter 'capability' does not accept value '%s'", c.Capability))
		}
	}
	want := map[string]bool{}
	for k, v := range q.caps {
		want[k] = v
	}
	for _, c := range a.Capabilities {
		want[c.Capability] = c.State
	}
	if want["postcopy-preempt"] && !want["postcopy-ram"] {
		return nil, errGeneric("Postcopy preempt requires postcopy-ram")
	}
	for _, c := range a.Capabilities {
		q.caps[c.Capability] = c.State
	}
	return nil, nil
}

func (q *QEMU) setParameters(args json.RawMessage) (any, error) {
	var a map[string]json.RawMessage
	if err := json.Unmarshal(args, &a); err != nil {
		return nil, err
	}
	for k, raw := range a {
		cur, ok := q.params[k]
		if !ok {
			return nil, errGeneric("Invalid parameter '" + k + "'")
		}
		switch cur.(type) {
		case uint64:
			var v uint64
			if err := json.Unmarshal(raw, &v); err != nil {
				return nil, errGeneric("Parameter '" + k + "' expects uint64")
			}
			if k == "downtime-limit" && v > 2000000 {
				return nil, errGeneric("Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms")
			}
			q.params[k] = v
		case int:
			var v int
			if err := json.Unmarshal(raw, &v); err != nil {
				return nil, errGeneric("Parameter '" + k + "' expects int")
			}
			q.params[k] = v
		case bool:
			var v bool
			if err := json.Unmarshal(raw, &v); err != nil {
				return nil, errGeneric("Parameter '" + k + "' expects bool")
			}
			q.params[k] = v
		case string:
			var v string
			if err := json.Unmarshal(raw, &v); err != nil {
				return nil, errGeneric("Parameter '" + k + "' expects string")
			}
			q.params[k] = v
		}
	}
	return nil, nil
}

// param reads a numeric parameter.
func (q *QEMU) param(name string) uint64 {
	switch v := q.params[name].(type) {
	case uint64:
		return v
	case int:
		return uint64(v)
	}
	return 0
}
