package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/qmigrate/qmigrate/fleet"
)

// The plan file of "qmigrate evacuate": YAML, or JSON with the same keys
// (YAML reads JSON as it is). The keys of defaults and of a migration's
// overrides are the names of the migrate flags with "_" for "-" (disks for
// --disk); their values are written as on the command line. Unknown keys
// are an error.

type planFile struct {
	Limits     planLimits      `yaml:"limits"`
	Order      string          `yaml:"order"` // "plan" (default) or "smallest-first"
	Defaults   planSettings    `yaml:"defaults"`
	Migrations []planMigration `yaml:"migrations"`
}

type planLimits struct {
	MaxParallel       int               `yaml:"max_parallel"`
	MaxPerSource      int               `yaml:"max_per_source"`
	MaxPerDestination int               `yaml:"max_per_destination"`
	HostBandwidth     map[string]string `yaml:"host_bandwidth"`
}

// planSettings are the per-migration settings, each the migrate flag of
// the same name; nil when not given.
type planSettings struct {
	Policy              *string  `yaml:"policy"`
	MaxDowntime         *string  `yaml:"max_downtime"`
	Bandwidth           *string  `yaml:"bandwidth"`
	Timeout             *string  `yaml:"timeout"`
	ProgressTimeout     *string  `yaml:"progress_timeout"`
	AllowPostcopy       *bool    `yaml:"allow_postcopy"`
	AllowPause          *bool    `yaml:"allow_pause"`
	NoAutoConverge      *bool    `yaml:"no_auto_converge"`
	Multifd             *string  `yaml:"multifd"`
	ConnectTimeout      *string  `yaml:"connect_timeout"`
	UnresponsiveTimeout *string  `yaml:"unresponsive_timeout"`
	CopyStorage         *bool    `yaml:"copy_storage"`
	Disks               []string `yaml:"disks"`
	NBD                 *string  `yaml:"nbd"`
	WriteBlocking       *bool    `yaml:"write_blocking"`
	TLSX509             *string  `yaml:"tls_x509"`
	TLSPSK              *string  `yaml:"tls_psk"`
	TLSPSKUser          *string  `yaml:"tls_psk_user"`
	TLSHostname         *string  `yaml:"tls_hostname"`
	TLSAuthz            *string  `yaml:"tls_authz"`
	QMPTLSX509          *string  `yaml:"qmp_tls_x509"`
	InsecureQMP         *bool    `yaml:"insecure_qmp"`
}

type planMigration struct {
	Name            string `yaml:"name"`
	SourceHost      string `yaml:"source_host"`
	DestinationHost string `yaml:"destination_host"`
	Src             string `yaml:"src"`
	Dst             string `yaml:"dst"`
	URI             string `yaml:"uri"`
	Listen          string `yaml:"listen"` // where the destination binds, when not where the source connects (--listen)
	Priority        int    `yaml:"priority"`
	planSettings    `yaml:",inline"`
}

// keyOfFlag is the plan key of a migrate flag.
func keyOfFlag(name string) string {
	if name == "disk" {
		return "disks"
	}
	return strings.ReplaceAll(name, "-", "_")
}

// planError is a bad plan: exit 2, naming the entry and the key.
type planError struct {
	where string // "limits", "defaults", "migration vm1 (#2)"
	key   string
	err   error
}

func (e *planError) Error() string {
	if e.key == "" {
		return fmt.Sprintf("plan: %s: %v", e.where, e.err)
	}
	return fmt.Sprintf("plan: %s: %s: %v", e.where, e.key, e.err)
}

func (e *planError) Unwrap() error { return e.err }

// args turns the settings given into migrate flags, in a fixed order.
func (s *planSettings) args() []string {
	var out []string
	v := reflect.ValueOf(s).Elem()
	t := v.Type()
	for i := range t.NumField() {
		key := strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0]
		name := "--" + strings.ReplaceAll(key, "_", "-")
		f := v.Field(i)
		switch {
		case key == "disks":
			for _, d := range s.Disks {
				out = append(out, "--disk="+d)
			}
		case f.IsNil():
		case f.Elem().Kind() == reflect.Bool:
			out = append(out, name+"="+strconv.FormatBool(f.Elem().Bool()))
		default:
			out = append(out, name+"="+f.Elem().String())
		}
	}
	return out
}

// readPlan parses a plan file, refusing unknown keys with where they are.
func readPlan(data []byte) (*planFile, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, &planError{where: "file", err: err}
	}
	if len(root.Content) == 0 {
		return nil, &planError{where: "file", err: errors.New("empty")}
	}
	doc := root.Content[0]
	if err := knownKeys(doc, reflect.TypeFor[planFile](), "plan"); err != nil {
		return nil, err
	}
	for _, sec := range []struct {
		key string
		t   reflect.Type
	}{{"limits", reflect.TypeFor[planLimits]()}, {"defaults", reflect.TypeFor[planSettings]()}} {
		if n := mapValue(doc, sec.key); n != nil {
			if err := knownKeys(n, sec.t, sec.key); err != nil {
				return nil, err
			}
		}
	}
	if n := mapValue(doc, "migrations"); n != nil {
		if n.Kind != yaml.SequenceNode {
			return nil, &planError{where: "migrations", err: fmt.Errorf("line %d: want a list of migrations", n.Line)}
		}
		for i, m := range n.Content {
			where := fmt.Sprintf("migration #%d", i+1)
			if name := mapValue(m, "name"); name != nil && name.Value != "" {
				where = fmt.Sprintf("migration %s (#%d)", name.Value, i+1)
			}
			if err := knownKeys(m, reflect.TypeFor[planMigration](), where); err != nil {
				return nil, err
			}
		}
	}
	var p planFile
	if err := doc.Decode(&p); err != nil {
		return nil, &planError{where: "file", err: err}
	}
	return &p, nil
}

// mapValue returns the value of key in a mapping node, or nil.
func mapValue(n *yaml.Node, key string) *yaml.Node {
	if n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}

// knownKeys refuses a key of mapping n that t has no field for.
func knownKeys(n *yaml.Node, t reflect.Type, where string) error {
	if n.Kind != yaml.MappingNode {
		return &planError{where: where, err: fmt.Errorf("line %d: want a mapping of keys to values", n.Line)}
	}
	keys := yamlKeys(t)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i]
		if !slices.Contains(keys, k.Value) {
			return &planError{where: where, key: k.Value, err: fmt.Errorf("line %d: unknown key (known: %s)", k.Line, strings.Join(keys, ", "))}
		}
	}
	return nil
}

func yamlKeys(t reflect.Type) []string {
	var keys []string
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("yaml")
		if strings.Contains(tag, "inline") {
			keys = append(keys, yamlKeys(f.Type)...)
			continue
		}
		keys = append(keys, strings.Split(tag, ",")[0])
	}
	return keys
}

// buildPlan builds the fleet plan from a plan file, the settings of the
// command line (cli: migrate flags, as given) and the limits' flags.
// Precedence, lowest first: the plan's defaults, the command line, the
// migration's own keys.
func buildPlan(pf *planFile, cli []string) (fleet.Plan, error) {
	var p fleet.Plan
	l := pf.Limits
	p.Limits = fleet.Limits{MaxParallel: l.MaxParallel, MaxPerSource: l.MaxPerSource, MaxPerDestination: l.MaxPerDestination}
	for key, v := range map[string]int{"max_parallel": l.MaxParallel, "max_per_source": l.MaxPerSource, "max_per_destination": l.MaxPerDestination} {
		if v < 0 {
			return p, &planError{where: "limits", key: key, err: fmt.Errorf("negative (%d)", v)}
		}
	}
	if len(l.HostBandwidth) > 0 {
		p.Limits.HostBandwidth = map[string]uint64{}
		for h, s := range l.HostBandwidth {
			bw, err := parseByteSize(s)
			if err == nil && bw == 0 {
				err = errors.New("0 or unlimited: leave the host out for no budget")
			}
			if err != nil {
				return p, &planError{where: "limits", key: "host_bandwidth: " + h, err: err}
			}
			p.Limits.HostBandwidth[h] = bw
		}
	}
	switch pf.Order {
	case "", "plan":
	case "smallest-first":
		p.SmallestFirst = true
	default:
		return p, &planError{where: "plan", key: "order", err: fmt.Errorf("%q: want plan or smallest-first", pf.Order)}
	}
	// The defaults alone, to name their own mistakes.
	var d migrateOptions
	if err := d.flagSet().Parse(pf.Defaults.args()); err != nil {
		return p, settingError("defaults", err)
	}
	if len(pf.Migrations) == 0 {
		return p, &planError{where: "plan", key: "migrations", err: errors.New("none")}
	}
	names := map[string]int{}
	for i, pm := range pf.Migrations {
		where := fmt.Sprintf("migration #%d", i+1)
		if pm.Name != "" {
			where = fmt.Sprintf("migration %s (#%d)", pm.Name, i+1)
		}
		if pm.Name == "" {
			return p, &planError{where: where, key: "name", err: errors.New("missing")}
		}
		if j, dup := names[pm.Name]; dup {
			return p, &planError{where: where, key: "name", err: fmt.Errorf("also the name of migration #%d", j+1)}
		}
		names[pm.Name] = i
		for _, f := range []struct{ key, v string }{{"source_host", pm.SourceHost}, {"destination_host", pm.DestinationHost}} {
			if f.v == "" {
				return p, &planError{where: where, key: f.key, err: errors.New("missing: name the host (the limits count per host)")}
			}
		}
		var o migrateOptions
		fs := o.flagSet()
		def := pf.Defaults
		if len(pm.Disks) > 0 {
			def.Disks = nil // the migration's own disks replace the defaults'
		}
		if err := fs.Parse(def.args()); err != nil {
			return p, settingError("defaults", err)
		}
		if err := fs.Parse(cli); err != nil {
			return p, &usageError{msg: dashDash(err.Error())}
		}
		own := []string{"--src=" + pm.Src, "--dst=" + pm.Dst, "--uri=" + pm.URI}
		if pm.Listen != "" {
			own = append(own, "--listen="+pm.Listen)
		}
		own = append(own, pm.planSettings.args()...)
		if err := fs.Parse(own); err != nil {
			return p, settingError(where, err)
		}
		cfg, err := o.config()
		if err != nil {
			return p, &planError{where: where, err: errors.New(flagsToKeys(err.Error()))}
		}
		if err := cfg.Validate(); err != nil {
			return p, &planError{where: where, err: err}
		}
		p.Migrations = append(p.Migrations, fleet.Migration{Name: pm.Name, SourceHost: pm.SourceHost,
			DestinationHost: pm.DestinationHost, Priority: pm.Priority, Config: cfg})
	}
	if err := p.Validate(); err != nil {
		var pe *fleet.PlanError
		if errors.As(err, &pe) {
			where := "limits"
			if pe.Index >= 0 {
				where = fmt.Sprintf("migration %s (#%d)", pe.Name, pe.Index+1)
			}
			return p, &planError{where: where, key: fleetFieldKey(pe.Field), err: pe.Err}
		}
		return p, err
	}
	return p, nil
}

// settingError names the plan key of a setting that failed to parse.
func settingError(where string, err error) error {
	msg := err.Error()
	// The flag package: `invalid value "x" for flag -max-downtime: why`.
	if _, rest, ok := strings.Cut(msg, "for flag -"); ok {
		name, why, _ := strings.Cut(rest, ": ")
		return &planError{where: where, key: keyOfFlag(strings.TrimPrefix(name, "-")), err: errors.New(why)}
	}
	if _, rest, ok := strings.Cut(msg, "value "); ok && strings.HasPrefix(msg, "invalid boolean") {
		return &planError{where: where, err: errors.New("invalid boolean " + rest)}
	}
	return &planError{where: where, err: errors.New(flagsToKeys(msg))}
}

// flagsToKeys rewrites the migrate flags a message names (--max-downtime)
// as plan keys (max_downtime).
func flagsToKeys(msg string) string {
	var b bytes.Buffer
	for {
		i := strings.Index(msg, "--")
		if i < 0 {
			b.WriteString(msg)
			return b.String()
		}
		b.WriteString(msg[:i])
		msg = msg[i+2:]
		j := 0
		for j < len(msg) && (msg[j] >= 'a' && msg[j] <= 'z' || msg[j] >= '0' && msg[j] <= '9' || msg[j] == '-') {
			j++
		}
		b.WriteString(keyOfFlag(msg[:j]))
		msg = msg[j:]
	}
}

// fleetFieldKey is the plan key of a fleet.PlanError's field.
func fleetFieldKey(field string) string {
	switch field {
	case "Name":
		return "name"
	case "SourceHost":
		return "source_host"
	case "DestinationHost":
		return "destination_host"
	case "Limits.MaxParallel":
		return "max_parallel"
	case "Limits.MaxPerSource":
		return "max_per_source"
	case "Limits.MaxPerDestination":
		return "max_per_destination"
	case "Limits.HostBandwidth":
		return "host_bandwidth"
	}
	return ""
}

// recorded wraps a flag of the command line to keep what was given, to be
// handed to each migration's flags.
type recorded struct {
	flag.Value
	name string
	out  *[]string
}

func (r *recorded) Set(s string) error {
	if err := r.Value.Set(s); err != nil {
		return err
	}
	*r.out = append(*r.out, "--"+r.name+"="+s)
	return nil
}

type recordedBool struct{ recorded }

func (r *recordedBool) IsBoolFlag() bool { return true }

// registerMigrationFlags adds the per-migration flags of migrate (all but
// the addresses and the output's) to fs; what the user gives is appended
// to out.
func registerMigrationFlags(fs *flag.FlagSet, out *[]string) {
	var tmpl migrateOptions
	tfs := tmpl.flagSet()
	tfs.VisitAll(func(f *flag.Flag) {
		switch f.Name {
		case "src", "dst", "uri", "listen", "json", "v", "verbose", "metrics-addr":
			// Per migration in the plan (src, dst, uri, listen), or the
			// evacuation's own (--json, -v, --metrics-addr).
			return
		}
		r := recorded{Value: f.Value, name: f.Name, out: out}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			fs.Var(&recordedBool{r}, f.Name, f.Usage)
			return
		}
		fs.Var(&r, f.Name, f.Usage)
	})
}
