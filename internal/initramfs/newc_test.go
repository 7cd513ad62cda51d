package initramfs

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	require.NoError(t, w.Dir("dev", 0o755))
	require.NoError(t, w.CharDev("/dev/console", 0o600, 5, 1))
	require.NoError(t, w.File("init", 0o755, []byte("#!/bin/sh\n")))
	require.NoError(t, w.File("empty", 0o644, nil))
	require.NoError(t, w.File("odd", 0o644, []byte("abcde")))
	require.NoError(t, w.Symlink("sbin", "bin"))
	require.NoError(t, w.Close())
	require.Zero(t, buf.Len()%4, "archive length is 4-byte aligned")

	got, err := ReadAll(bytes.NewReader(buf.Bytes()))
	require.NoError(t, err)
	assert.Equal(t, []Entry{
		{Name: "dev", Type: TypeDir, Perm: 0o755},
		{Name: "dev/console", Type: TypeCharDev, Perm: 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "init", Type: TypeFile, Perm: 0o755, Data: []byte("#!/bin/sh\n")},
		{Name: "empty", Type: TypeFile, Perm: 0o644},
		{Name: "odd", Type: TypeFile, Perm: 0o644, Data: []byte("abcde")},
		{Name: "sbin", Type: TypeSymlink, Perm: 0o777, Data: []byte("bin")},
	}, got)
}

// TestGoldenBytes pins the exact header layout of the newc format (as the kernel's
// init/initramfs.c parses it): 6-byte magic, 13 eight-digit hex fields, the NUL-terminated
// name padded so the data starts at a multiple of 4, the data padded to a multiple of 4.
func TestGoldenBytes(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	require.NoError(t, w.File("ab", 0o644, []byte("xyz")))
	require.NoError(t, w.Close())
	want := "070701" +
		"00000002" + "000081a4" + "00000000" + "00000000" + "00000001" + "00000000" +
		"00000003" + "00000000" + "00000000" + "00000000" + "00000000" + "00000003" + "00000000" +
		"ab\x00" + "\x00\x00\x00" + // 110 + 3 = 113 -> pad to 116
		"xyz\x00" +
		"070701" +
		"00000000" + "00000000" + "00000000" + "00000000" + "00000001" + "00000000" +
		"00000000" + "00000000" + "00000000" + "00000000" + "00000000" + "0000000b" + "00000000" +
		"TRAILER!!!\x00" + "\x00\x00\x00" // 110 + 11 = 121 -> pad to 124
	assert.Equal(t, want, buf.String())
}

func TestDeterministic(t *testing.T) {
	build := func() []byte {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		require.NoError(t, w.Dir("a", 0o755))
		require.NoError(t, w.File("a/b", 0o644, []byte("1234")))
		require.NoError(t, w.Close())
		return buf.Bytes()
	}
	assert.Equal(t, build(), build())
}

func TestWriterErrors(t *testing.T) {
	w := NewWriter(io.Discard)
	assert.Error(t, w.File("", 0o644, nil))
	assert.Error(t, w.File("TRAILER!!!", 0o644, nil))
	assert.Error(t, w.File("a\x00b", 0o644, nil))
	require.NoError(t, w.Close())
	assert.Error(t, w.File("late", 0o644, nil))

	failing := NewWriter(failWriter{})
	err := failing.File("x", 0o644, []byte("data"))
	require.Error(t, err)
	assert.ErrorIs(t, failing.Dir("y", 0o755), errBoom, "the first error sticks")
}

func TestReaderErrors(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	require.NoError(t, w.File("f", 0o644, []byte("hello world")))
	require.NoError(t, w.Close())
	full := buf.Bytes()

	_, err := ReadAll(bytes.NewReader(full[:len(full)-20]))
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "truncated archive")

	_, err = ReadAll(bytes.NewReader(full[:130]))
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "truncated data")

	bad := bytes.Clone(full)
	copy(bad, "070707")
	_, err = ReadAll(bytes.NewReader(bad))
	assert.ErrorContains(t, err, "bad magic")
}

var errBoom = errors.New("boom")

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errBoom }

func ExampleWriter() {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	_ = w.Dir("dev", 0o755)
	_ = w.CharDev("dev/console", 0o600, 5, 1)
	_ = w.File("init", 0o755, []byte("\x7fELF..."))
	_ = w.Close()
	// buf now holds an uncompressed initramfs for the kernel's -initrd.
}
