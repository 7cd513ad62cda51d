package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/guest/linux/wire"
)

// fakeClock advances only when slept on, plus a fixed step per reading.
type fakeClock struct {
	t     time.Time
	step  time.Duration
	slept time.Duration
}

func (c *fakeClock) Now() time.Time {
	c.t = c.t.Add(c.step)
	return c.t
}

func (c *fakeClock) Sleep(d time.Duration) {
	c.slept += d
	c.t = c.t.Add(d)
}

func lines(t *testing.T, buf *bytes.Buffer) []wire.Line {
	t.Helper()
	var out []wire.Line
	for _, s := range strings.Split(buf.String(), "\n") {
		if s == "" {
			continue
		}
		l, ok := wire.ParseLine(s)
		require.True(t, ok, s)
		out = append(out, l)
	}
	buf.Reset()
	return out
}

func kinds(ls []wire.Line) []string {
	var out []string
	for _, l := range ls {
		out = append(out, l.Kind+" "+l.Status)
	}
	return out
}

func TestDirtierDetectsStalePage(t *testing.T) {
	var buf bytes.Buffer
	clk := &fakeClock{t: time.Unix(0, 0), step: time.Microsecond}
	mem := make([]byte, 64*wire.PageSize)
	d := newDirtier(mem, 0, time.Hour, &printer{w: &buf}, clk)
	d.fill()

	d.pass()
	clk.t = clk.t.Add(time.Second)
	d.pass()
	ls := lines(t, &buf)
	require.Len(t, ls, 1, "the first pass is within minCheckGap of READY: only pass 2 prints OK")
	assert.Equal(t, "QMIGRATE CHECK OK pass=2 failed_passes=0", ls[0].Raw)

	// A migration that loses the last write to page 5 (it still holds pass 1's content) and
	// corrupts page 9.
	stale := make([]byte, wire.PageSize)
	wire.FillPage(stale, 5, 2)
	copy(d.page(5), stale)
	d.page(9)[100] ^= 0xff // not covered by the stamp: not detected (pages are stamped, not hashed)
	copy(d.page(9)[:8], []byte{1, 2, 3})
	d.pass()
	ls = lines(t, &buf)
	require.Len(t, ls, 3)
	assert.Equal(t, "QMIGRATE CHECK FAIL pass=3 page=5 want=3 got=2 state=stale", ls[0].Raw)
	assert.Equal(t, "QMIGRATE CHECK FAIL pass=3 page=9 want=3 got=0 state=corrupt", ls[1].Raw)
	assert.Equal(t, "QMIGRATE CHECK FAIL pass=3 bad=2 failed_passes=1", ls[2].Raw)

	// The pages were rewritten: the next pass is clean again, but remembers the failure.
	clk.t = clk.t.Add(time.Second)
	d.pass()
	ls = lines(t, &buf)
	require.Len(t, ls, 1)
	assert.Equal(t, "QMIGRATE CHECK OK pass=4 failed_passes=1", ls[0].Raw)
}

func TestDirtierFailLinesAreBounded(t *testing.T) {
	var buf bytes.Buffer
	clk := &fakeClock{t: time.Unix(0, 0)}
	d := newDirtier(make([]byte, 32*wire.PageSize), 0, time.Hour, &printer{w: &buf}, clk)
	d.fill()
	clear(d.mem) // every page lost
	d.pass()
	ls := lines(t, &buf)
	require.Len(t, ls, maxFailLines+1)
	assert.Equal(t, "32", ls[maxFailLines].Fields["bad"])
}

func TestDirtierRateAndProgress(t *testing.T) {
	var buf bytes.Buffer
	clk := &fakeClock{t: time.Unix(0, 0)}
	const rate = 4 << 20 // 1024 pages/s
	d := newDirtier(make([]byte, 1024*wire.PageSize), rate, time.Second, &printer{w: &buf}, clk)
	d.fill()
	for range 3 {
		d.pass()
	}
	assert.InDelta(t, 3*time.Second, clk.slept, float64(50*time.Millisecond), "3 passes of 4 MiB at 4 MiB/s")
	ls := lines(t, &buf)
	var progress []wire.Line
	for _, l := range ls {
		if l.Kind == wire.KindProgress {
			progress = append(progress, l)
		}
	}
	require.NotEmpty(t, progress)
	r, ok := progress[len(progress)-1].Uint("rate")
	require.True(t, ok)
	assert.InEpsilon(t, rate, r, 0.05)

	// A long pause (the VM was stopped) does not make the dirtier burst afterwards.
	clk.t = clk.t.Add(time.Minute)
	before := clk.slept
	d.pass()
	assert.InDelta(t, time.Second, clk.slept-before, float64(50*time.Millisecond))
}

type fileDev struct{ *os.File }

func (f fileDev) Size() uint64 {
	st, err := f.Stat()
	if err != nil {
		panic(err)
	}
	return uint64(st.Size())
}

func newFileDev(t *testing.T, size int64) fileDev {
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.raw"))
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	require.NoError(t, f.Truncate(size))
	return fileDev{f}
}

func TestDiskWriterWritesAndVerifies(t *testing.T) {
	var buf bytes.Buffer
	clk := &fakeClock{t: time.Unix(0, 0)}
	dev := newFileDev(t, 1<<20)
	w := wire.Workload{Mode: wire.ModeDiskWrite, RateBytes: 256 << 10, LogBytes: 64 << 20, VerifyEvery: -1}.WithDefaults()
	d, err := newDiskWriter(dev, w, &printer{w: &buf}, clk, 42)
	require.NoError(t, err)
	assert.Equal(t, uint64(255), d.super.Slots, "the log is capped at the device size")

	req := make(chan struct{}, 1)
	for range 300 { // wraps around
		require.NoError(t, d.step())
		require.NoError(t, d.tick(req))
	}
	assert.InDelta(t, 300.0/64, clk.slept.Seconds(), 0.1, "64 records/s")
	ls := lines(t, &buf)
	require.NotEmpty(t, ls)
	assert.Equal(t, wire.KindDisk, ls[0].Kind)

	req <- struct{}{}
	require.NoError(t, d.tick(req))
	ls = lines(t, &buf)
	require.Len(t, ls, 1)
	assert.Equal(t, "QMIGRATE DISKVERIFY OK records=255 last=300", ls[0].Raw[:len("QMIGRATE DISKVERIFY OK records=255 last=300")])

	// The destination's disk lost record 290's write: the slot still has record 35.
	old := make([]byte, wire.BlockSize)
	wire.EncodeRecord(old, d.super, 35)
	_, err = dev.WriteAt(old, d.super.Offset(d.super.SlotOf(290)))
	require.NoError(t, err)
	verifyOnce(dev, d.seq, &printer{w: &buf})
	ls = lines(t, &buf)
	require.Len(t, ls, 1)
	assert.Equal(t, "QMIGRATE DISKVERIFY FAIL seq=290 slot=34 reason=stale got=35 last=300", ls[0].Raw)

	// A lost tail: the writer knows it wrote 301.
	require.NoError(t, d.step())
	_, err = dev.WriteAt(make([]byte, wire.BlockSize), d.super.Offset(d.super.SlotOf(301)))
	require.NoError(t, err)
	_, err = dev.WriteAt(old, d.super.Offset(d.super.SlotOf(290))) // undo the other damage
	require.NoError(t, err)
	rec := make([]byte, wire.BlockSize)
	wire.EncodeRecord(rec, d.super, 290)
	_, err = dev.WriteAt(rec, d.super.Offset(d.super.SlotOf(290)))
	require.NoError(t, err)
	verifyOnce(dev, d.seq, &printer{w: &buf})
	ls = lines(t, &buf)
	require.Len(t, ls, 1)
	assert.Equal(t, "missing", ls[0].Fields["reason"])
	assert.Equal(t, "301", ls[0].Fields["seq"])
}

func TestDiskWriterPeriodicVerify(t *testing.T) {
	var buf bytes.Buffer
	clk := &fakeClock{t: time.Unix(0, 0), step: 10 * time.Millisecond}
	dev := newFileDev(t, 1<<20)
	w := wire.Workload{Mode: wire.ModeDiskWrite, RateBytes: 1 << 30, VerifyEvery: time.Second, Report: time.Hour}.WithDefaults()
	d, err := newDiskWriter(dev, w, &printer{w: &buf}, clk, 7)
	require.NoError(t, err)
	for range 250 {
		require.NoError(t, d.step())
		require.NoError(t, d.tick(nil))
	}
	ls := lines(t, &buf)
	assert.Len(t, ls, 2, "a verification every 100 records (1 s at 10 ms a record)")
	for _, l := range ls {
		assert.True(t, l.OK(), l.Raw)
	}
}

func TestDiskTooSmall(t *testing.T) {
	_, err := newDiskWriter(newFileDev(t, 4096), wire.Workload{}.WithDefaults(), &printer{w: &bytes.Buffer{}}, &fakeClock{}, 1)
	assert.ErrorContains(t, err, "too small")
}

func TestVerifyOnceReportsIOErrors(t *testing.T) {
	var buf bytes.Buffer
	verifyOnce(newFileDev(t, 0), 0, &printer{w: &buf})
	ls := lines(t, &buf)
	require.Len(t, ls, 1)
	assert.True(t, ls[0].Failed())
	assert.Equal(t, "error", ls[0].Fields["reason"])
}

func TestReadCommands(t *testing.T) {
	req := make(chan struct{}, 1)
	readCommands(strings.NewReader("hello\n verify \nverify\n"), req)
	assert.Len(t, req, 1)
}

func TestLoadModulesWithoutOrder(t *testing.T) {
	assert.NoError(t, loadModules(t.TempDir()))
}
