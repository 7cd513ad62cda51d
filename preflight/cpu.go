package preflight

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/bits"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/qmigrate/qmigrate/qmp"
)

// cpuUnread returns a warning detail when either side could not list its
// vCPUs, "" otherwise.
func (c *comparison) cpuUnread() string {
	for _, f := range []*facts{c.src, c.dst} {
		if f.err("query-cpus-fast") != nil {
			return unread(f, "query-cpus-fast")
		}
	}
	return ""
}

// vcpuPairs pairs the vCPUs of both sides by cpu-index (the vCPU count is
// vcpu-topology's business: unpaired ones are left out).
func (c *comparison) vcpuPairs() [][2]int {
	var out [][2]int
	for i, s := range c.src.cpus {
		j := slices.IndexFunc(c.dst.cpus, func(d cpuEntry) bool { return d.Index == s.Index })
		if j >= 0 && i < len(c.src.vcpus) && j < len(c.dst.vcpus) {
			out = append(out, [2]int{i, j})
		}
	}
	return out
}

// scalarString renders a qom-get value: a JSON string unquoted, anything
// else as it is.
func scalarString(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	return string(raw)
}

// groupVCPUs joins the same problem found on several vCPUs: "vCPU 0, 1: X".
func groupVCPUs(byCPU map[int]string, total int) []string {
	byText := map[string][]int{}
	for cpu, text := range byCPU {
		byText[text] = append(byText[text], cpu)
	}
	var out []string
	for _, text := range sortedKeys(byText) {
		cpus := byText[text]
		sort.Ints(cpus)
		who := "every vCPU"
		if len(cpus) != total || total == 1 {
			names := make([]string, len(cpus))
			for i, n := range cpus {
				names[i] = strconv.Itoa(n)
			}
			who = "vCPU " + strings.Join(names, ", ")
		}
		out = append(out, who+": "+text)
	}
	return out
}

func (c *comparison) cpuModel() (Status, string) {
	if w := c.cpuUnread(); w != "" {
		return Warn, w
	}
	pairs := c.vcpuPairs()
	if len(pairs) == 0 {
		return Warn, "no vCPU to compare"
	}
	total := len(pairs)
	pairs = pairs[:1] // the model is read on the first vCPU (readVCPUs)
	diffs := map[int]string{}
	for _, p := range pairs {
		s, d := c.src.vcpus[p[0]].scalars, c.dst.vcpus[p[1]].scalars
		var parts []string
		for _, name := range cpuScalars {
			sv, sok := s[name]
			dv, dok := d[name]
			if !sok || !dok || string(sv) == string(dv) {
				continue
			}
			parts = append(parts, fmt.Sprintf("%s %s on the source, %s on the destination", name, scalarString(sv), scalarString(dv)))
		}
		if len(parts) > 0 {
			diffs[c.src.cpus[p[0]].Index] = strings.Join(parts, ", ")
		}
	}
	if len(diffs) > 0 {
		return Fail, strings.Join(groupVCPUs(diffs, len(pairs)), "; ")
	}
	s := c.src.vcpus[pairs[0][0]].scalars
	if len(s) == 0 {
		return Warn, "not compared: the CPU objects have none of the properties " + strings.Join(cpuScalars, ", ")
	}
	desc := scalarString(s["type"])
	for _, name := range []string{"vendor", "family", "model", "stepping"} {
		if v, ok := s[name]; ok {
			if name == "vendor" {
				desc += " " + scalarString(v)
			} else {
				desc += " " + name + " " + scalarString(v)
			}
		}
	}
	if v, ok := s["model-id"]; ok {
		desc += fmt.Sprintf(" (%s)", scalarString(v))
	}
	return Pass, fmt.Sprintf("%s on %s", strings.TrimSpace(desc), vcpus(total))
}

// wordDiff is the difference of one feature word.
type wordDiff struct {
	key         string
	lacks, adds uint32 // bits set only on the source, only on the destination
}

func diffWords(src, dst []featureWord) []wordDiff {
	s, d := map[string]uint32{}, map[string]uint32{}
	for _, w := range src {
		s[w.key()] |= w.Features
	}
	for _, w := range dst {
		d[w.key()] |= w.Features
	}
	keys := map[string]bool{}
	for k := range s {
		keys[k] = true
	}
	for k := range d {
		keys[k] = true
	}
	var out []wordDiff
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		if s[k] != d[k] {
			out = append(out, wordDiff{key: k, lacks: s[k] &^ d[k], adds: d[k] &^ s[k]})
		}
	}
	return out
}

func (c *comparison) cpuFeatures() (Status, string, error) {
	if w := c.cpuUnread(); w != "" {
		return Warn, w, nil
	}
	pairs := c.vcpuPairs()
	if len(pairs) == 0 {
		return Warn, "no vCPU to compare", nil
	}
	var (
		differ   []int // cpu-index of the vCPUs that differ
		first    []wordDiff
		firstPix [2]int
		nwords   int
	)
	for _, p := range pairs {
		sv, dv := c.src.vcpus[p[0]], c.dst.vcpus[p[1]]
		for _, v := range []struct {
			v vcpuInfo
			f *facts
		}{{sv, c.src}, {dv, c.dst}} {
			if v.v.wordErr != nil {
				return Warn, fmt.Sprintf("not compared: the %s QEMU %s gives no CPUID feature words (qom-get feature-words: %v)", v.f.side, v.f.version, v.v.wordErr), nil
			}
		}
		nwords = max(nwords, len(sv.words))
		if dd := diffWords(c.src.topologyBits(sv.words), c.dst.topologyBits(dv.words)); len(dd) > 0 {
			if differ == nil {
				first, firstPix = dd, p
			}
			differ = append(differ, c.src.cpus[p[0]].Index)
		}
	}
	if len(differ) == 0 {
		return Pass, fmt.Sprintf("%d CPUID feature words the same on %s", nwords, vcpus(len(pairs))), nil
	}
	who := "on every vCPU"
	if len(differ) != len(pairs) || len(pairs) == 1 {
		names := make([]string, len(differ))
		for i, n := range differ {
			names[i] = strconv.Itoa(n)
		}
		who = "on vCPU " + strings.Join(names, ", ")
	}
	named, err := c.nameFeatures(c.src.cpus[firstPix[0]].QOMPath, c.dst.cpus[firstPix[1]].QOMPath)
	if err != nil {
		return "", "", err
	}
	nbits := 0
	var keys []string
	for _, d := range first {
		nbits += bits.OnesCount32(d.lacks) + bits.OnesCount32(d.adds)
		keys = append(keys, d.key)
	}
	detail := fmt.Sprintf("the guest would see its CPU change %s: %d CPUID feature bits differ (%s)", who, nbits, strings.Join(keys, ", "))
	if named != "" {
		detail = named + "; " + detail
	} else {
		detail += ": " + bitList(first)
	}
	return Fail, detail, nil
}

// topologyBits returns words with the CPUID bits that follow from the vCPU
// topology set as the guest sees them: ht (CPUID.1H:EDX bit 28) with more
// than one core or thread per socket, and cmp-legacy (CPUID.80000001H:ECX
// bit 1) too on a vendor other than Intel. QEMU 7.2 sets them when the
// guest runs CPUID, so its feature-words lack them; QEMU 10.0 puts them
// into the feature words (x86_cpu_expand_features): the same guest-visible
// CPU, which a 2-vCPU 7.2 to 10.0 pair showed as "destination adds
// cmp-legacy, ht" before. The topology itself is vcpu-topology's check.
func (f *facts) topologyBits(words []featureWord) []featureWord {
	if !f.multiThreadSocket() {
		return words
	}
	intel := f.intel()
	out := slices.Clone(words)
	for i, w := range out {
		switch {
		case w.EAX == 1 && w.Register == "EDX":
			out[i].Features |= 1 << 28
		case w.EAX == 0x80000001 && w.Register == "ECX" && !intel:
			out[i].Features |= 1 << 1
		}
	}
	return out
}

// multiThreadSocket reports more than one core or thread per socket.
func (f *facts) multiThreadSocket() bool { return f.smp["cores"]*max(f.smp["threads"], 1) > 1 }

func (f *facts) intel() bool {
	return len(f.vcpus) > 0 && scalarString(f.vcpus[0].scalars["vendor"]) == "GenuineIntel"
}

// topologyProps sets the boolean properties of topologyBits' features as
// the guest sees them.
func (f *facts) topologyProps(props map[string]bool) {
	if !f.multiThreadSocket() {
		return
	}
	for name := range props {
		switch strings.ReplaceAll(name, "_", "-") { // QEMU also lists cmp_legacy
		case "ht":
			props[name] = true
		case "cmp-legacy":
			props[name] = props[name] || !f.intel()
		}
	}
}

// bitList names differing bits by position, when the features have no name.
func bitList(dd []wordDiff) string {
	var lacks, adds []string
	for _, d := range dd {
		for b := range 32 {
			if d.lacks&(1<<b) != 0 {
				lacks = append(lacks, fmt.Sprintf("%s bit %d", d.key, b))
			}
			if d.adds&(1<<b) != 0 {
				adds = append(adds, fmt.Sprintf("%s bit %d", d.key, b))
			}
		}
	}
	return lackAdd(lacks, adds)
}

func lackAdd(lacks, adds []string) string {
	var parts []string
	if len(lacks) > 0 {
		parts = append(parts, "destination lacks "+strings.Join(lacks, ", "))
	}
	if len(adds) > 0 {
		verb := "destination adds "
		if len(lacks) > 0 {
			verb = "adds "
		}
		parts = append(parts, verb+strings.Join(adds, ", "))
	}
	return strings.Join(parts, "; ")
}

// nameFeatures names the features that differ between two CPU objects
// from their boolean properties (one per named feature, plus a few
// switches): "destination lacks pcommit; adds rdseed, sha-ni". A property
// only one QEMU has is listed apart: its name may be a feature the other
// QEMU does not know, or a switch of that version (the x- ones, internal
// compatibility switches, are left out). "" when either side
// cannot list them (the caller names bits instead).
func (c *comparison) nameFeatures(srcPath, dstPath string) (string, error) {
	var (
		sp, dp     map[string]bool
		serr, derr error
		wg         sync.WaitGroup
	)
	wg.Go(func() { dp, derr = boolProps(c.ctx, c.dstC, dstPath) })
	sp, serr = boolProps(c.ctx, c.srcC, srcPath)
	wg.Wait()
	for _, e := range []struct {
		err  error
		side string
		path string
	}{{serr, c.src.side, srcPath}, {derr, c.dst.side, dstPath}} {
		if e.err != nil && !isQMPError(e.err) {
			return "", &SideError{Side: e.side, Op: "qom-get " + e.path, Err: e.err}
		}
		if e.err != nil {
			return "", nil
		}
	}
	c.src.topologyProps(sp)
	c.dst.topologyProps(dp)
	var lacks, adds, onlySrc, onlyDst []string
	for _, name := range sortedKeys(sp) {
		dv, ok := dp[name]
		switch {
		case !ok && sp[name] && !strings.HasPrefix(name, "x-"):
			onlySrc = append(onlySrc, name)
		case ok && sp[name] && !dv:
			lacks = append(lacks, name)
		case ok && !sp[name] && dv:
			adds = append(adds, name)
		}
	}
	for _, name := range sortedKeys(dp) {
		if _, ok := sp[name]; !ok && dp[name] && !strings.HasPrefix(name, "x-") {
			onlyDst = append(onlyDst, name)
		}
	}
	out := lackAdd(dedupAliases(lacks), dedupAliases(adds))
	for _, o := range []struct {
		names []string
		side  string
	}{{onlySrc, "source"}, {onlyDst, "destination"}} {
		if len(o.names) > 0 {
			if out != "" {
				out += "; "
			}
			out += "on only the " + o.side + "'s QEMU: " + strings.Join(dedupAliases(o.names), ", ")
		}
	}
	return out, nil
}

// dedupAliases keeps one name of each feature QEMU lists under several
// spellings (sse4.1, sse4-1, sse4_1; cmp-legacy, cmp_legacy): the one with a
// dot, else the one without underscores.
func dedupAliases(names []string) []string {
	norm := func(s string) string { return strings.NewReplacer("_", "-", ".", "-").Replace(s) }
	best := map[string]string{}
	rank := func(s string) int {
		switch {
		case strings.Contains(s, "."):
			return 0
		case !strings.Contains(s, "_"):
			return 1
		}
		return 2
	}
	for _, n := range names {
		k := norm(n)
		if b, ok := best[k]; !ok || rank(n) < rank(b) || rank(n) == rank(b) && n < b {
			best[k] = n
		}
	}
	out := make([]string, 0, len(best))
	for _, n := range best {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// boolProps reads every boolean property of a QOM object, all in flight at
// once.
func boolProps(ctx context.Context, c *qmp.Client, path string) (map[string]bool, error) {
	var props []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := c.Execute(ctx, "qom-list", map[string]string{"path": path}, &props); err != nil {
		return nil, err
	}
	out := map[string]bool{}
	var (
		mu    sync.Mutex
		first error
		wg    sync.WaitGroup
	)
	for _, p := range props {
		if p.Type != "bool" {
			continue
		}
		wg.Go(func() {
			var v bool
			err := c.Execute(ctx, "qom-get", qomGet(path, p.Name), &v)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				out[p.Name] = v
			case !isQMPError(err) && first == nil:
				first = err
			}
		})
	}
	wg.Wait()
	return out, first
}

func propsString(p map[string]int64) string {
	parts := make([]string, 0, len(p))
	for _, k := range sortedKeys(p) {
		parts = append(parts, fmt.Sprintf("%s=%d", k, p[k]))
	}
	return strings.Join(parts, ",")
}

func (c *comparison) vcpuTopology() (Status, string) {
	if w := c.cpuUnread(); w != "" {
		return Warn, w
	}
	var problems, warns []string
	if ns, nd := len(c.src.cpus), len(c.dst.cpus); ns != nd {
		problems = append(problems, fmt.Sprintf("the source has %s, the destination %d", vcpus(ns), nd))
	}
	// The machine's smp configuration (sockets, dies, cores, threads,
	// maxcpus...): the keys both QEMUs have.
	if c.src.err("qom-get /machine smp") == nil && c.dst.err("qom-get /machine smp") == nil {
		var diffs []string
		for _, k := range sortedKeys(c.src.smp) {
			if dv, ok := c.dst.smp[k]; ok && dv != c.src.smp[k] {
				diffs = append(diffs, fmt.Sprintf("%s %d on the source, %d on the destination", k, c.src.smp[k], dv))
			}
		}
		if len(diffs) > 0 {
			problems = append(problems, "-smp differs: "+strings.Join(diffs, ", "))
		}
	}
	// Where each vCPU sits (socket, core, thread ids) by cpu-index.
	for _, s := range c.src.cpus {
		for _, d := range c.dst.cpus {
			if d.Index == s.Index && propsString(s.Props) != propsString(d.Props) {
				problems = append(problems, fmt.Sprintf("vCPU %d sits at %s on the source, %s on the destination", s.Index, propsString(s.Props), propsString(d.Props)))
			}
		}
	}
	// The hotpluggable slots: the same slots, the same plugged, same type.
	if c.src.err("query-hotpluggable-cpus") == nil && c.dst.err("query-hotpluggable-cpus") == nil {
		type slot struct {
			typ     string
			plugged bool
		}
		index := func(list []hotSlot) map[string]slot {
			m := map[string]slot{}
			for _, h := range list {
				m[propsString(h.Props)] = slot{h.Type, h.QOMPath != ""}
			}
			return m
		}
		ss, ds := index(c.src.slots), index(c.dst.slots)
		for _, k := range sortedKeys(ss) {
			d, ok := ds[k]
			switch {
			case !ok:
				problems = append(problems, fmt.Sprintf("CPU slot %s exists only on the source", k))
			case d.plugged != ss[k].plugged:
				problems = append(problems, fmt.Sprintf("CPU slot %s is %s on the source, %s on the destination (plug the same vCPUs: device_add/-device)", k, plugged(ss[k].plugged), plugged(d.plugged)))
			case d.typ != ss[k].typ:
				problems = append(problems, fmt.Sprintf("CPU slot %s takes %s on the source, %s on the destination", k, ss[k].typ, d.typ))
			}
		}
		for _, k := range sortedKeys(ds) {
			if _, ok := ss[k]; !ok {
				problems = append(problems, fmt.Sprintf("CPU slot %s exists only on the destination", k))
			}
		}
	} else {
		warns = append(warns, "hotpluggable CPU slots not compared (query-hotpluggable-cpus refused)")
	}
	if len(problems) > 0 {
		return Fail, strings.Join(problems, "; ")
	}
	desc := vcpus(len(c.src.cpus))
	if len(c.src.smp) > 0 {
		var parts []string
		for _, k := range []string{"sockets", "dies", "clusters", "cores", "threads", "maxcpus"} {
			if v, ok := c.src.smp[k]; ok {
				parts = append(parts, fmt.Sprintf("%s=%d", k, v))
			}
		}
		desc += " (" + strings.Join(parts, " ") + ")"
	}
	if len(warns) > 0 {
		return Warn, desc + "; " + strings.Join(warns, "; ")
	}
	return Pass, desc
}

func plugged(b bool) string {
	if b {
		return "plugged"
	}
	return "empty"
}

func vcpus(n int) string {
	if n == 1 {
		return "1 vCPU"
	}
	return fmt.Sprintf("%d vCPUs", n)
}
