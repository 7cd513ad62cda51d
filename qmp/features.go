package qmp

import (
	"context"
	"encoding/json"
)

// Features is what a QEMU offers for migration, read from query-qmp-schema:
// exact, never inferred from version numbers. The schema is the largest
// reply QEMU gives (about 230 KB for 10.0) and producing it holds QEMU's
// main loop for 17-120 ms on a TCG host, so the engine probes it only where
// it needs most of it: a storage migration (blockmirror's preflight).
// Without storage the same facts come from cheap exact sources:
// capabilities from query-migrate-capabilities (every capability the QEMU
// has, with its state), parameters from query-migrate-parameters, and the
// argument forms of migrate and migrate-incoming (MigrateChannels,
// IncomingExitOnError) by trying the newest form and falling back on QEMU's
// exact refusal of an argument (transport.Form).
type Features struct {
	Version               Version
	Commands              map[string]bool // command names
	Events                map[string]bool
	MigrationCapabilities map[string]bool // MigrationCapability enum members
	MigrationParameters   map[string]bool // members of MigrateSetParameters
	MigrationStatuses     map[string]bool // MigrationStatus enum members
	// MigrateChannels: migrate and migrate-incoming take "channels" (8.2+;
	// without it "uri" is mandatory, and QEMU refuses the channels form
	// with "Parameter 'uri' is missing").
	MigrateChannels bool
	// IncomingExitOnError: migrate-incoming takes "exit-on-error" (9.1+;
	// without it QEMU refuses it with "Parameter 'exit-on-error' is
	// unexpected").
	IncomingExitOnError bool
	// BlockJobChange: block-job-change exists (8.2+).
	BlockJobChange bool
	// MirrorTargetIsZero: blockdev-mirror takes target-is-zero (10.1+).
	MirrorTargetIsZero bool
	// OOBCommands are commands that allow out-of-band execution.
	OOBCommands map[string]bool
}

// HasCapability reports whether the migration capability exists.
func (f *Features) HasCapability(name string) bool { return f.MigrationCapabilities[name] }

// HasParameter reports whether the migration parameter exists.
func (f *Features) HasParameter(name string) bool { return f.MigrationParameters[name] }

// HasCommand reports whether the command exists.
func (f *Features) HasCommand(name string) bool { return f.Commands[name] }

// ProbeFeatures reads query-qmp-schema and summarises it (see Features for
// what it costs QEMU, and the cheaper sources). Only the entries
// the summary looks at are decoded in full: the members and enum values of
// the few types the migration commands refer to stay raw JSON until then.
func (c *Client) ProbeFeatures(ctx context.Context) (*Features, error) {
	var entries []schemaEntry
	if err := c.Execute(ctx, "query-qmp-schema", nil, &entries); err != nil {
		return nil, err
	}
	f := summarise(entries)
	f.Version = c.version
	return f, nil
}

// schemaEntry is a query-qmp-schema entry decoded lazily: members and values
// stay raw until the summary asks for them.
type schemaEntry struct {
	Name        string          `json:"name"`
	MetaType    string          `json:"meta-type"`
	ArgType     string          `json:"arg-type"`
	RetType     string          `json:"ret-type"`
	AllowOOB    bool            `json:"allow-oob"`
	ElementType string          `json:"element-type"`
	RawValues   json.RawMessage `json:"values"`
	RawMembers  json.RawMessage `json:"members"`

	decoded bool
	values  []string
	members []SchemaMember
}

// decode fills values and members from the raw JSON (once). An entry that
// does not decode counts as having none, as a lenient full decode could not
// do better.
func (e *schemaEntry) decode() {
	if e.decoded {
		return
	}
	e.decoded = true
	if len(e.RawValues) > 0 {
		_ = json.Unmarshal(e.RawValues, &e.values)
	}
	if len(e.RawMembers) > 0 {
		_ = json.Unmarshal(e.RawMembers, &e.members)
	}
}

// FeaturesFromSchema summarises a query-qmp-schema reply.
func FeaturesFromSchema(schema []SchemaInfo) *Features {
	entries := make([]schemaEntry, len(schema))
	for i, s := range schema {
		entries[i] = schemaEntry{
			Name: s.Name, MetaType: s.MetaType, ArgType: s.ArgType, RetType: s.RetType,
			AllowOOB: s.AllowOOB, ElementType: s.ElementType,
			decoded: true, values: s.Values, members: s.Members,
		}
	}
	return summarise(entries)
}

func summarise(schema []schemaEntry) *Features {
	f := &Features{
		Commands:              map[string]bool{},
		Events:                map[string]bool{},
		MigrationCapabilities: map[string]bool{},
		MigrationParameters:   map[string]bool{},
		MigrationStatuses:     map[string]bool{},
		OOBCommands:           map[string]bool{},
	}
	byName := make(map[string]*schemaEntry, len(schema))
	for i := range schema {
		byName[schema[i].Name] = &schema[i]
	}
	enumValues := func(name string) []string {
		e := byName[name]
		if e == nil {
			return nil
		}
		e.decode()
		if len(e.values) > 0 {
			return e.values
		}
		var out []string
		for _, m := range e.members {
			out = append(out, m.Name)
		}
		return out
	}
	memberOf := func(typeName, member string) (*SchemaMember, bool) {
		t := byName[typeName]
		if t == nil {
			return nil, false
		}
		t.decode()
		for i := range t.members {
			if t.members[i].Name == member {
				return &t.members[i], true
			}
		}
		return nil, false
	}
	var migrateArgs, incomingArgs, mirrorArgs, setParamsArgs string
	for i := range schema {
		s := &schema[i]
		switch s.MetaType {
		case "command":
			f.Commands[s.Name] = true
			if s.AllowOOB {
				f.OOBCommands[s.Name] = true
			}
			switch s.Name {
			case "migrate":
				migrateArgs = s.ArgType
			case "migrate-incoming":
				incomingArgs = s.ArgType
			case "blockdev-mirror":
				mirrorArgs = s.ArgType
			case "migrate-set-parameters":
				setParamsArgs = s.ArgType
			}
		case "event":
			f.Events[s.Name] = true
		}
	}
	// Enum types appear under their names in QEMU's schema only when the
	// schema is not masked; 7.2+ masks type names with numbers, so find the
	// capability enum through the command's argument type instead.
	if t := byName["migrate-set-capabilities"]; t != nil {
		if m, ok := memberOf(t.ArgType, "capabilities"); ok {
			// array type "[N]" -> element type -> member "capability" -> enum
			if arr := byName[m.Type]; arr != nil {
				elem := arrayElement(arr)
				if cm, ok := memberOf(elem, "capability"); ok {
					for _, v := range enumValues(cm.Type) {
						f.MigrationCapabilities[v] = true
					}
				}
			}
		}
	}
	for _, v := range enumValues("MigrationCapability") {
		f.MigrationCapabilities[v] = true
	}
	if setParamsArgs != "" {
		if t := byName[setParamsArgs]; t != nil {
			t.decode()
			for _, m := range t.members {
				f.MigrationParameters[m.Name] = true
			}
		}
	}
	if t := byName["query-migrate"]; t != nil {
		if m, ok := memberOf(t.RetType, "status"); ok {
			for _, v := range enumValues(m.Type) {
				f.MigrationStatuses[v] = true
			}
		}
	}
	for _, v := range enumValues("MigrationStatus") {
		f.MigrationStatuses[v] = true
	}
	_, f.MigrateChannels = memberOf(migrateArgs, "channels")
	if _, ok := memberOf(incomingArgs, "channels"); !ok {
		f.MigrateChannels = false
	}
	_, f.IncomingExitOnError = memberOf(incomingArgs, "exit-on-error")
	_, f.MirrorTargetIsZero = memberOf(mirrorArgs, "target-is-zero")
	f.BlockJobChange = f.Commands["block-job-change"]
	return f
}

// arrayElement returns the element type of an array schema entry.
func arrayElement(s *schemaEntry) string {
	if s.MetaType == "array" {
		return s.ElementType
	}
	return ""
}
