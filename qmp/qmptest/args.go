package qmptest

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"

	"github.com/qmigrate/qmigrate/qmp"
)

// Args wraps h with the argument check QEMU makes before it runs a command
// (see CheckArgs): a command's arguments are declared as in QEMU's QAPI
// schema, in declaration order, a leading '*' marking an optional one. A
// refused command never reaches h, as in QEMU, where it changes nothing.
//
//	srv.Handle("migrate-incoming", qmptest.Args(h, "uri"))                                  // 7.2
//	srv.Handle("migrate-incoming", qmptest.Args(h, "*uri", "*channels", "*exit-on-error")) // 9.1+
func Args(h HandlerFunc, members ...string) HandlerFunc {
	return func(args json.RawMessage) (any, error) {
		if err := CheckArgs(args, members...); err != nil {
			return nil, err
		}
		return h(args)
	}
}

// CheckArgs checks a command's arguments against its declared members the
// way QEMU's QAPI input visitor does, with QEMU's texts (the same from 7.2
// to 10.x, GenericError): the members are visited in declaration order, so
// a missing mandatory member is reported first ("Parameter 'NAME' is
// missing"), then any argument left over ("Parameter 'NAME' is unexpected";
// the first in sorted order when there are several, where QEMU names an
// arbitrary one). Arguments that are not a JSON object are refused as
// QEMU's dispatcher does. It returns nil when QEMU would run the command.
// Only the names are checked, not the values' types.
func CheckArgs(args json.RawMessage, members ...string) error {
	var got map[string]json.RawMessage
	if a := bytes.TrimSpace(args); len(a) > 0 && !bytes.Equal(a, []byte("null")) {
		if a[0] != '{' || json.Unmarshal(a, &got) != nil {
			return &qmp.Error{Class: "GenericError", Desc: "QMP input member 'arguments' must be an object"}
		}
	}
	declared := make(map[string]bool, len(members))
	for _, m := range members {
		name, optional := strings.CutPrefix(m, "*")
		declared[name] = true
		if _, ok := got[name]; !ok && !optional {
			return &qmp.Error{Class: "GenericError", Desc: "Parameter '" + name + "' is missing"}
		}
	}
	var extra []string
	for name := range got {
		if !declared[name] {
			extra = append(extra, name)
		}
	}
	if len(extra) > 0 {
		return &qmp.Error{Class: "GenericError", Desc: "Parameter '" + slices.Min(extra) + "' is unexpected"}
	}
	return nil
}
