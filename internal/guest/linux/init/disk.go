package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qmigrate/qmigrate/internal/guest/linux/wire"
)

// device is the block device of the disk workloads (a *blockDev in the guest, a file in tests).
type device interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Size() uint64
}

// blockDev is a block device opened with O_DIRECT; it bounces I/O through a page-aligned buffer.
type blockDev struct {
	fd     int
	size   uint64
	bounce []byte
}

const bounceSize = 256 << 10

func (b *blockDev) buf() []byte {
	if b.bounce == nil {
		m, err := unix.Mmap(-1, 0, bounceSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			panic(err)
		}
		b.bounce = m
	}
	return b.bounce
}

func (b *blockDev) Size() uint64 { return b.size }

func (b *blockDev) Sync() error { return unix.Fdatasync(b.fd) }

func (b *blockDev) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, bounceSize)
		got, err := unix.Pread(b.fd, b.buf()[:n], off+int64(done))
		if err != nil {
			return done, err
		}
		if got == 0 {
			return done, io.ErrUnexpectedEOF
		}
		copy(p[done:], b.bounce[:got])
		done += got
	}
	return done, nil
}

func (b *blockDev) WriteAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n := copy(b.buf(), p[done:])
		wrote, err := unix.Pwrite(b.fd, b.bounce[:n], off+int64(done))
		if err != nil {
			return done, err
		}
		if wrote == 0 {
			return done, io.ErrShortWrite
		}
		done += wrote
	}
	return done, nil
}

// diskWriter appends records to the log at a set rate and verifies them on request.
type diskWriter struct {
	dev   device
	super wire.Super
	out   *printer
	clk   clock

	perRecord   time.Duration
	report      time.Duration
	verifyEvery time.Duration // <= 0: only on request

	buf         []byte
	seq, synced uint64
	next        time.Time
	lastReport  time.Time
	reportSeq   uint64
	lastVerify  time.Time
}

func newDiskWriter(dev device, w wire.Workload, out *printer, clk clock, run uint64) (*diskWriter, error) {
	slots := wire.SlotsFor(min(w.LogBytes, dev.Size()))
	if slots == 0 {
		return nil, fmt.Errorf("disk of %d bytes is too small for a log", dev.Size())
	}
	d := &diskWriter{
		dev:         dev,
		super:       wire.Super{Run: run, Slots: slots},
		out:         out,
		clk:         clk,
		report:      w.Report,
		verifyEvery: w.VerifyEvery,
		buf:         make([]byte, wire.BlockSize),
	}
	if w.RateBytes > 0 {
		d.perRecord = max(time.Duration(float64(wire.BlockSize)*1e9/float64(w.RateBytes)), 1)
	}
	wire.EncodeSuper(d.buf, d.super)
	if _, err := dev.WriteAt(d.buf, 0); err != nil {
		return nil, fmt.Errorf("write superblock: %w", err)
	}
	if err := dev.Sync(); err != nil {
		return nil, fmt.Errorf("sync: %w", err)
	}
	d.lastReport = clk.Now()
	d.lastVerify = d.lastReport
	return d, nil
}

// step writes the next record.
func (d *diskWriter) step() error {
	seq := d.seq + 1
	wire.EncodeRecord(d.buf, d.super, seq)
	if _, err := d.dev.WriteAt(d.buf, d.super.Offset(d.super.SlotOf(seq))); err != nil {
		return fmt.Errorf("write record %d: %w", seq, err)
	}
	d.seq = seq
	return nil
}

// run writes records forever; it returns only on an I/O error.
func (d *diskWriter) run(verifyReq <-chan struct{}) error {
	for {
		if err := d.step(); err != nil {
			return err
		}
		if err := d.tick(verifyReq); err != nil {
			return err
		}
	}
}

func (d *diskWriter) tick(verifyReq <-chan struct{}) error {
	now := d.clk.Now()
	if now.Sub(d.lastReport) >= d.report {
		if err := d.dev.Sync(); err != nil {
			return fmt.Errorf("sync: %w", err)
		}
		d.synced = d.seq
		el := now.Sub(d.lastReport).Seconds()
		d.out.line(wire.KindDisk, "", "seq", u(d.seq), "synced", u(d.synced),
			"rate", u(uint64(float64((d.seq-d.reportSeq)*wire.BlockSize)/el)), "uptime", uptime())
		d.lastReport, d.reportSeq = now, d.seq
	}
	verify := false
	select {
	case <-verifyReq:
		verify = true
	default:
		verify = d.verifyEvery > 0 && now.Sub(d.lastVerify) >= d.verifyEvery
	}
	if verify {
		if err := d.dev.Sync(); err != nil {
			return fmt.Errorf("sync: %w", err)
		}
		verifyOnce(d.dev, d.seq, d.out)
		now = d.clk.Now()
		d.lastVerify = now
		d.next = time.Time{} // no burst to make up for the time the verification took
	}
	if d.perRecord == 0 {
		return nil
	}
	if d.next.IsZero() || now.Sub(d.next) > 100*time.Millisecond {
		d.next = now
	}
	if ahead := d.next.Sub(now); ahead > 2*time.Millisecond {
		d.clk.Sleep(ahead)
	}
	d.next = d.next.Add(d.perRecord)
	return nil
}

// verifyOnce verifies the log on dev and prints the verdict.
func verifyOnce(dev io.ReaderAt, expect uint64, out *printer) {
	res, err := wire.Verify(dev, expect)
	var ve *wire.VerifyError
	switch {
	case err == nil:
		out.line(wire.KindDiskVerify, wire.StatusOK, "records", u(res.Records), "last", u(res.Last), "uptime", uptime())
	case errors.As(err, &ve):
		out.line(wire.KindDiskVerify, wire.StatusFail, "seq", u(ve.Seq), "slot", u(ve.Slot),
			"reason", ve.Reason, "got", u(ve.Got), "last", u(res.Last))
	default:
		out.line(wire.KindDiskVerify, wire.StatusFail, "reason", "error", "msg", err.Error())
	}
}
