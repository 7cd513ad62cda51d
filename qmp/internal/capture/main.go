// Command capture records real QEMU replies for the golden decode tests of
// package qmp. It starts at most two QEMU processes at a time through the
// repository's QEMU harness (internal/qemulab: TCG, paused 64 MiB guests),
// drives them through the migration states it can reach and writes each
// reply's "return" to <out>/<file>.json.
//
//	go run ./qmp/internal/capture -qemu /usr/bin/qemu-system-x86_64 -out testdata/qmp/7.2
//	go run ./qmp/internal/capture -qemu ~/.cache/qmigrate/qemu-10.0/usr/bin/qemu-system-x86_64 \
//	    -firmware ~/.cache/qmigrate/qemu-10.0/usr/share/qemu -out testdata/qmp/10.0
//
// Without -qemu it takes the harness's environment (QMIGRATE_QEMU,
// QMIGRATE_QEMU_FIRMWARE; see internal/qemulab).
//
// States that only exist for a moment (setup, cancelling, device) are caught
// by pipelining query-migrate right behind the command that enters them; when
// QEMU has already moved on, that file is simply not written.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

type capturer struct {
	qemu    *qemulab.QEMU
	out     string
	tmp     string
	memFile string
	zeroRAM bool
	logf    func(format string, args ...any) // the harness's command lines (-v)
}

// guestMiB is the guests' RAM.
const guestMiB = 64

type vm struct {
	name   string
	inst   *qemulab.Instance
	c      *qmp.Client
	sub    *qmp.Subscription
	mu     sync.Mutex
	events []json.RawMessage
}

func main() {
	qemu := flag.String("qemu", "", "QEMU binary (default: $QMIGRATE_QEMU, else qemu-system-x86_64 on PATH)")
	fw := flag.String("firmware", "", "-L folder (the QEMU's own share/qemu; default with -qemu: none, else $QMIGRATE_QEMU_FIRMWARE)")
	out := flag.String("out", "", "output folder, e.g. testdata/qmp/7.2")
	only := flag.String("only", "", "run only this scenario")
	verbose := flag.Bool("v", false, "log the QEMU command lines")
	flag.Parse()
	if *out == "" {
		log.Fatal("-out is required")
	}
	tmp, err := os.MkdirTemp("", "qmp-capture-")
	if err != nil {
		log.Fatal(err)
	}
	var logf func(string, ...any)
	if *verbose {
		logf = log.Printf
	}
	if err := run(tmp, *qemu, *fw, *out, *only, logf); err != nil {
		os.RemoveAll(tmp)
		log.Fatal(err)
	}
	os.RemoveAll(tmp)
}

func run(tmp, qemu, fw, out, only string, logf func(string, ...any)) error {
	var q *qemulab.QEMU
	var err error
	if qemu == "" {
		q, err = qemulab.FindQEMU()
	} else {
		q, err = qemulab.NewQEMU(qemu, fw, "")
	}
	if err != nil {
		return err
	}
	cp := &capturer{qemu: q, out: out, tmp: tmp, logf: logf}
	// Guest RAM backed by a private mapping of random data, so pages are not
	// zero and a throttled migration stays active.
	cp.memFile = filepath.Join(tmp, "mem")
	buf := make([]byte, q.RAMBytes(qemulab.Config{MemMiB: guestMiB}))
	rand.Read(buf)
	if err := os.WriteFile(cp.memFile, buf, 0o600); err != nil {
		return err
	}
	scenarios := []struct {
		name string
		f    func(context.Context) error
	}{
		{"basic", cp.basic},
		{"precopy", cp.precopy},
		{"setup", cp.setup},
		{"dstfail", cp.dstFail},
		{"argforms", cp.argForms},
		{"cancel", cp.cancel},
		{"failed", cp.failed},
		{"switchover", cp.switchover},
		{"postcopy", cp.postcopy},
		{"mirror", cp.mirror},
	}
	failed := false
	for _, s := range scenarios {
		if only != "" && s.name != only {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		log.Printf("scenario %s", s.name)
		if err := s.f(ctx); err != nil {
			log.Printf("scenario %s: %v", s.name, err)
			failed = true
		}
		cancel()
	}
	if failed {
		return errors.New("some scenarios failed")
	}
	return nil
}

// start starts a paused guest (a destination with incoming) with drives.
func (cp *capturer) start(ctx context.Context, name string, incoming bool, drives ...qemulab.Drive) (*vm, error) {
	cfg := qemulab.Config{Name: name, MemMiB: guestMiB, Paused: true, Incoming: incoming, Drives: drives, Logf: cp.logf}
	if !cp.zeroRAM {
		// userfaultfd (postcopy) does not work on a private file mapping.
		cfg.MemBackend = &qemulab.MemBackend{Path: cp.memFile}
	}
	inst, err := cp.qemu.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	v := &vm{name: name, inst: inst, c: inst.QMP}
	v.sub = v.c.Subscribe(qmp.EventFilter{Buffer: 4096})
	go func() {
		for ev := range v.sub.C {
			b, _ := json.Marshal(map[string]any{"event": ev.Name, "data": ev.Data})
			v.mu.Lock()
			v.events = append(v.events, b)
			v.mu.Unlock()
		}
	}()
	return v, nil
}

// kill stops QEMU and removes its files.
func (v *vm) kill() { v.inst.Close() }

// waitEvent waits for an event whose name and (optional) status match.
func (v *vm) waitStatus(ctx context.Context, want ...qmp.MigrationStatus) (qmp.MigrationStatus, error) {
	for {
		info, err := v.c.QueryMigrate(ctx)
		if err != nil {
			return "", err
		}
		for _, w := range want {
			if info.Status == w {
				return w, nil
			}
		}
		if info.Status.Terminal() {
			return "", fmt.Errorf("%s: waiting for %v, migration ended %s %s", v.name, want, info.Status, info.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("%s: waiting for %v, last %s: %w", v.name, want, info.Status, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (v *vm) raw(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	var r json.RawMessage
	err := v.c.Execute(ctx, cmd, args, &r)
	return r, err
}

// save runs cmd and writes its return to file.
func (cp *capturer) save(ctx context.Context, v *vm, file, cmd string, args any) (json.RawMessage, error) {
	r, err := v.raw(ctx, cmd, args)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", v.name, cmd, err)
	}
	return r, cp.write(file, r)
}

func (cp *capturer) write(file string, r json.RawMessage) error {
	path := filepath.Join(cp.out, file+".json")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	var out bytes.Buffer
	if len(r) > 64<<10 {
		out.Write(r) // the schema stays on one line, as QEMU sends it
	} else if err := json.Indent(&out, r, "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	log.Printf("  %s (%d bytes)", path, out.Len())
	return os.WriteFile(path, out.Bytes(), 0o644)
}

// saveIf runs query-migrate and keeps it only if the status is want: for
// states that last a moment.
func (cp *capturer) saveIf(r json.RawMessage, file string, want qmp.MigrationStatus) error {
	var info qmp.MigrationInfo
	if err := json.Unmarshal(r, &info); err != nil {
		return err
	}
	if info.Status != want {
		log.Printf("  %s: missed (status was %s)", file, info.Status)
		return nil
	}
	return cp.write(file, r)
}

// saveAsStatus keeps a query-migrate reply of a recovery state under
// prefix+status.
func (cp *capturer) saveAsStatus(r json.RawMessage, prefix string) error {
	var info qmp.MigrationInfo
	if err := json.Unmarshal(r, &info); err != nil {
		return err
	}
	switch info.Status {
	case qmp.StatusPostcopyRecover, qmp.StatusPostcopyRecoverSetup:
		return cp.write(prefix+string(info.Status), r)
	}
	log.Printf("  %s<recover>: missed (status was %s)", prefix, info.Status)
	return nil
}

func (cp *capturer) saveEvents(v *vm, file string) error {
	time.Sleep(100 * time.Millisecond)
	v.mu.Lock()
	evs := append([]json.RawMessage(nil), v.events...)
	v.mu.Unlock()
	b, err := json.Marshal(evs)
	if err != nil {
		return err
	}
	return cp.write(file, b)
}

// pipelined sends first and then query-migrate without waiting in between,
// so QEMU runs both in one go; it returns query-migrate's reply.
func pipelined(ctx context.Context, v *vm, cmd string, args any) (json.RawMessage, error) {
	errc := make(chan error, 1)
	go func() { errc <- v.c.Execute(ctx, cmd, args, nil) }()
	time.Sleep(time.Millisecond) // let cmd be written first
	r, qerr := v.raw(ctx, "query-migrate", nil)
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("%s: %w", cmd, err)
	}
	return r, qerr
}

func (cp *capturer) basic(ctx context.Context) error {
	v, err := cp.start(ctx, "src", false)
	if err != nil {
		return err
	}
	defer v.kill()
	for _, c := range []struct{ file, cmd string }{
		{"query-version", "query-version"},
		{"query-status/prelaunch", "query-status"},
		{"query-migrate/src-none", "query-migrate"},
		{"query-migrate-parameters", "query-migrate-parameters"},
		{"query-migrate-capabilities", "query-migrate-capabilities"},
		{"query-qmp-schema", "query-qmp-schema"},
		{"query-block-jobs/none", "query-block-jobs"},
	} {
		if _, err := cp.save(ctx, v, c.file, c.cmd, nil); err != nil {
			return err
		}
	}
	return nil
}

func (cp *capturer) pair(ctx context.Context, srcCaps, dstCaps map[string]bool) (src, dst *vm, uri string, err error) {
	src, err = cp.start(ctx, "src", false)
	if err != nil {
		return nil, nil, "", err
	}
	dst, err = cp.start(ctx, "dst", true)
	if err != nil {
		src.kill()
		return nil, nil, "", err
	}
	if err = src.c.MigrateSetCapabilities(ctx, srcCaps); err == nil {
		err = dst.c.MigrateSetCapabilities(ctx, dstCaps)
	}
	if err != nil {
		src.kill()
		dst.kill()
		return nil, nil, "", err
	}
	uri = "unix:" + filepath.Join(cp.tmp, "mig.sock")
	return src, dst, uri, nil
}

func (cp *capturer) precopy(ctx context.Context) error {
	caps := map[string]bool{"events": true}
	src, dst, uri, err := cp.pair(ctx, caps, caps)
	if err != nil {
		return err
	}
	defer src.kill()
	defer dst.kill()
	if _, err := cp.save(ctx, dst, "query-migrate/dst-none", "query-migrate", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, dst, "query-status/inmigrate", "query-status", nil); err != nil {
		return err
	}
	if err := dst.c.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: uri}); err != nil {
		return err
	}
	if _, err := cp.save(ctx, dst, "query-migrate/dst-setup", "query-migrate", nil); err != nil {
		return err
	}
	if err := src.c.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: qmp.Ptr[uint64](4 << 20)}); err != nil {
		return err
	}
	r, err := pipelined(ctx, src, "migrate", map[string]any{"uri": uri})
	if err != nil {
		return err
	}
	if err := cp.saveIf(r, "query-migrate/src-setup", qmp.StatusSetup); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusActive); err != nil {
		return err
	}
	time.Sleep(2500 * time.Millisecond) // a few passes of the rate limiter
	if _, err := cp.save(ctx, src, "query-migrate/src-active", "query-migrate", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, dst, "query-migrate/dst-active", "query-migrate", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, src, "query-migrate-parameters-during", "query-migrate-parameters", nil); err != nil {
		return err
	}
	if err := src.c.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: qmp.Ptr[uint64](1 << 40)}); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusCompleted); err != nil {
		return err
	}
	if _, err := dst.waitStatus(ctx, qmp.StatusCompleted); err != nil {
		return err
	}
	for _, s := range []struct {
		v    *vm
		file string
	}{{src, "query-migrate/src-completed"}, {dst, "query-migrate/dst-completed"}} {
		if _, err := cp.save(ctx, s.v, s.file, "query-migrate", nil); err != nil {
			return err
		}
	}
	if _, err := cp.save(ctx, src, "query-status/postmigrate", "query-status", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, dst, "query-status/paused", "query-status", nil); err != nil {
		return err
	}
	if err := cp.saveEvents(src, "events/precopy-src"); err != nil {
		return err
	}
	return cp.saveEvents(dst, "events/precopy-dst")
}

func (cp *capturer) cancel(ctx context.Context) error {
	caps := map[string]bool{"events": true}
	src, dst, uri, err := cp.pair(ctx, caps, caps)
	if err != nil {
		return err
	}
	defer src.kill()
	defer dst.kill()
	if err := dst.c.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: uri}); err != nil {
		return err
	}
	if err := src.c.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: qmp.Ptr[uint64](1 << 20)}); err != nil {
		return err
	}
	if err := src.c.Migrate(ctx, qmp.MigrateArgs{URI: uri}); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusActive); err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	r, err := pipelined(ctx, src, "migrate_cancel", nil)
	if err != nil {
		return err
	}
	if err := cp.saveIf(r, "query-migrate/src-cancelling", qmp.StatusCancelling); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusCancelled); err != nil {
		return err
	}
	if _, err := cp.save(ctx, src, "query-migrate/src-cancelled", "query-migrate", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, src, "query-status/after-cancel", "query-status", nil); err != nil {
		return err
	}
	return cp.saveEvents(src, "events/cancel-src")
}

func (cp *capturer) failed(ctx context.Context) error {
	src, err := cp.start(ctx, "src", false)
	if err != nil {
		return err
	}
	defer src.kill()
	if err := src.c.MigrateSetCapabilities(ctx, map[string]bool{"events": true}); err != nil {
		return err
	}
	err = src.c.Migrate(ctx, qmp.MigrateArgs{URI: "unix:" + filepath.Join(cp.tmp, "nobody-listens.sock")})
	if err != nil {
		// Some versions refuse at once; keep the error reply too.
		var qe *qmp.Error
		if !errors.As(err, &qe) {
			return err
		}
		b, _ := json.Marshal(map[string]string{"class": qe.Class, "desc": qe.Desc})
		if err := cp.write("errors/migrate-no-listener", b); err != nil {
			return err
		}
	}
	if _, err := src.waitStatus(ctx, qmp.StatusFailed); err != nil {
		return err
	}
	if _, err := cp.save(ctx, src, "query-migrate/src-failed", "query-migrate", nil); err != nil {
		return err
	}
	// A few error replies with their classes.
	errs := []struct {
		file, cmd string
		args      any
	}{
		{"errors/command-not-found", "no-such-command", nil},
		{"errors/migrate-continue-wrong-state", "migrate-continue", map[string]any{"state": "pre-switchover"}},
		{"errors/block-job-cancel-no-job", "block-job-cancel", map[string]any{"device": "nojob"}},
		{"errors/closefd-unknown", "closefd", map[string]any{"fdname": "nofd"}},
		{"errors/migrate-set-parameters-bad", "migrate-set-parameters", map[string]any{"downtime-limit": 999999999999}},
	}
	for _, e := range errs {
		err := src.c.Execute(ctx, e.cmd, e.args, nil)
		var qe *qmp.Error
		if !errors.As(err, &qe) {
			return fmt.Errorf("%s: want a QMP error, got %v", e.cmd, err)
		}
		b, _ := json.Marshal(map[string]string{"class": qe.Class, "desc": qe.Desc})
		if err := cp.write(e.file, b); err != nil {
			return err
		}
	}
	return cp.saveEvents(src, "events/failed-src")
}

func (cp *capturer) switchover(ctx context.Context) error {
	src, dst, uri, err := cp.pair(ctx, map[string]bool{"events": true, "pause-before-switchover": true}, map[string]bool{"events": true})
	if err != nil {
		return err
	}
	defer src.kill()
	defer dst.kill()
	if err := dst.c.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: uri}); err != nil {
		return err
	}
	if err := src.c.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: qmp.Ptr[uint64](1 << 40)}); err != nil {
		return err
	}
	if err := src.c.Migrate(ctx, qmp.MigrateArgs{URI: uri}); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusPreSwitchover); err != nil {
		return err
	}
	if _, err := cp.save(ctx, src, "query-migrate/src-pre-switchover", "query-migrate", nil); err != nil {
		return err
	}
	r, err := pipelined(ctx, src, "migrate-continue", map[string]any{"state": "pre-switchover"})
	if err != nil {
		return err
	}
	if err := cp.saveIf(r, "query-migrate/src-device", qmp.StatusDevice); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusCompleted); err != nil {
		return err
	}
	if _, err := dst.waitStatus(ctx, qmp.StatusCompleted); err != nil {
		return err
	}
	if err := cp.saveEvents(src, "events/switchover-src"); err != nil {
		return err
	}
	return cp.saveEvents(dst, "events/switchover-dst")
}

func (cp *capturer) postcopy(ctx context.Context) error {
	caps := map[string]bool{"events": true, "postcopy-ram": true}
	cp.zeroRAM = true
	defer func() { cp.zeroRAM = false }()
	src, dst, uri, err := cp.pair(ctx, caps, caps)
	if err != nil {
		return err
	}
	defer src.kill()
	defer dst.kill()
	if err := dst.c.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: uri}); err != nil {
		return err
	}
	if err := src.c.MigrateSetParameters(ctx, qmp.MigrationParameters{
		MaxBandwidth: qmp.Ptr[uint64](10000), MaxPostcopyBandwidth: qmp.Ptr[uint64](10000),
	}); err != nil {
		return err
	}
	if err := src.c.Migrate(ctx, qmp.MigrateArgs{URI: uri}); err != nil {
		return err
	}
	if err := src.c.MigrateStartPostcopy(ctx); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusPostcopyActive); err != nil {
		return err
	}
	if _, err := dst.waitStatus(ctx, qmp.StatusPostcopyActive); err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	for _, s := range []struct {
		v    *vm
		file string
	}{{src, "query-migrate/src-postcopy-active"}, {dst, "query-migrate/dst-postcopy-active"}} {
		r, err := s.v.raw(ctx, "query-migrate", nil)
		if err != nil {
			return err
		}
		if err := cp.saveIf(r, s.file, qmp.StatusPostcopyActive); err != nil {
			return err
		}
	}
	// Pause (out of band) and recover over a new channel.
	if err := src.c.MigratePause(ctx); err != nil {
		return err
	}
	for _, v := range []*vm{src, dst} {
		if _, err := v.waitStatus(ctx, qmp.StatusPostcopyPaused); err != nil {
			return err
		}
		if _, err := cp.save(ctx, v, "query-migrate/"+v.name+"-postcopy-paused", "query-migrate", nil); err != nil {
			return err
		}
	}
	uri2 := "unix:" + filepath.Join(cp.tmp, "mig2.sock")
	r, err := pipelined(ctx, dst, "migrate-recover", map[string]any{"uri": uri2})
	if err != nil {
		return err
	}
	if err := cp.saveAsStatus(r, "query-migrate/dst-"); err != nil {
		return err
	}
	r, err = pipelined(ctx, src, "migrate", map[string]any{"uri": uri2, "resume": true})
	if err != nil {
		return err
	}
	if err := cp.saveAsStatus(r, "query-migrate/src-"); err != nil {
		return err
	}
	if err := src.c.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxPostcopyBandwidth: qmp.Ptr[uint64](0)}); err != nil {
		return err
	}
	if _, err := src.waitStatus(ctx, qmp.StatusCompleted); err != nil {
		return err
	}
	if _, err := dst.waitStatus(ctx, qmp.StatusCompleted); err != nil {
		return err
	}
	if _, err := cp.save(ctx, src, "query-migrate/src-postcopy-completed", "query-migrate", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, dst, "query-migrate/dst-postcopy-completed", "query-migrate", nil); err != nil {
		return err
	}
	if err := cp.saveEvents(src, "events/postcopy-src"); err != nil {
		return err
	}
	return cp.saveEvents(dst, "events/postcopy-dst")
}

func (cp *capturer) mirror(ctx context.Context) error {
	img := filepath.Join(cp.tmp, "disk.raw")
	buf := make([]byte, 8<<20)
	rand.Read(buf)
	if err := os.WriteFile(img, buf, 0o600); err != nil {
		return err
	}
	defer os.Remove(img)
	v, err := cp.start(ctx, "src", false, qemulab.Drive{Path: img, Node: "disk0", Device: "vda"})
	if err != nil {
		return err
	}
	defer v.kill()
	if _, err := cp.save(ctx, v, "query-block", "query-block", nil); err != nil {
		return err
	}
	if err := v.c.BlockdevAdd(ctx, map[string]any{"driver": "null-co", "node-name": "target0", "size": 8 << 20}); err != nil {
		return err
	}
	if _, err := cp.save(ctx, v, "query-named-block-nodes", "query-named-block-nodes", nil); err != nil {
		return err
	}
	if err := v.c.BlockdevMirror(ctx, qmp.BlockdevMirrorArgs{
		JobID: "mirror0", Device: "disk0", Target: "target0", Sync: "full", Speed: 512 << 10, BufSize: 1 << 20,
	}); err != nil {
		return err
	}
	time.Sleep(1500 * time.Millisecond)
	if _, err := cp.save(ctx, v, "query-block-jobs/mirror-running", "query-block-jobs", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, v, "query-jobs/mirror-running", "query-jobs", nil); err != nil {
		return err
	}
	ready := v.c.SubscribeNames("BLOCK_JOB_READY")
	defer ready.Close()
	if err := v.c.BlockJobSetSpeed(ctx, "mirror0", 0); err != nil {
		return err
	}
	select {
	case <-ready.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	if _, err := cp.save(ctx, v, "query-block-jobs/mirror-ready", "query-block-jobs", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, v, "query-jobs/mirror-ready", "query-jobs", nil); err != nil {
		return err
	}
	completed := v.c.SubscribeNames("BLOCK_JOB_COMPLETED")
	defer completed.Close()
	if err := v.c.BlockJobCancel(ctx, "mirror0", false); err != nil {
		return err
	}
	select {
	case <-completed.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	return cp.saveEvents(v, "events/mirror")
}

// setup holds the source in "setup": it migrates to a TCP listener whose
// accept queue is full, so the connect hangs in SYN retries.
func (cp *capturer) setup(ctx context.Context) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return err
	}
	if err := unix.Listen(fd, 0); err != nil {
		return err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return err
	}
	port := sa.(*unix.SockaddrInet4).Port
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	// Fill the accept queue (backlog 0 holds one connection).
	var fillers []net.Conn
	defer func() {
		for _, c := range fillers {
			c.Close()
		}
	}()
	for range 2 {
		d := net.Dialer{Timeout: 300 * time.Millisecond}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			break
		}
		fillers = append(fillers, c)
	}
	src, err := cp.start(ctx, "src", false)
	if err != nil {
		return err
	}
	defer src.kill()
	if err := src.c.Migrate(ctx, qmp.MigrateArgs{URI: "tcp:" + addr}); err != nil {
		return err
	}
	time.Sleep(300 * time.Millisecond)
	r, err := src.raw(ctx, "query-migrate", nil)
	if err != nil {
		return err
	}
	if err := cp.saveIf(r, "query-migrate/src-setup", qmp.StatusSetup); err != nil {
		return err
	}
	return src.c.MigrateCancel(ctx)
}

// dstFail makes a destination that survives its failure (exit-on-error
// false, 9.1+) fail on a stream of garbage.
func (cp *capturer) dstFail(ctx context.Context) error {
	dst, err := cp.start(ctx, "dst", true)
	if err != nil {
		return err
	}
	defer dst.kill()
	f, err := dst.c.ProbeFeatures(ctx)
	if err != nil {
		return err
	}
	if !f.IncomingExitOnError {
		log.Printf("  no exit-on-error on %s: a failing destination exits; nothing to capture", dst.c.Version())
		return nil
	}
	if err := dst.c.MigrateSetCapabilities(ctx, map[string]bool{"events": true}); err != nil {
		return err
	}
	sock := filepath.Join(cp.tmp, "mig.sock")
	if err := dst.c.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: "unix:" + sock, ExitOnError: qmp.Ptr(false)}); err != nil {
		return err
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		return err
	}
	_, _ = conn.Write([]byte("this is not a migration stream\n"))
	conn.Close()
	if _, err := dst.waitStatus(ctx, qmp.StatusFailed); err != nil {
		return err
	}
	if _, err := cp.save(ctx, dst, "query-migrate/dst-failed", "query-migrate", nil); err != nil {
		return err
	}
	if _, err := cp.save(ctx, dst, "query-status/dst-after-failure", "query-status", nil); err != nil {
		return err
	}
	return cp.saveEvents(dst, "events/dstfail-dst")
}

// argForms records how QEMU answers the argument forms it may not know:
// migrate-incoming and migrate with "channels" (8.2+) and without "uri",
// migrate-incoming with "exit-on-error" (9.1+), and an argument no QEMU
// has. A form the QEMU accepts is not an error and writes no file (the
// destination then listens: each attempt gets a fresh one). After the
// refused migrates the source must still have no migration: a refused
// command changed nothing.
func (cp *capturer) argForms(ctx context.Context) error {
	sock := filepath.Join(cp.tmp, "mig.sock")
	channels := []qmp.MigrationChannel{{ChannelType: "main",
		Addr: qmp.MigrationAddr{Transport: "socket", SocketAddress: qmp.SocketAddress{Type: "unix", Path: sock}}}}
	refused := func(v *vm, file, cmd string, args any) error {
		err := v.c.Execute(ctx, cmd, args, nil)
		if err == nil {
			log.Printf("  %s: accepted by %s", file, v.c.Version())
			return nil
		}
		var qe *qmp.Error
		if !errors.As(err, &qe) {
			return fmt.Errorf("%s: want a QMP error, got %v", cmd, err)
		}
		b, _ := json.Marshal(map[string]string{"class": qe.Class, "desc": qe.Desc})
		return cp.write(file, b)
	}
	for _, c := range []struct {
		file string
		args any
	}{
		{"errors/migrate-incoming-channels", map[string]any{"channels": channels}},
		{"errors/migrate-incoming-exit-on-error", map[string]any{"uri": "unix:" + sock, "exit-on-error": true}},
		{"errors/migrate-incoming-unexpected", map[string]any{"uri": "unix:" + sock, "no-such-argument": true}},
	} {
		dst, err := cp.start(ctx, "dst", true)
		if err != nil {
			return err
		}
		err = refused(dst, c.file, "migrate-incoming", c.args)
		dst.kill()
		os.Remove(sock)
		if err != nil {
			return err
		}
	}
	src, err := cp.start(ctx, "src", false)
	if err != nil {
		return err
	}
	defer src.kill()
	if err := refused(src, "errors/migrate-unexpected", "migrate", map[string]any{"uri": "unix:" + sock, "no-such-argument": true}); err != nil {
		return err
	}
	if err := refused(src, "errors/migrate-channels", "migrate", map[string]any{"channels": channels}); err != nil {
		return err
	}
	// A refused migrate changed nothing: the source has no migration. (On
	// 8.2+ the channels form was accepted and that migration failed at
	// once, nobody listening.)
	info, err := src.c.QueryMigrate(ctx)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(cp.out, "errors/migrate-channels.json")); err == nil && info.Status != qmp.StatusNone {
		return fmt.Errorf("after refused migrates the source reports migration status %s, want none", info.Status)
	}
	return nil
}
