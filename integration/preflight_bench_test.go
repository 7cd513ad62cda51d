package integration

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
)

// tookHandler keeps the "took" attribute of the engine's "preflight done"
// debug record.
type tookHandler struct {
	mu   sync.Mutex
	took time.Duration
	seen bool
}

func (h *tookHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *tookHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *tookHandler) WithGroup(string) slog.Handler            { return h }
func (h *tookHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "preflight done" {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "took" {
			h.mu.Lock()
			h.took, h.seen = a.Value.Duration(), true
			h.mu.Unlock()
			return false
		}
		return true
	})
	return nil
}

// BenchmarkPreflightInPrepare measures what preflight adds to the engine's
// prepare on real QEMU: a pinned 7.2 source and 10.0 destination (the
// upgrade; 2 vCPUs, a NIC and a disk, SeaBIOS idle, no storage copy: the
// schema read of a storage migration is not in it). Each iteration runs
// engine.Migrate up to the start phase and cancels it there (the rollback
// restores what prepare set, the destination is untouched), then reads the
// prepare phase from the phase events and preflight's share from its debug
// record. ratio is prepare / (prepare - preflight). Run it alone:
//
//	go test -run '^$' -bench PreflightInPrepare -benchtime 20x ./integration/
func BenchmarkPreflightInPrepare(b *testing.B) {
	qs, err := qemulab.FindQEMUs()
	if err != nil {
		b.Skip(err)
	}
	var q72, q10 *qemulab.QEMU
	for _, q := range qs {
		switch v := q.Ver(); {
		case v.Major == 7 && v.Minor == 2:
			q72 = q
		case v.Major == 10 && v.Minor == 0:
			q10 = q
		}
	}
	if q72 == nil || q10 == nil {
		b.Skip("needs QEMU 7.2 and 10.0 (scripts/setup.sh; QMIGRATE_QEMU unset)")
	}
	dir := b.TempDir()
	args := func(name string) []string {
		// The source's RAM size on both (qemulab.RAMSize differs by version).
		return []string{"-m", qemulab.RAMSize(q72.Ver(), qemulab.DefaultAccel, 64), "-smp", "2", "-device", "virtio-net-pci,id=net0",
			"-drive", "file=" + filepath.Join(dir, name) + ",format=raw,if=none,id=drive0,node-name=disk0",
			"-device", "virtio-blk-pci,drive=drive0,id=vblk0"}
	}
	for _, name := range []string{"src.raw", "dst.raw"} {
		if err := writeSparse(filepath.Join(dir, name), 8<<20); err != nil {
			b.Fatal(err)
		}
	}
	ctx := context.Background()
	start := func(q *qemulab.QEMU, name string, incoming bool) *qemulab.Instance {
		inst, err := q.Start(ctx, qemulab.Config{Name: name, Machine: "pc-i440fx-7.2", CPU: "qemu64", MemMiB: 64,
			Incoming: incoming, Args: args(name + ".raw")})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { inst.Close() })
		return inst
	}
	src, dst := start(q72, "src", false), start(q10, "dst", true)
	var prep, pf time.Duration
	for b.Loop() {
		h := &tookHandler{}
		mctx, cancel := context.WithCancel(ctx)
		var begin, end time.Duration
		_, err := engine.Migrate(mctx, engine.Config{
			Source: engine.Endpoint{Client: src.QMP}, Destination: engine.Endpoint{Client: dst.QMP},
			URI: "unix:" + filepath.Join(dir, "mig.sock"), Logger: slog.New(h),
			Observer: func(e engine.Event) {
				if e.Kind != engine.EventPhase {
					return
				}
				switch e.Phase {
				case engine.PhasePrepare:
					begin = e.Elapsed
				case engine.PhaseStart:
					end = e.Elapsed
					cancel()
				}
			}})
		cancel()
		if !errors.Is(err, engine.ErrCancelled) {
			b.Fatalf("want a cancel after prepare, got %v", err)
		}
		if !h.seen || end == 0 {
			b.Fatal("no prepare or preflight timing")
		}
		prep += end - begin
		pf += h.took
	}
	n := float64(b.N)
	b.ReportMetric(float64(prep.Microseconds())/n/1000, "prepare-ms")
	b.ReportMetric(float64(pf.Microseconds())/n/1000, "preflight-ms")
	b.ReportMetric(float64(prep)/float64(prep-pf), "ratio")
}

// writeSparse creates a sparse file of size bytes.
func writeSparse(path string, size int64) error {
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		return err
	}
	return os.Truncate(path, size)
}
