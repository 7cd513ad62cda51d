package qemutest

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/qmigrate/qmigrate/qmp"
)

// The guest-visible machine, what package preflight compares: the machine
// type (qom-get /machine type, query-machines with the "pc" and "q35"
// aliases of the simulated version), the vCPUs (query-cpus-fast,
// query-hotpluggable-cpus, qom-get /machine smp) and their CPU objects
// (qom-list, qom-get of the model properties, feature-words and one boolean
// property per named CPUID feature), the devices (qom-list
// /machine/peripheral and /machine/peripheral-anon, query-pci) and the
// migration blockers (query-migrate's blocked-reasons). The shapes are the
// ones real QEMU 7.2 and 10.0 gave (testdata/qmp/preflight): CPU feature
// words and model properties of qemu64 and max are the captured ones, 7.2's
// for a simulated version before 9.0 and 10.0's from 9.0 on.

// Device is one -device of a fake QEMU: /machine/peripheral lists it by ID,
// /machine/peripheral-anon when it has none, and a PCI device (a type
// ending in "-pci", ivshmem-*, e1000) is a function on bus 0 of query-pci.
type Device struct {
	ID   string // "" for a device without id
	Type string // "virtio-net-pci", "vfio-pci", "ivshmem-plain", ...
	// Slot is the PCI slot on bus 0 (addr=); 0 takes the next free slot
	// after the machine's own functions, in the order given.
	Slot int
}

// DefaultDevices are the devices of a side whose Options.Devices (or
// DstDevices) is nil: one virtio NIC. An empty, non-nil list means none.
func DefaultDevices() []Device { return []Device{{ID: "net0", Type: "virtio-net-pci"}} }

// feature is one named CPUID feature bit: the CPU object's boolean property
// of that name, and its bit in feature-words.
type feature struct {
	word  wordKey
	bit   uint
	since [2]int // the QEMU version that has the property ({0,0}: every one)
}

// wordKey designates one CPUID feature word: leaf, subleaf (-1: none),
// register.
type wordKey struct {
	eax uint32
	ecx int
	reg string
}

// featureNames names the bits of the feature words QEMU names, by word:
// QEMU's own names (target/i386/cpu.c), "" for bits left out.
var featureNames = map[wordKey][32]string{
	{1, -1, "EDX"}: {"fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
		"pat", "pse36", "pn", "clflush", "", "ds", "acpi", "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe"},
	{1, -1, "ECX"}: {"pni", "pclmulqdq", "dtes64", "monitor", "ds-cpl", "vmx", "smx", "est", "tm2", "ssse3", "cid", "", "fma", "cx16", "xtpr", "pdcm",
		"", "pcid", "dca", "sse4.1", "sse4.2", "x2apic", "movbe", "popcnt", "tsc-deadline", "aes", "xsave", "", "avx", "f16c", "rdrand", "hypervisor"},
	{7, 0, "EBX"}: {"fsgsbase", "tsc-adjust", "sgx", "bmi1", "hle", "avx2", "", "smep", "bmi2", "erms", "invpcid", "rtm", "", "", "mpx", "",
		"avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit", "clflushopt", "clwb", "intel-pt", "avx512pf", "avx512er", "avx512cd", "sha-ni", "avx512bw", "avx512vl"},
	{7, 0, "ECX"}: {"", "avx512vbmi", "umip", "pku", "", "waitpkg", "avx512vbmi2", "", "gfni", "vaes", "vpclmulqdq", "avx512vnni", "avx512bitalg", "", "avx512-vpopcntdq", "",
		"la57", "", "", "", "", "", "rdpid", "", "bus-lock-detect", "cldemote", "", "movdiri", "movdir64b", "", "sgxlc", "pks"},
	{7, 0, "EDX"}:           {4: "fsrm", 10: "md-clear", 14: "serialize", 26: "spec-ctrl", 27: "stibp", 31: "ssbd"},
	{7, 1, "EAX"}:           {4: "avx-vnni", 5: "avx512-bf16", 7: "cmpccxadd", 10: "fzrm", 11: "fsrs", 12: "fsrc"},
	{0x80000001, -1, "EDX"}: {11: "syscall", 19: "mp", 20: "nx", 22: "mmxext", 25: "fxsr-opt", 26: "pdpe1gb", 27: "rdtscp", 29: "lm", 30: "3dnowext", 31: "3dnow"},
	{0x80000001, -1, "ECX"}: {"lahf-lm", "cmp-legacy", "svm", "extapic", "cr8legacy", "abm", "sse4a", "misalignsse", "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", "", "lwp",
		"fma4", "tce", "", "nodeid-msr", "", "tbm", "topoext", "perfctr-core", "perfctr-nb"},
	{0x80000008, -1, "EBX"}: {0: "clzero", 2: "xsaveerptr", 9: "wbnoinvd", 12: "ibpb"},
}

// newerFeatures are the features whose property QEMU 7.2 does not have.
var newerFeatures = map[string][2]int{"cmpccxadd": {8, 0}, "fzrm": {8, 0}, "fsrs": {8, 0}, "fsrc": {8, 0}}

var features = func() map[string]feature {
	out := map[string]feature{}
	for w, names := range featureNames {
		for b, n := range names {
			if n != "" {
				out[n] = feature{word: w, bit: uint(b), since: newerFeatures[n]}
			}
		}
	}
	return out
}()

// The feature words' keys, in the order each version lists them.
var (
	wordKeys72 = []wordKey{{0xd, 1, "EDX"}, {0xd, 1, "ECX"}, {0x12, 1, "EAX"}, {0x12, 0, "EBX"}, {0x12, 0, "EAX"}, {0x14, 0, "ECX"},
		{0xd, 0, "EDX"}, {0xd, 0, "EAX"}, {0x6, -1, "EAX"}, {0xd, 1, "EAX"}, {0x8000000a, -1, "EDX"}, {0x40000001, -1, "EDX"},
		{0x40000001, -1, "EAX"}, {0xc0000001, -1, "EDX"}, {0x80000008, -1, "EBX"}, {0x80000007, -1, "EDX"}, {0x80000001, -1, "ECX"},
		{0x80000001, -1, "EDX"}, {0x7, 1, "EAX"}, {0x7, 0, "EDX"}, {0x7, 0, "ECX"}, {0x7, 0, "EBX"}, {0x1, -1, "ECX"}, {0x1, -1, "EDX"}}
	wordKeys100 = []wordKey{{0x24, 0, "EBX"}, {0x7, 2, "EDX"}, {0x7, 1, "EDX"}, {0xd, 1, "EDX"}, {0xd, 1, "ECX"}, {0x12, 1, "EAX"},
		{0x12, 0, "EBX"}, {0x12, 0, "EAX"}, {0x14, 0, "ECX"}, {0xd, 0, "EDX"}, {0xd, 0, "EAX"}, {0x6, -1, "EAX"}, {0xd, 1, "EAX"},
		{0x8000000a, -1, "EDX"}, {0x40000001, -1, "EDX"}, {0x40000001, -1, "EAX"}, {0xc0000001, -1, "EDX"}, {0x80000022, -1, "EAX"},
		{0x80000021, -1, "EBX"}, {0x80000021, -1, "EAX"}, {0x80000008, -1, "EBX"}, {0x80000007, -1, "EDX"}, {0x80000007, -1, "EBX"},
		{0x80000001, -1, "ECX"}, {0x80000001, -1, "EDX"}, {0x7, 1, "EAX"}, {0x7, 0, "EDX"}, {0x7, 0, "ECX"}, {0x7, 0, "EBX"},
		{0x1, -1, "ECX"}, {0x1, -1, "EDX"}}
)

// cpuModel is what the CPU object of a model says on one QEMU version.
type cpuModel struct {
	scalars map[string]any
	words   map[wordKey]uint32
}

// baseModel returns the captured properties and feature words of model
// ("qemu64", "max") on a version before 9.0 (7.2's) or from 9.0 (10.0's).
func baseModel(model string, v [3]int) (cpuModel, bool) {
	newer := v[0] >= 9
	s := map[string]any{"vendor": "AuthenticAMD", "family": 15, "model": 107, "stepping": 1,
		"model-id": "QEMU Virtual CPU version 2.5+", "level": 13, "xlevel": 0x8000000a, "xlevel2": 0,
		"level-func7": 0, "phys-bits": 40}
	w := map[wordKey]uint32{{1, -1, "EDX"}: 0x078bfbfd, {1, -1, "ECX"}: 0x80002001,
		{0x80000001, -1, "EDX"}: 0x2193fbfd, {0x80000001, -1, "ECX"}: 0x5}
	switch model {
	case "qemu64":
	case "max":
		s["model-id"] = "QEMU TCG CPU version 2.5+"
		w = map[wordKey]uint32{{0xd, 0, "EAX"}: 0x21f, {0x6, -1, "EAX"}: 0x4, {0xd, 1, "EAX"}: 0x5,
			{0x8000000a, -1, "EDX"}: 0x10010001, {0x80000001, -1, "ECX"}: 0x75, {0x80000001, -1, "EDX"}: 0xedd3fbfd,
			{7, 0, "ECX"}: 0x8001020c, {7, 0, "EBX"}: 0x01d843a9, {1, -1, "ECX"}: 0xf6d8320b, {1, -1, "EDX"}: 0x0fcbfbfd}
		if newer {
			s["family"], s["model"], s["stepping"], s["level-func7"] = 6, 6, 3, 1
			w[wordKey{0x80000008, -1, "EBX"}] = 0x204
			w[wordKey{0x80000001, -1, "ECX"}] = 0x177
			w[wordKey{7, 1, "EAX"}] = 0x1c80
			w[wordKey{7, 0, "EDX"}] = 0x10
			w[wordKey{7, 0, "ECX"}] = 0x8041020c
			w[wordKey{7, 0, "EBX"}] = 0x219c43a9
			w[wordKey{1, -1, "ECX"}] = 0xf6f8320b
		}
	default:
		return cpuModel{}, false
	}
	s["type"] = model + "-x86_64-cpu"
	return cpuModel{scalars: s, words: w}, true
}

// hardware is the guest-visible machine of one side, fixed at New.
type hardware struct {
	machine string // resolved: pc-q35-10.0
	cpu     cpuModel
	props   []string // the CPU objects' boolean feature properties (those this version has)
	keys    []wordKey
	vcpus   int
	maxcpus int
	devices []Device // slots assigned
	pci     []pciFn
}

type pciFn struct {
	slot, fn       int
	vendor, device int
	class          int
	desc           string
	qdev           string
}

// machineVersions are the versioned x86 machine types query-machines lists,
// up to the simulated version's.
var machineVersions = []string{"5.2", "6.0", "6.1", "6.2", "7.0", "7.1", "7.2", "8.0", "8.1", "8.2",
	"9.0", "9.1", "9.2", "10.0", "10.1"}

func verName(v [3]int) string { return fmt.Sprintf("%d.%d", v[0], v[1]) }

func verLE(a string, v [3]int) bool {
	maj, min, _ := strings.Cut(a, ".")
	ma, _ := strconv.Atoi(maj)
	mi, _ := strconv.Atoi(min)
	return ma < v[0] || ma == v[0] && mi <= v[1]
}

// resolveMachine turns the aliases "pc" and "q35" into the versioned type
// of version v, as QEMU does.
func resolveMachine(m string, v [3]int) string {
	switch m {
	case "pc":
		return "pc-i440fx-" + verName(v)
	case "q35":
		return "pc-q35-" + verName(v)
	}
	return m
}

// parseCPU reads a -cpu value: a model and +feature, -feature, feature=on
// or feature=off.
func parseCPU(spec string, v [3]int) (cpuModel, error) {
	parts := strings.Split(spec, ",")
	m, ok := baseModel(parts[0], v)
	if !ok {
		return cpuModel{}, fmt.Errorf("qemutest: CPU model %q not modelled (qemu64, max)", parts[0])
	}
	for _, p := range parts[1:] {
		name, on := p, true
		switch {
		case strings.HasPrefix(p, "+"):
			name = p[1:]
		case strings.HasPrefix(p, "-"):
			name, on = p[1:], false
		case strings.HasSuffix(p, "=on"):
			name = strings.TrimSuffix(p, "=on")
		case strings.HasSuffix(p, "=off"):
			name, on = strings.TrimSuffix(p, "=off"), false
		}
		f, ok := features[name]
		if !ok {
			return cpuModel{}, fmt.Errorf("qemutest: CPU feature %q not modelled", name)
		}
		if on {
			m.words[f.word] |= 1 << f.bit
		} else {
			m.words[f.word] &^= 1 << f.bit
		}
	}
	return m, nil
}

// pciIDs are the vendor, device, class and class description of the PCI
// device types the fake knows; others get Red Hat's 1b36:0000, class ff.
var pciIDs = map[string]pciFn{
	"virtio-net-pci":     {vendor: 0x1af4, device: 0x1000, class: 0x200, desc: "Ethernet controller"},
	"virtio-blk-pci":     {vendor: 0x1af4, device: 0x1001, class: 0x100, desc: "SCSI controller"},
	"virtio-balloon-pci": {vendor: 0x1af4, device: 0x1002, class: 0xff},
	"virtio-serial-pci":  {vendor: 0x1af4, device: 0x1003, class: 0x780, desc: "Communication controller"},
	"virtio-rng-pci":     {vendor: 0x1af4, device: 0x1005, class: 0xff},
	"ivshmem-plain":      {vendor: 0x1af4, device: 0x1110, class: 0x500, desc: "RAM controller"},
	"ivshmem-doorbell":   {vendor: 0x1af4, device: 0x1110, class: 0x500, desc: "RAM controller"},
	"e1000":              {vendor: 0x8086, device: 0x100e, class: 0x200, desc: "Ethernet controller"},
	"vfio-pci":           {vendor: 0x8086, device: 0x1521, class: 0x200, desc: "Ethernet controller"},
}

func isPCI(typ string) bool {
	_, known := pciIDs[typ]
	return known || strings.HasSuffix(typ, "-pci")
}

// newHardware builds one side's machine from the options, or says what is
// not modelled.
func newHardware(opt *Options, side Side, v [3]int, disks []Device) (*hardware, error) {
	h := &hardware{}
	mach, cpu, vcpus, maxcpus, devs := opt.Machine, opt.CPU, opt.VCPUs, opt.MaxVCPUs, opt.Devices
	if side == Destination {
		mach, cpu, vcpus, maxcpus, devs = opt.DstMachine, opt.DstCPU, opt.DstVCPUs, opt.DstMaxVCPUs, opt.DstDevices
	}
	h.machine = resolveMachine(mach, v)
	m, err := parseCPU(cpu, v)
	if err != nil {
		return nil, err
	}
	h.cpu = m
	h.keys = wordKeys72
	if v[0] >= 9 {
		h.keys = wordKeys100
		// From 9.x QEMU puts the topology's bits into the feature words
		// (7.2 adds them when the guest runs CPUID): the 2-vCPU captures.
		if maxcpus > 1 {
			h.cpu.words[wordKey{1, -1, "EDX"}] |= 1 << 28         // ht
			h.cpu.words[wordKey{0x80000001, -1, "ECX"}] |= 1 << 1 // cmp-legacy
		}
	}
	for name, f := range features {
		if f.since == [2]int{} || v[0] > f.since[0] || v[0] == f.since[0] && v[1] >= f.since[1] {
			h.props = append(h.props, name)
		}
	}
	slices.Sort(h.props)
	h.vcpus, h.maxcpus = vcpus, maxcpus
	// The machine's own PCI functions (as qemulab starts it: no VGA).
	next := 2
	if strings.HasPrefix(h.machine, "pc-q35") {
		h.pci = []pciFn{{slot: 0, vendor: 0x8086, device: 0x29c0, class: 0x600, desc: "Host bridge"},
			{slot: 0x1f, vendor: 0x8086, device: 0x2918, class: 0x601, desc: "ISA bridge"},
			{slot: 0x1f, fn: 2, vendor: 0x8086, device: 0x2922, class: 0x106, desc: "SATA controller"},
			{slot: 0x1f, fn: 3, vendor: 0x8086, device: 0x2930, class: 0xc05, desc: "SMBus"}}
		next = 1
	} else {
		h.pci = []pciFn{{slot: 0, vendor: 0x8086, device: 0x1237, class: 0x600, desc: "Host bridge"},
			{slot: 1, vendor: 0x8086, device: 0x7000, class: 0x601, desc: "ISA bridge"},
			{slot: 1, fn: 1, vendor: 0x8086, device: 0x7010, class: 0x101, desc: "IDE controller"},
			{slot: 1, fn: 3, vendor: 0x8086, device: 0x7113, class: 0x680, desc: "Bridge"}}
	}
	all := slices.Clone(devs)
	for _, d := range disks {
		if !slices.ContainsFunc(all, func(x Device) bool { return x.ID == d.ID }) {
			all = append(all, d)
		}
	}
	used := map[int]bool{}
	for _, f := range h.pci {
		used[f.slot] = true
	}
	for _, d := range all {
		if d.Slot > 0 {
			used[d.Slot] = true
		}
	}
	for _, d := range all {
		if isPCI(d.Type) {
			if d.Slot == 0 {
				for used[next] {
					next++
				}
				d.Slot = next
				used[next] = true
			}
			id, ok := pciIDs[d.Type]
			if !ok {
				id = pciFn{vendor: 0x1b36, class: 0xff}
			}
			id.slot, id.qdev = d.Slot, d.ID
			h.pci = append(h.pci, id)
		}
		h.devices = append(h.devices, d)
	}
	slices.SortFunc(h.pci, func(a, b pciFn) int { return (a.slot*8 + a.fn) - (b.slot*8 + b.fn) })
	return h, nil
}

// cpuPath is the QOM path of vCPU i (QEMU creates another object between
// the first and the second).
func cpuPath(i int) string {
	if i == 0 {
		return "/machine/unattached/device[0]"
	}
	return fmt.Sprintf("/machine/unattached/device[%d]", i+1)
}

func (h *hardware) cpuIndex(path string) int {
	for i := range h.maxcpus {
		if cpuPath(i) == path {
			if i < h.vcpus {
				return i
			}
			return -1
		}
	}
	return -1
}

func (h *hardware) cpuType() string { return h.cpu.scalars["type"].(string) }

func (h *hardware) smp(v [3]int) map[string]int {
	s := map[string]int{"cpus": h.vcpus, "maxcpus": h.maxcpus, "sockets": 1, "dies": 1, "clusters": 1,
		"cores": h.maxcpus, "threads": 1}
	if v[0] >= 9 {
		s["modules"], s["books"], s["drawers"] = 1, 1, 1
	}
	return s
}

func (h *hardware) words() []map[string]any {
	out := make([]map[string]any, 0, len(h.keys))
	for _, k := range h.keys {
		w := map[string]any{"cpuid-register": k.reg, "cpuid-input-eax": k.eax, "features": h.cpu.words[k]}
		if k.ecx >= 0 {
			w["cpuid-input-ecx"] = k.ecx
		}
		out = append(out, w)
	}
	return out
}

// cpuBools are the CPU objects' boolean properties that are no feature.
var cpuBools = map[string]bool{"realized": true, "hotplugged": false, "hotpluggable": true,
	"start-powered-off": false, "check": true, "enforce": false, "migratable": true, "pmu": false, "l3-cache": true}

func (h *hardware) cpuProp(name string) (any, bool) {
	if v, ok := h.cpu.scalars[name]; ok {
		return v, true
	}
	if name == "feature-words" {
		return h.words(), true
	}
	if v, ok := cpuBools[name]; ok {
		return v, true
	}
	if slices.Contains(h.props, name) {
		f := features[name]
		return h.cpu.words[f.word]&(1<<f.bit) != 0, true
	}
	return nil, false
}

func (h *hardware) cpuList() []map[string]string {
	out := []map[string]string{{"name": "type", "type": "string"}, {"name": "parent_bus", "type": "link<bus>"},
		{"name": "feature-words", "type": "X86CPUFeatureWordInfo"}, {"name": "lapic", "type": "child<apic>"}}
	for _, n := range slices.Sorted(func(yield func(string) bool) {
		for k := range h.cpu.scalars {
			if k != "type" && !yield(k) {
				return
			}
		}
	}) {
		t := "uint32"
		switch n {
		case "vendor", "model-id":
			t = "string"
		case "family", "model", "stepping":
			t = "int"
		}
		out = append(out, map[string]string{"name": n, "type": t})
	}
	for _, n := range slices.Sorted(func(yield func(string) bool) {
		for k := range cpuBools {
			if !yield(k) {
				return
			}
		}
	}) {
		out = append(out, map[string]string{"name": n, "type": "bool"})
	}
	for _, n := range h.props {
		out = append(out, map[string]string{"name": n, "type": "bool"})
	}
	return out
}

// qmpNotFound is QEMU's error for a QOM path that does not exist.
func qmpNotFound(path string) error {
	return &qmp.Error{Class: "DeviceNotFound", Desc: "Device '" + path + "' not found"}
}

// qomGet answers qom-get outside /objects.
func (q *QEMU) qomGet(path, prop string) (any, error) {
	h, v := q.hw, q.p.version(q.side)
	switch path {
	case "/machine":
		switch prop {
		case "type":
			return h.machine + "-machine", nil
		case "smp":
			return h.smp(v), nil
		}
		return nil, errGeneric(fmt.Sprintf("Property '%s-machine.%s' not found", h.machine, prop))
	}
	if h.cpuIndex(path) >= 0 {
		if val, ok := h.cpuProp(prop); ok {
			return val, nil
		}
		return nil, errGeneric(fmt.Sprintf("Property '%s.%s' not found", h.cpuType(), prop))
	}
	if id, ok := strings.CutPrefix(path, "/machine/peripheral/"); ok {
		if i := slices.IndexFunc(h.devices, func(d Device) bool { return d.ID == id }); i >= 0 {
			if prop == "type" {
				return h.devices[i].Type, nil
			}
			return nil, errGeneric(fmt.Sprintf("Property '%s.%s' not found", h.devices[i].Type, prop))
		}
	}
	return nil, qmpNotFound(path)
}

// qomList answers qom-list outside /objects.
func (q *QEMU) qomList(path string) (any, error) {
	h := q.hw
	switch path {
	case "/machine/peripheral", "/machine/peripheral-anon":
		out := []map[string]string{{"name": "type", "type": "string"}}
		anon := 0
		for _, d := range h.devices {
			switch {
			case d.ID != "" && path == "/machine/peripheral":
				out = append(out, map[string]string{"name": d.ID, "type": "child<" + d.Type + ">"})
			case d.ID == "" && path == "/machine/peripheral-anon":
				out = append(out, map[string]string{"name": fmt.Sprintf("device[%d]", anon), "type": "child<" + d.Type + ">"})
				anon++
			}
		}
		return out, nil
	}
	if h.cpuIndex(path) >= 0 {
		return h.cpuList(), nil
	}
	return nil, qmpNotFound(path)
}

func (q *QEMU) installMachine() {
	h, v := q.hw, q.p.version(q.side)
	q.handle("query-cpus-fast", func(json.RawMessage) (any, error) {
		out := make([]map[string]any, 0, h.vcpus)
		for i := range h.vcpus {
			out = append(out, map[string]any{"thread-id": 1000*(int(q.side)+1) + i, "cpu-index": i, "target": "x86_64",
				"qom-path": cpuPath(i), "props": map[string]int{"core-id": i, "thread-id": 0, "socket-id": 0}})
		}
		return out, nil
	})
	q.handle("query-hotpluggable-cpus", func(json.RawMessage) (any, error) {
		out := make([]map[string]any, 0, h.maxcpus)
		for i := h.maxcpus - 1; i >= 0; i-- {
			s := map[string]any{"type": h.cpuType(), "vcpus-count": 1,
				"props": map[string]int{"core-id": i, "thread-id": 0, "socket-id": 0}}
			if i < h.vcpus {
				s["qom-path"] = cpuPath(i)
			}
			out = append(out, s)
		}
		return out, nil
	})
	q.handle("query-pci", func(json.RawMessage) (any, error) {
		devs := make([]map[string]any, 0, len(h.pci))
		for _, f := range h.pci {
			class := map[string]any{"class": f.class}
			if f.desc != "" {
				class["desc"] = f.desc
			}
			devs = append(devs, map[string]any{"bus": 0, "slot": f.slot, "function": f.fn, "qdev_id": f.qdev,
				"class_info": class, "regions": []any{},
				"id": map[string]int{"vendor": f.vendor, "device": f.device, "subsystem-vendor": 0x1af4, "subsystem": 0x1100}})
		}
		return []map[string]any{{"bus": 0, "devices": devs}}, nil
	})
	q.handle("query-machines", func(json.RawMessage) (any, error) {
		var out []map[string]any
		latest := ""
		for _, mv := range machineVersions {
			if verLE(mv, v) {
				latest = mv
			}
		}
		for _, mv := range machineVersions {
			if !verLE(mv, v) {
				continue
			}
			for _, kind := range []struct{ prefix, alias string }{{"pc-i440fx-", "pc"}, {"pc-q35-", "q35"}} {
				m := map[string]any{"name": kind.prefix + mv, "hotpluggable-cpus": true, "numa-mem-supported": false,
					"default-cpu-type": "qemu64-x86_64-cpu", "cpu-max": 288, "deprecated": false, "default-ram-id": "pc.ram"}
				if mv == latest {
					m["alias"] = kind.alias
					if kind.alias == "pc" {
						m["is-default"] = true
					}
				}
				out = append(out, m)
			}
		}
		out = append(out, map[string]any{"name": "isapc", "hotpluggable-cpus": false, "cpu-max": 1, "deprecated": false},
			map[string]any{"name": "none", "hotpluggable-cpus": false, "cpu-max": 1, "deprecated": false})
		return out, nil
	})
	if q.block == nil {
		q.handle("query-block", func(json.RawMessage) (any, error) { return []any{}, nil })
	}
}

// machineCommands are the commands of installMachine, for the schema.
func machineCommands() []string {
	return []string{"query-cpus-fast", "query-hotpluggable-cpus", "query-pci", "query-machines"}
}

// vfio returns the PCI address of a VFIO device of h ("" when none).
func (h *hardware) vfio() string {
	for _, f := range h.devices {
		if strings.HasPrefix(f.Type, "vfio-") {
			for _, p := range h.pci {
				if p.qdev == f.ID && p.slot == f.Slot {
					return fmt.Sprintf("0000:00:%02x.%x", p.slot, p.fn)
				}
			}
			return f.Type
		}
	}
	return ""
}

func sideDisks(opt Options, side Side) []qmp.BlockInfo {
	if side == Destination {
		return opt.DstDisks
	}
	return opt.Disks
}

// diskDevices are the virtio-blk-pci devices of the disks whose qdev is
// /machine/peripheral/ID[/virtio-backend].
func diskDevices(disks []qmp.BlockInfo) []Device {
	var out []Device
	for _, d := range disks {
		id, ok := strings.CutPrefix(d.QDev, "/machine/peripheral/")
		if !ok {
			continue
		}
		id = strings.TrimSuffix(id, "/virtio-backend")
		if !slices.ContainsFunc(out, func(x Device) bool { return x.ID == id }) {
			out = append(out, Device{ID: id, Type: "virtio-blk-pci"})
		}
	}
	return out
}
