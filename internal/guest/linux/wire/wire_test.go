package wire

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestArgsRoundTrip(t *testing.T) {
	for _, w := range []Workload{
		{},
		{Mode: ModeMemDirty, MemBytes: 256 << 20, RateBytes: 50 << 20},
		{Mode: ModeDiskWrite, Disk: "/dev/vdb", RateBytes: 4 << 20, LogBytes: 8 << 20, VerifyEvery: 5 * time.Second},
		{Mode: ModeDiskWrite, VerifyEvery: -1, Report: 500 * time.Millisecond},
		{Mode: ModeDiskVerify, Expect: 1234, PowerOff: true},
	} {
		var line string
		for _, a := range w.Args() {
			line += a + " "
		}
		got, err := ParseArgs("console=ttyS0 quiet " + line + "foo=bar")
		require.NoError(t, err, line)
		assert.Equal(t, w.WithDefaults(), got, line)
	}
}

func TestParseArgs(t *testing.T) {
	w, err := ParseArgs("BOOT_IMAGE=x qmigrate.mode=memdirty qmigrate.mem=256M qmigrate.rate=50M")
	require.NoError(t, err)
	assert.Equal(t, ModeMemDirty, w.Mode)
	assert.Equal(t, uint64(256<<20), w.MemBytes)
	assert.Equal(t, uint64(50<<20), w.RateBytes)

	w, err = ParseArgs("qmigrate.mode=diskwrite qmigrate.verify=0")
	require.NoError(t, err)
	assert.Equal(t, uint64(DefaultDiskRate), w.RateBytes)
	assert.Equal(t, time.Duration(-1), w.VerifyEvery, "0 disables verification")

	w, err = ParseArgs("")
	require.NoError(t, err)
	assert.Equal(t, ModeIdle, w.Mode)
	assert.Zero(t, w.RateBytes, "memdirty and idle default to unthrottled")

	for _, bad := range []string{"qmigrate.mode=dance", "qmigrate.mem=lots", "qmigrate.color=red", "qmigrate.verify=-1s", "qmigrate.mem=99999999999T"} {
		_, err := ParseArgs(bad)
		assert.Error(t, err, bad)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "512": 512, "4K": 4096, "50M": 50 << 20, "2g": 2 << 30, "1T": 1 << 40} {
		got, err := ParseSize(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	_, err := ParseSize("M")
	assert.Error(t, err)
}

func TestLines(t *testing.T) {
	s := FormatLine(KindCheck, StatusFail, "pass", "13", "page", "4711", "want", "13", "got", "12")
	assert.Equal(t, "QMIGRATE CHECK FAIL pass=13 page=4711 want=13 got=12\n", s)
	l, ok := ParseLine("[   12.3] junk " + s + "\r")
	require.True(t, ok)
	assert.Equal(t, KindCheck, l.Kind)
	assert.Equal(t, StatusFail, l.Status)
	assert.True(t, l.Failed())
	assert.False(t, l.OK())
	n, ok := l.Uint("page")
	assert.True(t, ok)
	assert.Equal(t, uint64(4711), n)
	assert.Equal(t, "QMIGRATE CHECK FAIL pass=13 page=4711 want=13 got=12", l.Raw)

	l, ok = ParseLine("QMIGRATE READY mode=memdirty uptime=7.9\r\n")
	require.True(t, ok)
	assert.Equal(t, KindReady, l.Kind)
	assert.Empty(t, l.Status)
	assert.Equal(t, map[string]string{"mode": "memdirty", "uptime": "7.9"}, l.Fields)

	l, ok = ParseLine(FormatLine(KindError, "", "msg", "open /dev/vda: no such file"))
	require.True(t, ok)
	assert.True(t, l.Failed())
	assert.Equal(t, "open_/dev/vda:_no_such_file", l.Fields["msg"])

	for _, bad := range []string{"", "hello", "QMIGRATE ", "QMIGRATE  ", "QMIGRATE a=b"} {
		_, ok := ParseLine(bad)
		assert.False(t, ok, bad)
	}
}

func TestPage(t *testing.T) {
	p := make([]byte, PageSize)
	FillPage(p, 7, 3)
	got, st := CheckPage(p, 7, 3)
	assert.Equal(t, PageOK, st)
	assert.Equal(t, uint64(3), got)

	got, st = CheckPage(p, 7, 4)
	assert.Equal(t, PageStale, st, "an older generation")
	assert.Equal(t, uint64(3), got)

	_, st = CheckPage(p, 8, 3)
	assert.Equal(t, PageCorrupt, st, "another page's content")

	old := make([]byte, PageSize)
	FillPage(old, 7, 2)
	torn := append(append([]byte{}, p[:PageSize/2]...), old[PageSize/2:]...)
	_, st = CheckPage(torn, 7, 3)
	assert.Equal(t, PageCorrupt, st, "new header, old trailer")

	_, st = CheckPage(make([]byte, PageSize), 0, 1)
	assert.Equal(t, PageCorrupt, st, "a zero page")
}

// logFile writes a log of n records (slots slots) into a temporary file and returns it open.
func logFile(t *testing.T, slots, n uint64) (*os.File, Super) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.raw"))
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	require.NoError(t, f.Truncate(int64(slots+1)*BlockSize))
	s := Super{Run: 0xfeedface, Slots: slots}
	b := make([]byte, BlockSize)
	EncodeSuper(b, s)
	_, err = f.WriteAt(b, 0)
	require.NoError(t, err)
	for seq := uint64(1); seq <= n; seq++ {
		writeRecord(t, f, s, seq)
	}
	return f, s
}

func writeRecord(t *testing.T, f *os.File, s Super, seq uint64) {
	t.Helper()
	b := make([]byte, BlockSize)
	EncodeRecord(b, s, seq)
	_, err := f.WriteAt(b, s.Offset(s.SlotOf(seq)))
	require.NoError(t, err)
}

func TestVerifyGood(t *testing.T) {
	for _, n := range []uint64{0, 1, 10, 16, 17, 100} {
		f, s := logFile(t, 16, n)
		res, err := Verify(f, n)
		require.NoError(t, err, n)
		assert.Equal(t, s, res.Super)
		assert.Equal(t, n, res.Last)
		assert.Equal(t, min(n, 16), res.Records)
	}
}

func TestVerifyDetects(t *testing.T) {
	verr := func(t *testing.T, f *os.File, expect uint64) *VerifyError {
		t.Helper()
		_, err := Verify(f, expect)
		var ve *VerifyError
		require.ErrorAs(t, err, &ve)
		return ve
	}
	t.Run("torn", func(t *testing.T) {
		f, s := logFile(t, 16, 34)
		// Half of record 35 written over record 19 (same slot).
		b := make([]byte, BlockSize)
		EncodeRecord(b, s, 35)
		_, err := f.WriteAt(b[:BlockSize/2], s.Offset(s.SlotOf(35)))
		require.NoError(t, err)
		ve := verr(t, f, 35)
		assert.Equal(t, &VerifyError{Seq: 35, Slot: s.SlotOf(35), Reason: "torn"}, ve)
		ve = verr(t, f, 0)
		assert.Equal(t, &VerifyError{Seq: 19, Slot: s.SlotOf(35), Reason: "torn"}, ve, "without expect the torn slot is in the last lap")
	})
	t.Run("stale", func(t *testing.T) {
		f, s := logFile(t, 16, 40)
		// Slot of record 30 still holds record 14: the write of 30 was lost.
		writeRecord(t, f, s, 14)
		ve := verr(t, f, 40)
		assert.Equal(t, &VerifyError{Seq: 30, Slot: s.SlotOf(30), Reason: "stale", Got: 14}, ve)
		assert.Contains(t, ve.Error(), "stale")
	})
	t.Run("missing in the middle", func(t *testing.T) {
		f, s := logFile(t, 16, 10)
		_, err := f.WriteAt(make([]byte, BlockSize), s.Offset(s.SlotOf(4)))
		require.NoError(t, err)
		ve := verr(t, f, 0)
		assert.Equal(t, &VerifyError{Seq: 4, Slot: 3, Reason: "missing"}, ve)
	})
	t.Run("missing tail", func(t *testing.T) {
		f, _ := logFile(t, 16, 10)
		ve := verr(t, f, 12)
		assert.Equal(t, &VerifyError{Seq: 11, Slot: 10, Reason: "missing"}, ve)
	})
	t.Run("lost tail after wrap shows as stale", func(t *testing.T) {
		f, _ := logFile(t, 16, 20)
		ve := verr(t, f, 21)
		assert.Equal(t, &VerifyError{Seq: 21, Slot: 4, Reason: "stale", Got: 5}, ve)
	})
	t.Run("foreign run", func(t *testing.T) {
		f, s := logFile(t, 16, 10)
		b := make([]byte, BlockSize)
		EncodeRecord(b, Super{Run: 1, Slots: s.Slots}, 5)
		_, err := f.WriteAt(b, s.Offset(4))
		require.NoError(t, err)
		ve := verr(t, f, 0)
		assert.Equal(t, &VerifyError{Seq: 5, Slot: 4, Reason: "foreign"}, ve)
	})
	t.Run("misplaced", func(t *testing.T) {
		f, s := logFile(t, 16, 10)
		b := make([]byte, BlockSize)
		EncodeRecord(b, s, 3)
		_, err := f.WriteAt(b, s.Offset(5)) // record 3's block in record 6's slot
		require.NoError(t, err)
		ve := verr(t, f, 0)
		assert.Equal(t, &VerifyError{Seq: 6, Slot: 5, Reason: "misplaced"}, ve)
	})
	t.Run("flipped payload bit", func(t *testing.T) {
		f, s := logFile(t, 16, 10)
		_, err := f.WriteAt([]byte{0xff}, s.Offset(2)+1000)
		require.NoError(t, err)
		ve := verr(t, f, 0)
		assert.Equal(t, &VerifyError{Seq: 3, Slot: 2, Reason: "torn"}, ve)
	})
}

func TestVerifySuperErrors(t *testing.T) {
	f, s := logFile(t, 4, 2)
	_, err := f.WriteAt([]byte("X"), 0)
	require.NoError(t, err)
	_, err = Verify(f, 0)
	assert.ErrorContains(t, err, "bad magic")

	b := make([]byte, BlockSize)
	EncodeSuper(b, s)
	b[100] ^= 1
	_, err = f.WriteAt(b, 0)
	require.NoError(t, err)
	_, err = Verify(f, 0)
	assert.ErrorContains(t, err, "checksum")

	require.NoError(t, f.Truncate(2*BlockSize))
	EncodeSuper(b, s)
	_, err = f.WriteAt(b, 0)
	require.NoError(t, err)
	_, err = Verify(f, 0)
	assert.ErrorContains(t, err, "read slots", "log larger than the device")

	assert.Equal(t, uint64(0), SlotsFor(BlockSize))
	assert.Equal(t, uint64(4095), SlotsFor(16<<20))
}
