package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qmp"
)

// checkPair starts an idle source (no guest: SeaBIOS finds nothing to boot)
// and a destination waiting with -incoming defer, one after the other.
func checkPair(t *testing.T, sq, dq *qemulab.QEMU, src, dst qemulab.Config) (*qemulab.Instance, *qemulab.Instance) {
	t.Helper()
	src.Name, dst.Name = "src", "dst"
	dst.Incoming = true
	if src.Machine == "" {
		src.Machine = "pc"
	}
	if dst.Machine == "" {
		dst.Machine = "pc"
	}
	src.MemMiB, dst.MemMiB = 64, 64
	s := qemulab.StartT(t, sq, src)
	d := qemulab.StartT(t, dq, dst)
	return s, d
}

// runState is what the check must leave as it was.
func runState(t *testing.T, c *qmp.Client) string {
	t.Helper()
	st, err := c.QueryStatus(tbTimeout(t, 10*time.Second))
	require.NoError(t, err)
	caps, err := c.QueryMigrateCapabilities(tbTimeout(t, 10*time.Second))
	require.NoError(t, err)
	var on []string
	for name, v := range caps {
		if v {
			on = append(on, name)
		}
	}
	slices.Sort(on)
	return st.Status + " " + strings.Join(on, ",")
}

func runCheck(t *testing.T, s, d *qemulab.Instance, opts preflight.Options) *preflight.Report {
	t.Helper()
	before := [2]string{runState(t, s.QMP), runState(t, d.QMP)}
	rep, err := preflight.Run(tbTimeout(t, 30*time.Second), s.QMP, d.QMP, opts)
	require.NoError(t, err)
	for _, r := range rep.Results {
		t.Logf("%-20s %-4s %s", r.Check, r.Status, r.Detail)
	}
	assert.Equal(t, before, [2]string{runState(t, s.QMP), runState(t, d.QMP)}, "the check changed nothing")
	return rep
}

func failed(rep *preflight.Report) []preflight.Name {
	var out []preflight.Name
	for _, r := range rep.Failed() {
		out = append(out, r.Check)
	}
	return out
}

func detail(t *testing.T, rep *preflight.Report, n preflight.Name) string {
	t.Helper()
	r, ok := rep.Result(n)
	require.True(t, ok)
	return r.Detail
}

// TestCheck builds a failing pair for each check from real QEMUs, and a
// passing one, on the QEMU of QMIGRATE_QEMU.
func TestCheck(t *testing.T) {
	q, v := tbQEMU(t)
	ivshmem := []string{"-object", "memory-backend-ram,id=shm,size=1M", "-device", "ivshmem-plain,memdev=shm,id=iv0"}

	t.Run("Passes", func(t *testing.T) {
		args := []string{"-smp", "2", "-device", "virtio-net-pci,id=net0", "-device", "virtio-rng-pci"}
		s, d := checkPair(t, q, q, qemulab.Config{Args: args}, qemulab.Config{Args: args})
		rep := runCheck(t, s, d, preflight.Options{Postcopy: preflight.PostcopyAllowed, DestinationPID: d.Pid()})
		assert.True(t, rep.OK(), "%v", rep.Failed())
		assert.True(t, rep.Postcopy)
		// Root on the test machines: userfaultfd is usable.
		if os.Geteuid() == 0 {
			r, _ := rep.Result(preflight.PostcopyUserfaultfd)
			assert.Equal(t, preflight.Pass, r.Status, r.Detail)
		}
		measureCheck(t, s.QMP, d.QMP)
	})
	t.Run("CPUFlags", func(t *testing.T) {
		s, d := checkPair(t, q, q, qemulab.Config{CPU: "max"}, qemulab.Config{CPU: "max,-popcnt,-sse4.2"})
		rep := runCheck(t, s, d, preflight.Options{})
		assert.Equal(t, []preflight.Name{preflight.CPUFeatures}, failed(rep))
		assert.Contains(t, detail(t, rep, preflight.CPUFeatures), "destination lacks popcnt, sse4.2;")
	})
	t.Run("MissingDevice", func(t *testing.T) {
		s, d := checkPair(t, q, q, qemulab.Config{Args: []string{"-device", "virtio-rng-pci,id=rng0", "-device", "virtio-net-pci,id=net0"}},
			qemulab.Config{Args: []string{"-device", "virtio-net-pci,id=net0"}})
		rep := runCheck(t, s, d, preflight.Options{})
		assert.Equal(t, []preflight.Name{preflight.Devices, preflight.PCIAddresses}, failed(rep))
		assert.Equal(t, "device rng0 (virtio-rng-pci) is missing on the destination", detail(t, rep, preflight.Devices))
		assert.Contains(t, detail(t, rep, preflight.PCIAddresses), "net0 sits at 00:03.0 on the source, 00:02.0 on the destination")
	})
	t.Run("VCPUCount", func(t *testing.T) {
		s, d := checkPair(t, q, q, qemulab.Config{Args: []string{"-smp", "2"}}, qemulab.Config{Args: []string{"-smp", "1"}})
		rep := runCheck(t, s, d, preflight.Options{})
		assert.Contains(t, failed(rep), preflight.VCPUTopology)
		assert.Contains(t, detail(t, rep, preflight.VCPUTopology), "the source has 2 vCPUs, the destination 1")
		// With more than one vCPU, CPUID.1:EDX's ht (and, where QEMU sets
		// it up front, CPUID.80000001:ECX's cmp-legacy) differ: the guest's
		// CPU itself differs too (7.2.22 reports both, 10.0.2 ht).
		if slices.Contains(failed(rep), preflight.CPUFeatures) {
			d := detail(t, rep, preflight.CPUFeatures)
			assert.Contains(t, d, "destination lacks ")
			assert.Regexp(t, `lacks (cmp-legacy, )?ht;`, d)
			assert.Len(t, failed(rep), 2)
		}
	})
	t.Run("MigrationBlocker", func(t *testing.T) {
		s, d := checkPair(t, q, q, qemulab.Config{Args: ivshmem}, qemulab.Config{Args: ivshmem})
		rep := runCheck(t, s, d, preflight.Options{})
		assert.Equal(t, []preflight.Name{preflight.MigrationBlockers}, failed(rep))
		assert.Contains(t, detail(t, rep, preflight.MigrationBlockers), "device 'ivshmem'")
	})
	t.Run("DiskSize", func(t *testing.T) {
		dir := t.TempDir()
		disk := func(name string, size int64) []string {
			p := filepath.Join(dir, name)
			require.NoError(t, os.WriteFile(p, nil, 0o600))
			require.NoError(t, os.Truncate(p, size))
			return []string{"-drive", "file=" + p + ",format=raw,if=none,id=drive0", "-device", "virtio-blk-pci,drive=drive0,id=vblk0"}
		}
		s, d := checkPair(t, q, q, qemulab.Config{Args: disk("a.raw", 8<<20)}, qemulab.Config{Args: disk("b.raw", 16<<20)})
		rep := runCheck(t, s, d, preflight.Options{Storage: &preflight.Storage{}})
		assert.Equal(t, []preflight.Name{preflight.BlockDevices}, failed(rep))
		assert.Equal(t, "disk drive0 has 8 MiB on the source, 16 MiB on the destination", detail(t, rep, preflight.BlockDevices))
	})
	t.Run("MachineType", func(t *testing.T) {
		older := "pc-i440fx-7.1"
		s, d := checkPair(t, q, q, qemulab.Config{}, qemulab.Config{Machine: older})
		rep := runCheck(t, s, d, preflight.Options{})
		assert.Contains(t, failed(rep), preflight.MachineType)
		want := fmt.Sprintf("pc-i440fx-%d.%d", v.Major, v.Minor)
		assert.Contains(t, detail(t, rep, preflight.MachineType), "start the destination with -machine "+want)
	})
	// The host upgrade: 7.2 to 10.0, when both are installed
	// (scripts/setup.sh): unpinned refused with the hint, pinned passes, both
	// ways.
	t.Run("Upgrade", func(t *testing.T) {
		q72, q10 := cachedQEMU(t, "7.2"), cachedQEMU(t, "10.0")
		s, d := checkPair(t, q72, q10, qemulab.Config{CPU: "max"}, qemulab.Config{CPU: "max"})
		rep := runCheck(t, s, d, preflight.Options{})
		assert.Equal(t, []preflight.Name{preflight.MachineType, preflight.CPUModel, preflight.CPUFeatures}, failed(rep))
		assert.Contains(t, detail(t, rep, preflight.MachineType), `"pc" resolved to pc-i440fx-7.2 on the source and pc-i440fx-10.0 on the destination): start the destination with -machine pc-i440fx-7.2`)
		s.Close()
		d.Close()
		for _, dir := range [][2]*qemulab.QEMU{{q72, q10}, {q10, q72}} {
			pinned := qemulab.Config{Machine: "pc-i440fx-7.2", CPU: "qemu64"}
			s, d := checkPair(t, dir[0], dir[1], pinned, pinned)
			rep := runCheck(t, s, d, preflight.Options{})
			assert.True(t, rep.OK(), "%v", rep.Failed())
			s.Close()
			d.Close()
		}
	})
}

// cachedQEMU reads $QMIGRATE_CACHE/qemu-VERSION.env (scripts/setup.sh); the
// test is skipped (failed under CI) without it.
func cachedQEMU(t *testing.T, version string) *qemulab.QEMU {
	t.Helper()
	cache := os.Getenv("QMIGRATE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "qmigrate")
	}
	b, err := os.ReadFile(filepath.Join(cache, "qemu-"+version+".env"))
	if err != nil {
		qemulab.SkipOrFail(t, "QEMU %s: %v (run scripts/setup.sh)", version, err)
	}
	q := &qemulab.QEMU{}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, val, _ := strings.Cut(line, "=")
		switch k {
		case qemulab.EnvQEMU:
			q.Binary = val
		case qemulab.EnvQEMUFirmware:
			q.Firmware = val
		}
	}
	return q
}

// measureCheck logs what the checks cost against the queries the engine's
// prepare sends today (its inspect, without the storage schema), on the
// same pair: the median of 15 runs of each.
func measureCheck(t *testing.T, src, dst *qmp.Client) {
	t.Helper()
	ctx := tbTimeout(t, time.Minute)
	inspect := func(c *qmp.Client) {
		var wg sync.WaitGroup
		for _, cmd := range []struct {
			name string
			args any
		}{{"query-status", nil}, {"query-migrate", nil}, {"query-memory-size-summary", nil},
			{"qom-get", map[string]string{"path": "/machine", "property": "type"}},
			{"query-migrate-capabilities", nil}, {"query-migrate-parameters", nil}} {
			wg.Go(func() { _ = c.Execute(ctx, cmd.name, cmd.args, nil) })
		}
		wg.Wait()
	}
	median := func(f func()) time.Duration {
		var d []time.Duration
		for range 15 {
			t0 := time.Now()
			f()
			d = append(d, time.Since(t0))
		}
		slices.Sort(d)
		return d[len(d)/2]
	}
	base := median(func() {
		var wg sync.WaitGroup
		wg.Go(func() { inspect(dst) })
		inspect(src)
		wg.Wait()
	})
	check := median(func() {
		_, err := preflight.Run(ctx, src, dst, preflight.Options{Postcopy: preflight.PostcopyAllowed})
		require.NoError(t, err)
	})
	t.Logf("prepare's inspect: median %v; preflight.Run (every check, passing pair, 2 vCPUs): median %v (%.1fx)",
		base.Round(10*time.Microsecond), check.Round(10*time.Microsecond), float64(check)/float64(base))
}
