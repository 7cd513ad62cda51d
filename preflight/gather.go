package preflight

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/qmigrate/qmigrate/qmp"
)

// facts is what one QEMU told. A query it refused (a QMP error: an older
// version, another target) leaves its field empty and its error in errs.
type facts struct {
	side    string
	version qmp.Version
	c       *qmp.Client

	mu   sync.Mutex
	errs map[string]error // QMP errors by operation ("query-pci")

	status     string
	mig        *qmp.MigrationInfo
	ram        uint64 // base + plugged; 0 when unknown
	machine    string // QOM type of /machine: pc-i440fx-7.2-machine
	smp        map[string]int64
	cpus       []cpuEntry
	slots      []hotSlot
	vcpus      []vcpuInfo        // one per cpus entry, same order
	peripheral map[string]string // id -> type
	anon       []string          // types of the devices without id
	pci        []pciFunc
	blocks     []blockInfo
	caps       map[string]bool
}

// cpuEntry is one query-cpus-fast entry.
type cpuEntry struct {
	Index   int              `json:"cpu-index"`
	QOMPath string           `json:"qom-path"`
	Props   map[string]int64 `json:"props"`
}

// hotSlot is one query-hotpluggable-cpus entry.
type hotSlot struct {
	Type       string           `json:"type"`
	VCPUsCount int              `json:"vcpus-count"`
	Props      map[string]int64 `json:"props"`
	QOMPath    string           `json:"qom-path"` // "" when not plugged
}

// featureWord is one entry of an x86 CPU's feature-words property: the
// feature bits CPUID gives in one register for one leaf (and subleaf).
type featureWord struct {
	EAX      uint32  `json:"cpuid-input-eax"`
	ECX      *uint32 `json:"cpuid-input-ecx"`
	Register string  `json:"cpuid-register"`
	Features uint32  `json:"features"`
}

func (w featureWord) key() string {
	s := fmt.Sprintf("CPUID.%XH", w.EAX)
	if w.ECX != nil {
		s += fmt.Sprintf(".%d", *w.ECX)
	}
	return s + ":" + w.Register
}

// cpuScalars are the CPU object properties that are what CPUID tells the
// guest besides the feature bits, in the order they are reported.
var cpuScalars = []string{"type", "vendor", "family", "model", "stepping", "model-id",
	"level", "xlevel", "xlevel2", "level-func7", "phys-bits"}

// vcpuInfo is what the CPU object of one vCPU says.
type vcpuInfo struct {
	scalars map[string]json.RawMessage // missing: the property does not exist (or not read: vCPUs after the first)
	words   []featureWord
	wordErr error
}

// pciFunc is one PCI function of query-pci.
type pciFunc struct {
	Bus, Slot, Function int
	Vendor, Device      int
	Class               string
	QdevID              string
}

func (p pciFunc) addr() string { return fmt.Sprintf("%02x:%02x.%x", p.Bus, p.Slot, p.Function) }

func (p pciFunc) String() string {
	s := fmt.Sprintf("%s %04x:%04x", p.addr(), p.Vendor, p.Device)
	if p.Class != "" {
		s += " " + p.Class
	}
	if p.QdevID != "" {
		s += " (id " + p.QdevID + ")"
	}
	return s
}

// blockInfo is one query-block entry, with the "active" flag 10.0 adds.
type blockInfo struct {
	Device    string `json:"device"`
	QDev      string `json:"qdev"`
	Removable bool   `json:"removable"`
	Inserted  *struct {
		File     string `json:"file"`
		NodeName string `json:"node-name"`
		ReadOnly bool   `json:"ro"`
		Driver   string `json:"drv"`
		Active   *bool  `json:"active"`
		Image    *struct {
			VirtualSize uint64 `json:"virtual-size"`
		} `json:"image"`
	} `json:"inserted"`
}

func (b blockInfo) label() string {
	switch {
	case b.Device != "":
		return b.Device
	case b.Inserted != nil && b.Inserted.NodeName != "":
		return b.Inserted.NodeName
	}
	return b.QDev
}

// isQMPError reports whether err is QEMU's refusal of one command (the
// connection still works).
func isQMPError(err error) bool {
	var qe *qmp.Error
	return errors.As(err, &qe)
}

// gather reads one side. Only a failure of the connection (or ctx) is an
// error; QEMU's refusal of a query is recorded in facts.errs.
func gather(ctx context.Context, c *qmp.Client, side string, opts Options, skip func(Name) bool) (*facts, error) {
	f := &facts{side: side, version: c.Version(), c: c, errs: map[string]error{}}
	need := func(names ...Name) bool {
		for _, n := range names {
			if !skip(n) {
				return true
			}
		}
		return false
	}
	var (
		wg    sync.WaitGroup
		fatal error
		fmu   sync.Mutex
	)
	// ask runs one query in its own goroutine and decodes into out.
	ask := func(op, cmd string, args, out any) {
		wg.Go(func() {
			if err := c.Execute(ctx, cmd, args, out); err != nil {
				f.fail(op, err, &fatal, &fmu)
			}
		})
	}
	if need(RunState, MigrationBlockers) {
		var st qmp.StatusInfo
		var mig qmp.MigrationInfo
		wg.Go(func() {
			if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
				f.fail("query-status", err, &fatal, &fmu)
				return
			}
			f.status = st.Status
		})
		wg.Go(func() {
			if err := c.Execute(ctx, "query-migrate", nil, &mig); err != nil {
				f.fail("query-migrate", err, &fatal, &fmu)
				return
			}
			f.mig = &mig
		})
	}
	if need(RAMSize) {
		wg.Go(func() {
			var mem struct {
				Base    uint64  `json:"base-memory"`
				Plugged *uint64 `json:"plugged-memory"`
			}
			if err := c.Execute(ctx, "query-memory-size-summary", nil, &mem); err != nil {
				f.fail("query-memory-size-summary", err, &fatal, &fmu)
				return
			}
			f.ram = mem.Base
			if mem.Plugged != nil {
				f.ram += *mem.Plugged
			}
		})
	}
	if need(MachineType) {
		ask("qom-get /machine type", "qom-get", qomGet("/machine", "type"), &f.machine)
	}
	if need(VCPUTopology) {
		ask("qom-get /machine smp", "qom-get", qomGet("/machine", "smp"), &f.smp)
		ask("query-hotpluggable-cpus", "query-hotpluggable-cpus", nil, &f.slots)
	}
	if need(CPUModel, CPUFeatures, VCPUTopology) {
		wg.Go(func() {
			if err := c.Execute(ctx, "query-cpus-fast", nil, &f.cpus); err != nil {
				f.fail("query-cpus-fast", err, &fatal, &fmu)
				return
			}
			if need(CPUModel, CPUFeatures) {
				f.readVCPUs(ctx, &fatal, &fmu)
			}
		})
	}
	if need(Devices, PostcopyDevices) {
		wg.Go(func() {
			p, err := children(ctx, c, "/machine/peripheral")
			if err != nil {
				f.fail("qom-list /machine/peripheral", err, &fatal, &fmu)
				return
			}
			f.peripheral = p
		})
		wg.Go(func() {
			p, err := children(ctx, c, "/machine/peripheral-anon")
			if err != nil {
				f.fail("qom-list /machine/peripheral-anon", err, &fatal, &fmu)
				return
			}
			for _, name := range sortedKeys(p) {
				f.anon = append(f.anon, p[name])
			}
			sort.Strings(f.anon)
		})
	}
	if need(PCIAddresses) {
		wg.Go(func() {
			var buses []pciBus
			if err := c.Execute(ctx, "query-pci", nil, &buses); err != nil {
				f.fail("query-pci", err, &fatal, &fmu)
				return
			}
			f.pci = flattenPCI(buses)
		})
	}
	if need(BlockDevices) {
		ask("query-block", "query-block", nil, &f.blocks)
	}
	if need(PostcopyUserfaultfd) && opts.Postcopy != PostcopyOff {
		wg.Go(func() {
			var caps []struct {
				Name  string `json:"capability"`
				State bool   `json:"state"`
			}
			if err := c.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
				f.fail("query-migrate-capabilities", err, &fatal, &fmu)
				return
			}
			f.caps = map[string]bool{}
			for _, cp := range caps {
				f.caps[cp.Name] = cp.State
			}
		})
	}
	wg.Wait()
	if fatal != nil {
		return nil, fatal
	}
	return f, nil
}

// fail records err for op: a QMP error in f.errs, anything else (the
// connection, ctx) as the side's fatal error (the first one wins).
func (f *facts) fail(op string, err error, fatal *error, mu *sync.Mutex) {
	if isQMPError(err) {
		f.mu.Lock()
		f.errs[op] = err
		f.mu.Unlock()
		return
	}
	mu.Lock()
	if *fatal == nil {
		*fatal = &SideError{Side: f.side, Op: op, Err: err}
	}
	mu.Unlock()
}

// err returns the QMP error recorded for op (nil when none).
func (f *facts) err(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.errs[op]
}

// readVCPUs reads the CPUID feature words of every vCPU's CPU object and
// the model properties of the first one, all in flight at once.
func (f *facts) readVCPUs(ctx context.Context, fatal *error, mu *sync.Mutex) {
	f.vcpus = make([]vcpuInfo, len(f.cpus))
	var wg sync.WaitGroup
	var vmu sync.Mutex
	for i, cpu := range f.cpus {
		v := &f.vcpus[i]
		v.scalars = map[string]json.RawMessage{}
		wg.Go(func() {
			err := f.c.Execute(ctx, "qom-get", qomGet(cpu.QOMPath, "feature-words"), &v.words)
			if err != nil {
				if !isQMPError(err) {
					f.fail("qom-get "+cpu.QOMPath+" feature-words", err, fatal, mu)
				}
				v.wordErr = err
			}
		})
		if i > 0 {
			// QEMU gives every vCPU the -cpu model (a hotplugged one must
			// be of the same type): the model is read on the first vCPU,
			// the feature words on each. Each qom-get costs a main-loop
			// turn of QEMU (~0.3 ms measured on 10.0 under TCG).
			continue
		}
		for _, p := range cpuScalars {
			wg.Go(func() {
				var raw json.RawMessage
				err := f.c.Execute(ctx, "qom-get", qomGet(cpu.QOMPath, p), &raw)
				if err != nil {
					if !isQMPError(err) {
						f.fail("qom-get "+cpu.QOMPath+" "+p, err, fatal, mu)
					}
					return // a property this CPU does not have
				}
				vmu.Lock()
				v.scalars[p] = raw
				vmu.Unlock()
			})
		}
	}
	wg.Wait()
}

func qomGet(path, prop string) map[string]string {
	return map[string]string{"path": path, "property": prop}
}

// children lists the child<TYPE> properties of a QOM path: name -> TYPE.
func children(ctx context.Context, c *qmp.Client, path string) (map[string]string, error) {
	var props []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := c.Execute(ctx, "qom-list", map[string]string{"path": path}, &props); err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, p := range props {
		if t, ok := strings.CutPrefix(p.Type, "child<"); ok {
			out[p.Name] = strings.TrimSuffix(t, ">")
		}
	}
	return out, nil
}

// pciBus is one bus of query-pci; bridges nest the buses behind them.
type pciBus struct {
	Bus     int         `json:"bus"`
	Devices []pciDevice `json:"devices"`
}

type pciDevice struct {
	Bus       int    `json:"bus"`
	Slot      int    `json:"slot"`
	Function  int    `json:"function"`
	QdevID    string `json:"qdev_id"`
	ClassInfo struct {
		Desc string `json:"desc"`
	} `json:"class_info"`
	ID struct {
		Vendor int `json:"vendor"`
		Device int `json:"device"`
	} `json:"id"`
	PCIBridge *struct {
		Devices []pciDevice `json:"devices"`
	} `json:"pci_bridge"`
}

func flattenPCI(buses []pciBus) []pciFunc {
	var out []pciFunc
	var walk func([]pciDevice)
	walk = func(devs []pciDevice) {
		for _, d := range devs {
			out = append(out, pciFunc{Bus: d.Bus, Slot: d.Slot, Function: d.Function, Vendor: d.ID.Vendor,
				Device: d.ID.Device, Class: d.ClassInfo.Desc, QdevID: d.QdevID})
			if d.PCIBridge != nil {
				walk(d.PCIBridge.Devices)
			}
		}
	}
	for _, b := range buses {
		walk(b.Devices)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].addr() < out[j].addr() })
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
