package qemutest_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
)

func runPreflight(t *testing.T, opt qemutest.Options, popts preflight.Options) (*qemutest.Pair, *preflight.Report) {
	t.Helper()
	p := qemutest.New(opt)
	t.Cleanup(p.Close)
	src, dst, err := p.Clients(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { src.Close(); dst.Close() })
	rep, err := preflight.Run(t.Context(), src, dst, popts)
	require.NoError(t, err)
	return p, rep
}

func statuses(rep *preflight.Report) map[preflight.Name]preflight.Status {
	out := map[preflight.Name]preflight.Status{}
	for _, r := range rep.Results {
		out[r.Check] = r.Status
	}
	return out
}

// A default pair, and pairs of two versions pinned alike, pass every
// check (the warning of postcopy-userfaultfd aside: the fake has no
// process).
func TestPreflightPassesOnDefaultPairs(t *testing.T) {
	for name, opt := range map[string]qemutest.Options{
		"default":               {},
		"7.2 to 10.0 pinned":    {Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, Machine: "pc-i440fx-7.2"},
		"10.0 to 7.2 pinned":    {Version: [3]int{10, 0, 2}, DstVersion: [3]int{7, 2, 22}},
		"7.2 to 10.0, 2 vCPUs":  {Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, VCPUs: 2},
		"max, 4 vCPUs, a disk":  {CPU: "max", VCPUs: 4, Disk: 1 << 20},
		"hotpluggable slots":    {VCPUs: 2, MaxVCPUs: 4},
		"no device":             {Devices: []qemutest.Device{}},
		"devices without id":    {Devices: []qemutest.Device{{Type: "virtio-rng-pci"}, {ID: "n", Type: "e1000"}}},
		"default machine alias": {Machine: "q35"},
	} {
		t.Run(name, func(t *testing.T) {
			_, rep := runPreflight(t, opt, preflight.Options{Postcopy: preflight.PostcopyAllowed, Storage: &preflight.Storage{}})
			require.NoError(t, rep.Err())
			for _, r := range rep.Results {
				if r.Check != preflight.PostcopyUserfaultfd {
					assert.Equal(t, preflight.Pass, r.Status, "%s: %s", r.Check, r.Detail)
				}
			}
			assert.True(t, rep.Postcopy)
		})
	}
}

// Options make each check fail, with the detail real QEMU's replies give.
func TestPreflightFailures(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opt    qemutest.Options
		check  preflight.Name
		detail string
		also   []preflight.Name // the other checks that fail
	}{
		{"CPU features", qemutest.Options{DstCPU: "qemu64,-sse4.1,+avx2,+pku,-cx16"}, preflight.CPUFeatures,
			"destination lacks cx16; adds avx2, pku; the guest would see its CPU change on vCPU 0: 3 CPUID feature bits differ (CPUID.1H:ECX, CPUID.7H.0:EBX, CPUID.7H.0:ECX)", nil},
		{"CPU model", qemutest.Options{DstCPU: "max"}, preflight.CPUModel, "vCPU 0: type qemu64-x86_64-cpu on the source, max-x86_64-cpu on the destination, family 15 on the source, 6 on the destination",
			[]preflight.Name{preflight.CPUFeatures, preflight.VCPUTopology}},
		{"vCPU count", qemutest.Options{VCPUs: 2, DstVCPUs: 1, DstMaxVCPUs: 2}, preflight.VCPUTopology, "the source has 2 vCPUs, the destination 1", nil},
		{"missing device", qemutest.Options{DstDevices: []qemutest.Device{}}, preflight.Devices, "device net0 (virtio-net-pci) is missing on the destination",
			[]preflight.Name{preflight.PCIAddresses}},
		{"moved device", qemutest.Options{DstDevices: []qemutest.Device{{ID: "net0", Type: "virtio-net-pci", Slot: 7}}}, preflight.PCIAddresses, "net0 sits at 00:01.0 on the source, 00:07.0 on the destination", nil},
		{"blocker", qemutest.Options{Blockers: []string{"Migration is disabled when using feature 'peer mode' in device 'ivshmem'"}}, preflight.MigrationBlockers,
			"QEMU refuses to migrate this guest: Migration is disabled when using feature 'peer mode' in device 'ivshmem'", nil},
		{"machine alias", qemutest.Options{Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, Machine: "pc"}, preflight.MachineType,
			`the source runs machine type pc-i440fx-7.2, the destination pc-i440fx-10.0 ("pc" resolved to pc-i440fx-7.2 on the source and pc-i440fx-10.0 on the destination): start the destination with -machine pc-i440fx-7.2`, nil},
		{"RAM", qemutest.Options{DstRAM: 64 << 20}, preflight.RAMSize, "the source has 150 MiB of RAM, the destination 64 MiB: start the destination with -m 150M", nil},
		{"disk size", qemutest.Options{Disks: []qmp.BlockInfo{disk("/src/d.raw", 1<<20)}, DstDisks: []qmp.BlockInfo{disk("/dst/d.raw", 2<<20)}}, preflight.BlockDevices,
			"disk disk0 has 1 MiB on the source, 2 MiB on the destination", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, rep := runPreflight(t, tc.opt, preflight.Options{Storage: &preflight.Storage{}})
			var pe *preflight.Error
			require.ErrorAs(t, rep.Err(), &pe)
			if tc.also == nil {
				assert.Equal(t, []preflight.Name{tc.check}, pe.Checks(), "%v", pe)
			} else {
				assert.Equal(t, append([]preflight.Name{tc.check}, tc.also...), pe.Checks(), "%v", pe)
			}
			r, _ := rep.Result(tc.check)
			assert.Contains(t, r.Detail, tc.detail)
		})
	}
}

func disk(file string, size uint64) qmp.BlockInfo {
	return qmp.BlockInfo{QDev: "/machine/peripheral/vd0/virtio-backend", Type: "unknown",
		Inserted: &qmp.BlockDeviceInfo{NodeName: "disk0", File: file, Driver: "raw",
			Image: &qmp.ImageInfo{Filename: file, VirtualSize: size, Format: "raw"}}}
}

// A VFIO device forbids postcopy: preflight turns it off (a warning). (The
// fake then fails a migration with postcopy-ram on: engine tests.)
func TestVFIOForbidsPostcopy(t *testing.T) {
	devs := []qemutest.Device{{ID: "nic0", Type: "vfio-pci"}}
	_, rep := runPreflight(t, qemutest.Options{Devices: devs}, preflight.Options{Postcopy: preflight.PostcopyAllowed})
	require.NoError(t, rep.Err())
	assert.False(t, rep.Postcopy)
	r, _ := rep.Result(preflight.PostcopyDevices)
	assert.Equal(t, preflight.Warn, r.Status)
	assert.Contains(t, r.Detail, "nic0 (vfio-pci): VFIO devices cannot migrate in postcopy")
}

// The fake's replies to what preflight asks have the shape of real QEMU's
// (testdata/qmp/preflight): every field the fake gives, real QEMU gave too,
// with the same JSON type; and a fake set up as the captured pair gives the
// same report, disks aside.
func TestMachineRepliesShapedAsQEMU(t *testing.T) {
	for _, tc := range []struct {
		capture string
		opt     qemutest.Options
	}{
		{"same-10.0", qemutest.Options{Version: [3]int{10, 0, 2}, Machine: "pc-i440fx-7.2", VCPUs: 2, RAM: 64 << 20,
			Devices: []qemutest.Device{{ID: "net0", Type: "virtio-net-pci"}, {Type: "virtio-rng-pci"}, {ID: "vblk0", Type: "virtio-blk-pci"}}}},
		{"same-7.2", qemutest.Options{Version: [3]int{7, 2, 22}, Machine: "pc-i440fx-7.2", VCPUs: 2, RAM: 64 << 20,
			Devices: []qemutest.Device{{ID: "net0", Type: "virtio-net-pci"}, {Type: "virtio-rng-pci"}, {ID: "vblk0", Type: "virtio-blk-pci"}}}},
		{"upgrade-unpinned", qemutest.Options{Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, Machine: "pc", CPU: "max", RAM: 64 << 20,
			Devices: []qemutest.Device{{ID: "net0", Type: "virtio-net-pci"}, {Type: "virtio-rng-pci"}, {ID: "vblk0", Type: "virtio-blk-pci"}}}},
	} {
		t.Run(tc.capture, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("..", "testdata", "qmp", "preflight", tc.capture+".json"))
			require.NoError(t, err)
			var c struct {
				Postcopy int              `json:"postcopy"`
				Report   preflight.Report `json:"report"`
				Src      struct {
					Replies map[string]json.RawMessage `json:"replies"`
				} `json:"src"`
			}
			require.NoError(t, json.Unmarshal(b, &c))
			p, rep := runPreflight(t, tc.opt, preflight.Options{Postcopy: preflight.Postcopy(c.Postcopy)})
			for _, want := range c.Report.Results {
				if want.Check == preflight.BlockDevices {
					continue
				}
				got, ok := rep.Result(want.Check)
				require.True(t, ok)
				assert.Equal(t, want, got)
			}
			src, err := p.Src.Client(t.Context())
			require.NoError(t, err)
			defer src.Close()
			for k, raw := range c.Src.Replies {
				cmd, args, _ := strings.Cut(k, " ")
				var real struct {
					Return json.RawMessage `json:"return"`
				}
				require.NoError(t, json.Unmarshal(raw, &real))
				if real.Return == nil || cmd == "query-block" || cmd == "query-migrate-capabilities" {
					continue // an error reply; the block layer and capabilities are compared elsewhere
				}
				var a any
				if args != "" {
					require.NoError(t, json.Unmarshal([]byte(args), &a))
				}
				var fake json.RawMessage
				err = src.Execute(t.Context(), cmd, a, &fake)
				var qe *qmp.Error
				if cmd == "qom-get" && errors.As(err, &qe) {
					continue // a CPU property the fake does not list (preflight reads only the listed ones)
				}
				require.NoError(t, err, k)
				realShape, fakeShape := shape(t, real.Return), shape(t, fake)
				for path, typ := range fakeShape {
					rt, ok := realShape[path]
					if assert.True(t, ok, "%s: the fake gives %s, QEMU does not", k, path) {
						assert.Equal(t, rt, typ, "%s: %s", k, path)
					}
				}
			}
		})
	}
}

// shape flattens a JSON value into its paths ("[].props.core-id") and
// their JSON types.
func shape(t *testing.T, raw json.RawMessage) map[string]string {
	var v any
	require.NoError(t, json.Unmarshal(raw, &v))
	out := map[string]string{}
	var walk func(string, any)
	walk = func(path string, v any) {
		switch x := v.(type) {
		case map[string]any:
			out[path] = "object"
			for k, e := range x {
				walk(path+"."+k, e)
			}
		case []any:
			out[path] = "array"
			for _, e := range x {
				walk(path+"[]", e)
			}
		case string:
			out[path] = "string"
		case float64:
			out[path] = "number"
		case bool:
			out[path] = "bool"
		case nil:
			out[path] = "null"
		}
	}
	walk("", v)
	return out
}
