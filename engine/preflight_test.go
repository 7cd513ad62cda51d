package engine_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/strategy"
)

// A pair that differs in two ways is refused in prepare with both
// differences at once, typed, before anything changed on either QEMU.
func TestPreflightRefusesEveryDifferenceAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{
			DstCPU:     "qemu64,-cx16,+avx2",
			DstDevices: []qemutest.Device{{ID: "net0", Type: "virtio-net-pci"}, {ID: "rng0", Type: "virtio-rng-pci"}},
		})
		res, err := engine.Migrate(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrBadInput)
		require.ErrorIs(t, err, preflight.ErrFailed)
		assert.Equal(t, engine.CheckPreflight, engine.CheckOf(err))
		var pe *preflight.Error
		require.ErrorAs(t, err, &pe)
		assert.Equal(t, []preflight.Name{preflight.CPUFeatures, preflight.Devices, preflight.PCIAddresses}, pe.Checks())
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.PhasePrepare, ee.Phase)
		assert.Equal(t, engine.SideDestination, ee.Side)
		lines := strings.Split(err.Error(), "\n")
		require.Len(t, lines, 3)
		assert.Contains(t, lines[0], "cpu-features: destination lacks cx16; adds avx2")
		assert.Equal(t, "devices: device rng0 (virtio-rng-pci) is only on the destination", lines[1])
		assert.Equal(t, engine.StatusFailed, res.Status)
		// Nothing changed: no capability, parameter or object was set,
		// and nothing needed undoing.
		for _, q := range []*qemutest.QEMU{p.Src, p.Dst} {
			for _, cmd := range []string{"migrate-set-capabilities", "migrate-set-parameters", "object-add", "migrate-incoming", "migrate"} {
				assert.Empty(t, q.CallsOf(cmd), "%s got %s", q.Side(), cmd)
			}
		}
		assert.Empty(t, res.Undone)
		assert.Equal(t, "running", p.SrcRunState())
		assert.Equal(t, "inmigrate", p.DstRunState())
	})
}

// A migration blocker of the source is reported as QEMU words it, on the
// source's side.
func TestPreflightBlocker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const why = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"
		_, cfg := pair(t, qemutest.Options{Blockers: []string{why}})
		_, err := engine.Migrate(t.Context(), cfg)
		var pe *preflight.Error
		require.ErrorAs(t, err, &pe)
		assert.Equal(t, []preflight.Name{preflight.MigrationBlockers}, pe.Checks())
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Contains(t, err.Error(), why)
	})
}

// A pair that passes every check migrates: an upgrade from 7.2 to 10.0 with
// the machine type pinned; preflight's queries were sent to both sides
// before anything changed.
func TestPreflightPassingPairMigrates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, Machine: "pc-i440fx-7.2", VCPUs: 1})
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		for _, q := range []*qemutest.QEMU{p.Src, p.Dst} {
			calls := q.Calls()
			first := func(cmd string) int {
				for i, c := range calls {
					if c.Command == cmd {
						return i
					}
				}
				return -1
			}
			assert.GreaterOrEqual(t, first("query-cpus-fast"), 0, "%s", q.Side())
			assert.GreaterOrEqual(t, first("query-pci"), 0, "%s", q.Side())
			assert.Less(t, first("query-pci"), first("migrate-set-capabilities"), "%s: preflight before the changes", q.Side())
		}
	})
}

// The unpinned upgrade ("-machine pc" on 7.2 and 10.0) is refused with the
// hint naming the -machine to start the destination with.
func TestPreflightUnpinnedUpgrade(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, cfg := pair(t, qemutest.Options{Version: [3]int{7, 2, 22}, DstVersion: [3]int{10, 0, 2}, Machine: "pc"})
		_, err := engine.Migrate(t.Context(), cfg)
		var pe *preflight.Error
		require.ErrorAs(t, err, &pe)
		assert.Equal(t, []preflight.Name{preflight.MachineType}, pe.Checks())
		assert.Contains(t, err.Error(), `"pc" resolved to pc-i440fx-7.2 on the source and pc-i440fx-10.0 on the destination): start the destination with -machine pc-i440fx-7.2`)
	})
}

// A VFIO device forbids postcopy: with postcopy permitted, preflight turns
// it off (a warning) and the migration completes without it, where the
// fake (as QEMU) would fail a migration with postcopy-ram on.
func TestPreflightTurnsPostcopyOffForVFIO(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Devices: []qemutest.Device{{ID: "nic0", Type: "vfio-pci"}}})
		cfg.Strategy.Limits.AllowPostcopy = true
		cfg.Strategy.Policy = strategy.PolicyQEMU
		logs := &logRecorder{}
		cfg.Logger = slog.New(logs)
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.False(t, p.Caps(qemutest.Source)["postcopy-ram"])
		assert.Contains(t, logs.text(), "postcopy not enabled")
		assert.Contains(t, logs.text(), "VFIO devices cannot migrate in postcopy")
	})
}

// logRecorder is a slog.Handler that keeps every record's text.
type logRecorder struct {
	mu    sync.Mutex
	lines []string
	recs  []slog.Record
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecorder) WithGroup(string) slog.Handler            { return l }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	s := r.Message
	r.Attrs(func(a slog.Attr) bool { s += " " + a.String(); return true })
	l.mu.Lock()
	l.lines = append(l.lines, s)
	l.recs = append(l.recs, r.Clone())
	l.mu.Unlock()
	return nil
}

func (l *logRecorder) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// took returns the duration attribute "took" of the first record msg.
func (l *logRecorder) took(msg string) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.recs {
		if r.Message != msg {
			continue
		}
		var d time.Duration
		found := false
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "took" {
				d, found = a.Value.Duration(), true
				return false
			}
			return true
		})
		return d, found
	}
	return 0, false
}

// BenchmarkPreflightInPrepare measures what preflight adds to prepare on
// the fake pair (2 vCPUs, a NIC and a disk, no storage copy): the prepare
// phase from the engine's phase events, preflight's share from its own
// debug record. ratio is prepare / (prepare - preflight): 1.0 would be
// free.
func BenchmarkPreflightInPrepare(b *testing.B) {
	var prep, pf time.Duration
	for b.Loop() {
		p := qemutest.New(qemutest.Options{VCPUs: 2, Disk: 1 << 20, Serial: true})
		src, err := p.Src.Client(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		dst, err := p.Dst.Client(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		logs := &logRecorder{}
		ctx, cancel := context.WithCancel(context.Background())
		var begin, end time.Duration
		cfg := engine.Config{Source: engine.Endpoint{Client: src}, Destination: engine.Endpoint{Client: dst},
			URI: "unix:/tmp/qmigrate-bench-nonexistent.sock", Logger: slog.New(logs),
			Observer: func(e engine.Event) {
				if e.Kind != engine.EventPhase {
					return
				}
				switch e.Phase {
				case engine.PhasePrepare:
					begin = e.Elapsed
				case engine.PhaseStart:
					end = e.Elapsed
					cancel() // prepare is what is measured
				}
			}}
		_, err = engine.Migrate(ctx, cfg)
		if !errors.Is(err, engine.ErrCancelled) {
			b.Fatalf("want a cancel after prepare, got %v", err)
		}
		d, ok := logs.took("preflight done")
		if !ok || end == 0 {
			b.Fatal("no prepare or preflight timing")
		}
		prep += end - begin
		pf += d
		cancel()
		src.Close()
		dst.Close()
		p.Close()
	}
	n := float64(b.N)
	b.ReportMetric(float64(prep.Microseconds())/n/1000, "prepare-ms")
	b.ReportMetric(float64(pf.Microseconds())/n/1000, "preflight-ms")
	b.ReportMetric(float64(prep)/float64(prep-pf), "ratio")
}
