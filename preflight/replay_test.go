package preflight_test

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
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// The captures in testdata/qmp/preflight hold, per scenario, every command
// preflight.Run sent to a real source and destination QEMU (7.2.22 and
// 10.0.2, see preflight/internal/capture), QEMU's replies and the report Run
// gave there. The tests replay them with qmptest fakes.

const captureDir = "../testdata/qmp/preflight"

type capture struct {
	Scenario string           `json:"scenario"`
	Postcopy int              `json:"postcopy"`
	Report   preflight.Report `json:"report"`
	Src      recording        `json:"src"`
	Dst      recording        `json:"dst"`
}

type recording struct {
	QEMU     string   `json:"qemu"`
	Args     []string `json:"args"`
	Greeting struct {
		QMP struct {
			Version struct {
				QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
			} `json:"version"`
		} `json:"QMP"`
	} `json:"greeting"`
	Replies map[string]json.RawMessage `json:"replies"`
}

func loadCapture(t *testing.T, name string) capture {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(captureDir, name+".json"))
	require.NoError(t, err)
	var c capture
	require.NoError(t, json.Unmarshal(b, &c))
	return c
}

// key files a request as the capture tool does: "command" or "command
// {canonical args}".
func key(command string, args json.RawMessage) string {
	if len(args) == 0 || string(args) == "null" {
		return command
	}
	var v any
	if err := json.Unmarshal(args, &v); err != nil {
		return command + " " + string(args)
	}
	b, _ := json.Marshal(v)
	return command + " " + string(b)
}

// replay makes a fake QEMU answering as the recorded one did. A request
// that was not recorded gets a GenericError naming it (which turns up as a
// warning, and fails the comparison with the recorded report).
func replay(t *testing.T, rec recording) *qmptest.Server {
	t.Helper()
	v := rec.Greeting.QMP.Version.QEMU
	srv := qmptest.NewServer(qmptest.WithVersion(v.Major, v.Minor, v.Micro))
	t.Cleanup(srv.Close)
	cmds := map[string]bool{}
	for k := range rec.Replies {
		cmd, _, _ := strings.Cut(k, " ")
		cmds[cmd] = true
	}
	for cmd := range cmds {
		srv.Handle(cmd, func(args json.RawMessage) (any, error) {
			k := key(cmd, args)
			raw, ok := rec.Replies[k]
			if !ok {
				return nil, &qmp.Error{Class: "GenericError", Desc: "not captured: " + k}
			}
			var r struct {
				Return json.RawMessage `json:"return"`
				Error  *qmp.Error      `json:"error"`
			}
			if err := json.Unmarshal(raw, &r); err != nil {
				return nil, err
			}
			if r.Error != nil {
				return nil, r.Error
			}
			return r.Return, nil
		})
	}
	return srv
}

func clients(t *testing.T, src, dst *qmptest.Server) (*qmp.Client, *qmp.Client) {
	t.Helper()
	sc, err := src.Client(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { sc.Close() })
	dc, err := dst.Client(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { dc.Close() })
	return sc, dc
}

// runCapture replays a scenario with opts.
func runCapture(t *testing.T, name string, opts preflight.Options) (*preflight.Report, capture) {
	t.Helper()
	c := loadCapture(t, name)
	sc, dc := clients(t, replay(t, c.Src), replay(t, c.Dst))
	rep, err := preflight.Run(t.Context(), sc, dc, opts)
	require.NoError(t, err)
	return rep, c
}

func result(t *testing.T, rep *preflight.Report, n preflight.Name) preflight.Result {
	t.Helper()
	r, ok := rep.Result(n)
	require.True(t, ok, "no result for %s", n)
	return r
}

// Every capture replays to the very report real QEMU gave.
func TestReplayGivesTheRealReport(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(captureDir, "*.json"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		t.Run(name, func(t *testing.T) {
			c := loadCapture(t, name)
			rep, _ := runCapture(t, name, preflight.Options{Postcopy: preflight.Postcopy(c.Postcopy)})
			assert.Equal(t, c.Report, *rep)
		})
	}
}

func TestSamePairsPass(t *testing.T) {
	for _, name := range []string{"same-7.2", "same-10.0", "upgrade-pinned", "downgrade-pinned"} {
		t.Run(name, func(t *testing.T) {
			rep, c := runCapture(t, name, preflight.Options{Postcopy: preflight.PostcopyAllowed})
			assert.True(t, rep.OK(), "%+v", rep.Failed())
			assert.NoError(t, rep.Err())
			assert.True(t, rep.Postcopy, "nothing forbids postcopy")
			assert.Len(t, rep.Results, len(preflight.Names()))
			for _, r := range rep.Results {
				want := preflight.Pass
				if r.Check == preflight.PostcopyUserfaultfd {
					want = preflight.Warn // the destination's pid is unknown
				}
				assert.Equal(t, want, r.Status, "%s: %s", r.Check, r.Detail)
			}
			if c.Src.QEMU != c.Dst.QEMU {
				assert.Equal(t, "pc-i440fx-7.2", result(t, rep, preflight.MachineType).Detail)
			}
		})
	}
}

// -machine pc -cpu max on 7.2 and 10.0: refused with every reason, the
// machine type hint and the features named one by one.
func TestUnpinnedUpgradeRefused(t *testing.T) {
	rep, _ := runCapture(t, "upgrade-unpinned", preflight.Options{})
	err := rep.Err()
	require.Error(t, err)
	assert.True(t, errors.Is(err, preflight.ErrFailed))
	var pe *preflight.Error
	require.True(t, errors.As(err, &pe))
	assert.Equal(t, []preflight.Name{preflight.MachineType, preflight.CPUModel, preflight.CPUFeatures}, pe.Checks())

	m := result(t, rep, preflight.MachineType)
	assert.Contains(t, m.Detail, `"pc" resolved to pc-i440fx-7.2 on the source and pc-i440fx-10.0 on the destination`)
	assert.Contains(t, m.Detail, "start the destination with -machine pc-i440fx-7.2")

	assert.Contains(t, result(t, rep, preflight.CPUModel).Detail, "family 15 on the source, 6 on the destination")

	f := result(t, rep, preflight.CPUFeatures).Detail
	assert.Contains(t, f, "destination lacks pcommit; adds 3dnowprefetch, cmp-legacy, fsrm, rdpid, rdseed, sha-ni, wbnoinvd, x2apic, xsaveerptr")
	assert.Contains(t, f, "on only the destination's QEMU: cmpccxadd, fsrc, fsrs, fzrm")
	assert.NotContains(t, f, "cmp_legacy", "aliases are named once")
	assert.NotContains(t, f, "x-", "internal switches are not features")
	assert.Contains(t, f, "14 CPUID feature bits differ")
	// One line per failed check in the error.
	assert.Len(t, strings.Split(err.Error(), "\n"), 3)
}

func TestCPUFlags(t *testing.T) {
	rep, _ := runCapture(t, "cpu-flags", preflight.Options{})
	r := result(t, rep, preflight.CPUFeatures)
	assert.Equal(t, preflight.Fail, r.Status)
	assert.True(t, strings.HasPrefix(r.Detail, "destination lacks avx2, popcnt, sse4.1; the guest would see its CPU change on vCPU 0: 3 CPUID feature bits differ"), r.Detail)
	assert.Equal(t, preflight.Pass, result(t, rep, preflight.CPUModel).Status)
	assert.Equal(t, []preflight.Result{r}, rep.Failed())
}

func TestDevicesMovedMissingAndRetyped(t *testing.T) {
	rep, _ := runCapture(t, "devices", preflight.Options{})
	d := result(t, rep, preflight.Devices)
	assert.Equal(t, preflight.Fail, d.Status)
	assert.Equal(t, "device ser0 is virtio-serial-pci on the source, e1000 on the destination; devices without id missing on the destination: virtio-rng-pci", d.Detail)
	p := result(t, rep, preflight.PCIAddresses)
	assert.Equal(t, preflight.Fail, p.Status)
	assert.Contains(t, p.Detail, "net0 sits at 00:02.0 on the source, 00:07.0 on the destination")
	assert.Contains(t, p.Detail, "00:03.0 1af4:1005 only on the source")
}

func TestVCPUCount(t *testing.T) {
	rep, _ := runCapture(t, "smp", preflight.Options{})
	r := result(t, rep, preflight.VCPUTopology)
	assert.Equal(t, preflight.Fail, r.Status)
	assert.Contains(t, r.Detail, "the source has 2 vCPUs, the destination 1")
	assert.Contains(t, r.Detail, "CPU slot core-id=1,socket-id=0,thread-id=0 is plugged on the source, empty on the destination")
}

func TestMigrationBlocker(t *testing.T) {
	rep, _ := runCapture(t, "blocker", preflight.Options{})
	r := result(t, rep, preflight.MigrationBlockers)
	assert.Equal(t, preflight.Fail, r.Status)
	assert.Equal(t, "QEMU refuses to migrate this guest: Migration is disabled when using feature 'peer mode' in device 'ivshmem'", r.Detail)
}

func TestDiskSize(t *testing.T) {
	for _, st := range []*preflight.Storage{nil, {}, {Disks: []string{"drive0"}}} {
		rep, _ := runCapture(t, "disk-size", preflight.Options{Storage: st})
		r := result(t, rep, preflight.BlockDevices)
		assert.Equal(t, preflight.Fail, r.Status)
		assert.Equal(t, "disk drive0 has 8 MiB on the source, 16 MiB on the destination", r.Detail)
	}
}

func TestStorageSelection(t *testing.T) {
	rep, _ := runCapture(t, "same-7.2", preflight.Options{Storage: &preflight.Storage{}})
	assert.Equal(t, "drive0 (copied, 8 MiB)", result(t, rep, preflight.BlockDevices).Detail)
	rep, _ = runCapture(t, "same-7.2", preflight.Options{Storage: &preflight.Storage{Disks: []string{"vblk0"}}})
	assert.Equal(t, "drive0 (copied, 8 MiB)", result(t, rep, preflight.BlockDevices).Detail)
	rep, _ = runCapture(t, "same-7.2", preflight.Options{Storage: &preflight.Storage{Disks: []string{"nope"}}})
	r := result(t, rep, preflight.BlockDevices)
	assert.Equal(t, preflight.Fail, r.Status)
	assert.Contains(t, r.Detail, "disk nope to copy is not on the source")
}

func TestRAMSize(t *testing.T) {
	rep, _ := runCapture(t, "ram", preflight.Options{})
	r := result(t, rep, preflight.RAMSize)
	assert.Equal(t, preflight.Fail, r.Status)
	assert.Equal(t, "the source has 64 MiB of RAM, the destination 128 MiB: start the destination with -m 64M", r.Detail)
}

// A destination that answers -incoming defer's "inmigrate" only on the
// source side: run state checks name both problems.
func TestRunStateSwapped(t *testing.T) {
	c := loadCapture(t, "same-10.0")
	// The destination as source and the reverse.
	sc, dc := clients(t, replay(t, c.Dst), replay(t, c.Src))
	rep, err := preflight.Run(t.Context(), sc, dc, preflight.Options{})
	require.NoError(t, err)
	r := result(t, rep, preflight.RunState)
	assert.Equal(t, preflight.Fail, r.Status)
	assert.Equal(t, `the source is in run state "inmigrate", want "running" (or "paused"); the destination is in run state "running", not "inmigrate": start it with -incoming defer`, r.Detail)
}

// withDevice adds a device to a recording's /machine/peripheral.
func withDevice(t *testing.T, rec recording, id, typ string) recording {
	t.Helper()
	k := key("qom-list", json.RawMessage(`{"path":"/machine/peripheral"}`))
	var r struct {
		Return []map[string]string `json:"return"`
	}
	require.NoError(t, json.Unmarshal(rec.Replies[k], &r))
	r.Return = append(r.Return, map[string]string{"name": id, "type": "child<" + typ + ">"})
	b, err := json.Marshal(r)
	require.NoError(t, err)
	out := rec
	out.Replies = map[string]json.RawMessage{}
	for k2, v := range rec.Replies {
		out.Replies[k2] = v
	}
	out.Replies[k] = b
	return out
}

func TestPostcopyForbiddenByVFIO(t *testing.T) {
	c := loadCapture(t, "same-10.0")
	src, dst := withDevice(t, c.Src, "hostdev0", "vfio-pci"), withDevice(t, c.Dst, "hostdev0", "vfio-pci")
	for _, tc := range []struct {
		pc   preflight.Postcopy
		want preflight.Status
	}{{preflight.PostcopyOff, preflight.Pass}, {preflight.PostcopyAllowed, preflight.Warn}, {preflight.PostcopyRequired, preflight.Fail}} {
		sc, dc := clients(t, replay(t, src), replay(t, dst))
		rep, err := preflight.Run(t.Context(), sc, dc, preflight.Options{Postcopy: tc.pc})
		require.NoError(t, err)
		r := result(t, rep, preflight.PostcopyDevices)
		assert.Equal(t, tc.want, r.Status, r.Detail)
		assert.False(t, rep.Postcopy)
		if tc.pc != preflight.PostcopyOff {
			assert.Contains(t, r.Detail, "hostdev0 (vfio-pci): VFIO devices cannot migrate in postcopy")
		}
		if tc.pc == preflight.PostcopyAllowed {
			assert.True(t, rep.OK(), "permitted postcopy is turned off, not refused")
			assert.Contains(t, r.Detail, "the migration runs without postcopy")
		}
		if tc.pc == preflight.PostcopyRequired {
			assert.False(t, rep.OK())
		}
	}
}

func TestVhostUserWarns(t *testing.T) {
	c := loadCapture(t, "same-10.0")
	src, dst := withDevice(t, c.Src, "fs0", "vhost-user-fs-pci"), withDevice(t, c.Dst, "fs0", "vhost-user-fs-pci")
	sc, dc := clients(t, replay(t, src), replay(t, dst))
	rep, err := preflight.Run(t.Context(), sc, dc, preflight.Options{Postcopy: preflight.PostcopyAllowed})
	require.NoError(t, err)
	r := result(t, rep, preflight.PostcopyDevices)
	assert.Equal(t, preflight.Warn, r.Status)
	assert.Contains(t, r.Detail, "its vhost-user backend must support postcopy")
	assert.True(t, rep.Postcopy)
}

// A query QEMU refuses makes its check a warning that says so; the others
// still run.
func TestRefusedQueryWarns(t *testing.T) {
	c := loadCapture(t, "same-7.2")
	src := replay(t, c.Src)
	src.Handle("query-pci", qmptest.Fail("CommandNotFound", "The command query-pci has not been found"))
	sc, dc := clients(t, src, replay(t, c.Dst))
	rep, err := preflight.Run(t.Context(), sc, dc, preflight.Options{})
	require.NoError(t, err)
	r := result(t, rep, preflight.PCIAddresses)
	assert.Equal(t, preflight.Warn, r.Status)
	assert.Equal(t, "not compared: the source QEMU 7.2.22 refused query-pci: qmp: query-pci: The command query-pci has not been found (CommandNotFound)", r.Detail)
	assert.True(t, rep.OK())
}

// A QEMU whose connection drops is Run's error, not a report.
func TestConnectionLost(t *testing.T) {
	c := loadCapture(t, "same-7.2")
	dst := replay(t, c.Dst)
	dst.Handle("query-block", func(json.RawMessage) (any, error) { return nil, qmptest.ErrCloseConn })
	sc, dc := clients(t, replay(t, c.Src), dst)
	rep, err := preflight.Run(t.Context(), sc, dc, preflight.Options{})
	require.Error(t, err)
	assert.Nil(t, rep)
	var se *preflight.SideError
	require.True(t, errors.As(err, &se), "%v", err)
	assert.Equal(t, "destination", se.Side)
}

// Skipped checks send nothing: the engine skips what it checks itself.
func TestSkip(t *testing.T) {
	c := loadCapture(t, "same-7.2")
	src := replay(t, c.Src)
	sc, dc := clients(t, src, replay(t, c.Dst))
	rep, err := preflight.Run(t.Context(), sc, dc, preflight.Options{Skip: []preflight.Name{
		preflight.RunState, preflight.RAMSize, preflight.CPUModel, preflight.CPUFeatures, preflight.MigrationBlockers}})
	require.NoError(t, err)
	assert.Len(t, rep.Results, len(preflight.Names())-5)
	for _, call := range src.Calls() {
		assert.NotContains(t, []string{"query-status", "query-migrate", "query-memory-size-summary"}, call.Command)
		if call.Command == "qom-get" {
			assert.NotContains(t, string(call.Args), "unattached", "no CPU object read")
		}
	}
}

// Only queries: Run never sends a command that changes anything.
func TestOnlyReads(t *testing.T) {
	c := loadCapture(t, "upgrade-unpinned")
	src, dst := replay(t, c.Src), replay(t, c.Dst)
	sc, dc := clients(t, src, dst)
	_, err := preflight.Run(t.Context(), sc, dc, preflight.Options{Postcopy: preflight.PostcopyRequired})
	require.NoError(t, err)
	for _, s := range []*qmptest.Server{src, dst} {
		for _, call := range s.Calls() {
			ok := strings.HasPrefix(call.Command, "query-") || call.Command == "qom-get" || call.Command == "qom-list"
			assert.True(t, ok, "%s sent", call.Command)
		}
	}
}
