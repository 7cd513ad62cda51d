package qmp

import (
	"context"
)

// Features is what a QEMU offers for migration, read from query-qmp-schema.
// The engine chooses commands from it, never from version numbers.
type Features struct {
	Version               Version
	Commands              map[string]bool // command names
	Events                map[string]bool
	MigrationCapabilities map[string]bool // MigrationCapability enum members
	MigrationParameters   map[string]bool // members of MigrateSetParameters
	MigrationStatuses     map[string]bool // MigrationStatus enum members
	// MigrateChannels: migrate and migrate-incoming take "channels" (8.2+).
	MigrateChannels bool
	// IncomingExitOnError: migrate-incoming takes "exit-on-error" (9.1+).
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

// ProbeFeatures reads query-qmp-schema and summarises it.
func (c *Client) ProbeFeatures(ctx context.Context) (*Features, error) {
	schema, err := c.QueryQMPSchema(ctx)
	if err != nil {
		return nil, err
	}
	f := FeaturesFromSchema(schema)
	f.Version = c.version
	return f, nil
}

// FeaturesFromSchema summarises a query-qmp-schema reply.
func FeaturesFromSchema(schema []SchemaInfo) *Features {
	f := &Features{
		Commands:              map[string]bool{},
		Events:                map[string]bool{},
		MigrationCapabilities: map[string]bool{},
		MigrationParameters:   map[string]bool{},
		MigrationStatuses:     map[string]bool{},
		OOBCommands:           map[string]bool{},
	}
	byName := make(map[string]*SchemaInfo, len(schema))
	for i := range schema {
		byName[schema[i].Name] = &schema[i]
	}
	enumValues := func(name string) []string {
		e := byName[name]
		if e == nil {
			return nil
		}
		if len(e.Values) > 0 {
			return e.Values
		}
		var out []string
		for _, m := range e.Members {
			out = append(out, m.Name)
		}
		return out
	}
	memberOf := func(typeName, member string) (*SchemaMember, bool) {
		t := byName[typeName]
		if t == nil {
			return nil, false
		}
		for i := range t.Members {
			if t.Members[i].Name == member {
				return &t.Members[i], true
			}
		}
		return nil, false
	}
	var migrateArgs, incomingArgs, mirrorArgs, setParamsArgs string
	for _, s := range schema {
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
			for _, m := range t.Members {
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
func arrayElement(s *SchemaInfo) string {
	if s.MetaType == "array" {
		return s.ElementType
	}
	return ""
}
