package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"unicode/utf8"
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
// the summary looks at are decoded in full (see FeaturesFromSchema): the
// members and enum values of the few types the migration commands refer to.
func (c *Client) ProbeFeatures(ctx context.Context) (*Features, error) {
	var entries schemaList
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

// schemaList decodes a query-qmp-schema reply into lazily decoded entries
// with a small scanner: encoding/json has already checked the reply is valid
// JSON (Unmarshal does before calling UnmarshalJSON), so the scanner only
// needs to find the top-level fields of each entry and skip the rest. On any
// shape it does not expect it falls back to encoding/json.
type schemaList []schemaEntry

func (l *schemaList) UnmarshalJSON(data []byte) error {
	data = bytes.Clone(data) // the entries keep slices of it
	if entries, ok := scanSchema(data); ok {
		*l = entries
		return nil
	}
	var entries []schemaEntry
	if err := json.Unmarshal(data, &entries); err != nil {
		return err
	}
	*l = entries
	return nil
}

// scanSchema scans a valid JSON array of objects. ok is false when the
// input is not such an array or a field has an unexpected type.
func scanSchema(d []byte) (out []schemaEntry, ok bool) {
	i := skipWS(d, 0)
	if i >= len(d) || d[i] != '[' {
		return nil, false
	}
	out = make([]schemaEntry, 0, len(d)/160)
	i = skipWS(d, i+1)
	if i < len(d) && d[i] == ']' {
		return out, true
	}
	for {
		if i >= len(d) || d[i] != '{' {
			return nil, false
		}
		var e schemaEntry
		if i, ok = scanEntry(d, i, &e); !ok {
			return nil, false
		}
		out = append(out, e)
		i = skipWS(d, i)
		if i >= len(d) {
			return nil, false
		}
		switch d[i] {
		case ',':
			i = skipWS(d, i+1)
		case ']':
			return out, true
		default:
			return nil, false
		}
	}
}

// scanEntry scans the object at d[i] ('{') into e and returns the index
// after it.
func scanEntry(d []byte, i int, e *schemaEntry) (int, bool) {
	i = skipWS(d, i+1)
	if i < len(d) && d[i] == '}' {
		return i + 1, true
	}
	for {
		if i >= len(d) || d[i] != '"' {
			return 0, false
		}
		kEnd, ok := skipString(d, i)
		if !ok {
			return 0, false
		}
		key := d[i+1 : kEnd-1]
		if bytes.IndexByte(key, '\\') >= 0 {
			return 0, false // escaped key: leave it to encoding/json
		}
		i = skipWS(d, kEnd)
		if i >= len(d) || d[i] != ':' {
			return 0, false
		}
		i = skipWS(d, i+1)
		vEnd, ok := skipValue(d, i)
		if !ok {
			return 0, false
		}
		val := d[i:vEnd]
		var dst *string
		switch string(key) {
		case "name":
			dst = &e.Name
		case "meta-type":
			dst = &e.MetaType
		case "arg-type":
			dst = &e.ArgType
		case "ret-type":
			dst = &e.RetType
		case "element-type":
			dst = &e.ElementType
		case "allow-oob":
			switch string(val) {
			case "true":
				e.AllowOOB = true
			case "false", "null":
				e.AllowOOB = false
			default:
				return 0, false
			}
		case "values":
			e.RawValues = val
		case "members":
			e.RawMembers = val
		default:
			for _, k := range schemaKeys {
				if bytes.EqualFold(key, []byte(k)) {
					return 0, false // encoding/json matches keys case-insensitively
				}
			}
		}
		if dst != nil {
			s, ok := stringValue(val)
			if !ok {
				return 0, false
			}
			*dst = s
		}
		i = skipWS(d, vEnd)
		if i >= len(d) {
			return 0, false
		}
		switch d[i] {
		case ',':
			i = skipWS(d, i+1)
		case '}':
			return i + 1, true
		default:
			return 0, false
		}
	}
}

// schemaKeys are the keys scanEntry reads.
var schemaKeys = [...]string{"name", "meta-type", "arg-type", "ret-type", "element-type", "allow-oob", "values", "members"}

// stringValue is a JSON string's value (null is ""), as encoding/json
// would decode it.
func stringValue(v []byte) (string, bool) {
	if string(v) == "null" {
		return "", true
	}
	if len(v) < 2 || v[0] != '"' {
		return "", false
	}
	if bytes.IndexByte(v, '\\') < 0 && utf8.Valid(v) {
		return string(v[1 : len(v)-1]), true
	}
	var s string
	if err := json.Unmarshal(v, &s); err != nil {
		return "", false
	}
	return s, true
}

func skipWS(d []byte, i int) int {
	for i < len(d) && (d[i] == ' ' || d[i] == '\n' || d[i] == '\t' || d[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index after the string starting at d[i] ('"').
func skipString(d []byte, i int) (int, bool) {
	for i++; i < len(d); i++ {
		switch d[i] {
		case '\\':
			i++
		case '"':
			return i + 1, true
		}
	}
	return 0, false
}

// skipValue returns the index after the (valid) JSON value at d[i].
func skipValue(d []byte, i int) (int, bool) {
	if i >= len(d) {
		return 0, false
	}
	switch d[i] {
	case '"':
		return skipString(d, i)
	case '{', '[':
		depth := 0
		for ; i < len(d); i++ {
			switch d[i] {
			case '"':
				end, ok := skipString(d, i)
				if !ok {
					return 0, false
				}
				i = end - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1, true
				}
			}
		}
		return 0, false
	default: // number, true, false, null
		j := i
		for j < len(d) && !(d[j] == ',' || d[j] == '}' || d[j] == ']' || d[j] == ' ' || d[j] == '\n' || d[j] == '\t' || d[j] == '\r') {
			j++
		}
		if j == i {
			return 0, false
		}
		return j, true
	}
}
