package linux

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/initramfs"
)

func TestAssets(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	kernel, initrd, err := Assets(ctx)
	if err != nil && os.Getenv("CI") == "" {
		t.Skipf("guest kernel not set up: %v", err)
	}
	require.NoError(t, err)
	assert.FileExists(t, kernel)
	data, err := os.ReadFile(initrd)
	require.NoError(t, err)
	entries, err := initramfs.ReadAll(bytes.NewReader(data))
	require.NoError(t, err)
	names := map[string]initramfs.Entry{}
	for _, e := range entries {
		names[e.Name] = e
	}
	require.Contains(t, names, "init")
	assert.Equal(t, []byte("\x7fELF"), names["init"].Data[:4])
	assert.Equal(t, initramfs.TypeCharDev, names["dev/console"].Type)
	order := string(names["modules/order"].Data)
	assert.Regexp(t, `(?s)virtio_ring.*virtio\n.*virtio_pci\n.*virtio_blk\n$`, order, "dependencies first")

	// The second call reuses the cached archive.
	_, initrd2, err := Assets(ctx)
	require.NoError(t, err)
	assert.Equal(t, initrd, initrd2)
}

func TestAssetsNotSetUp(t *testing.T) {
	t.Setenv("QMIGRATE_CACHE", t.TempDir())
	t.Setenv("QMIGRATE_KERNEL", "")
	t.Setenv("QMIGRATE_KMOD_DIR", "")
	_, _, err := Assets(context.Background())
	require.ErrorIs(t, err, ErrNotSetUp)
	assert.ErrorContains(t, err, "scripts/setup.sh")
}

func TestCmdline(t *testing.T) {
	w := Workload{Mode: ModeMemDirty, MemBytes: 256 << 20, RateBytes: 50 << 20}
	assert.Equal(t, "console=ttyS0 quiet loglevel=1 panic=0 no_timer_check mitigations=off qmigrate.mode=memdirty qmigrate.mem=268435456 qmigrate.rate=52428800", w.Cmdline())
	args := BootArgs("/k", "/i", w)
	assert.Equal(t, []string{"-kernel", "/k", "-initrd", "/i", "-append", w.Cmdline()}, args)
}

func TestSerial(t *testing.T) {
	path := t.TempDir() + "/serial.log"
	s := NewSerial(path)
	s.Poll = time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		f, err := os.Create(path)
		if err != nil {
			return
		}
		defer f.Close()
		for _, chunk := range []string{"[    0.1] Linux booting\r\n", "QMIGRATE READY mode=mem", "dirty uptime=7.9\r\n",
			"QMIGRATE CHECK OK pass=1 failed_passes=0\r\n", "QMIGRATE CHECK OK pass=2 failed_passes=0\r\n",
			"QMIGRATE CHECK FAIL pass=3 bad=1 failed_passes=1\r\n"} {
			_, _ = f.WriteString(chunk)
			time.Sleep(2 * time.Millisecond)
		}
	}()
	l, err := s.WaitFor(ctx, Kind(KindReady))
	require.NoError(t, err)
	assert.Equal(t, "memdirty", l.Fields["mode"])
	l, err = s.WaitFor(ctx, Verdict(KindCheck, "pass", 2))
	require.NoError(t, err)
	assert.Equal(t, "2", l.Fields["pass"])
	_, err = s.WaitFor(ctx, Verdict(KindCheck, "pass", 9))
	assert.ErrorContains(t, err, "CHECK FAIL pass=3")

	short, cancel2 := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel2()
	_, err = s.Next(short)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestSerialLatest(t *testing.T) {
	path := t.TempDir() + "/serial.log"
	require.NoError(t, os.WriteFile(path, []byte("QMIGRATE DISK seq=3\r\nQMIGRATE PROGRESS pass=1\r\n"+
		"QMIGRATE DISK seq=7\r\nQMIGRATE CHECK OK pass=2 failed_passes=0\r\n"), 0o644))
	s := NewSerial(path)
	s.Poll = time.Millisecond
	ctx := context.Background()
	seq, err := s.Latest(ctx, KindDisk, "seq", 1, 20*time.Millisecond)
	require.NoError(t, err)
	assert.Equal(t, uint64(7), seq)
	// Nothing new: the value passed in comes back.
	seq, err = s.Latest(ctx, KindDisk, "seq", seq, 20*time.Millisecond)
	require.NoError(t, err)
	assert.Equal(t, uint64(7), seq)

	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("QMIGRATE DISK seq=9\r\nQMIGRATE CHECK FAIL pass=3 bad=1\r\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	seq, err = s.Latest(ctx, KindDisk, "seq", seq, 20*time.Millisecond)
	assert.ErrorContains(t, err, "CHECK FAIL pass=3")
	assert.Equal(t, uint64(9), seq)
}

func TestResolveModulesErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := resolveModules(dir, []string{"virtio_blk"})
	assert.ErrorIs(t, err, ErrNotSetUp)
	require.NoError(t, os.WriteFile(dir+"/bad.ko", []byte("not elf"), 0o644))
	_, err = resolveModules(dir, []string{"bad"})
	assert.ErrorContains(t, err, "not an uncompressed kernel module")
}

func TestSerialReportsKernelCrash(t *testing.T) {
	path := t.TempDir() + "/serial.log"
	require.NoError(t, os.WriteFile(path, []byte("QMIGRATE READY mode=idle\r\n[    7.85] Kernel panic - not syncing: Fatal exception in interrupt\r\n"), 0o644))
	s := NewSerial(path)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := s.WaitFor(ctx, Kind(KindTick))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "Kernel panic - not syncing: Fatal exception in interrupt")
}

func TestParseConsoleLine(t *testing.T) {
	l, ok := ParseConsoleLine("[   10.72] BUG: kernel NULL pointer dereference, address: 0000000000000000\r")
	require.True(t, ok)
	assert.Equal(t, KindKernel, l.Kind)
	assert.True(t, l.Failed())
	assert.Equal(t, "BUG: kernel NULL pointer dereference, address: 0000000000000000", l.Raw)
	l, ok = ParseConsoleLine("QMIGRATE TICK n=1")
	require.True(t, ok)
	assert.Equal(t, KindTick, l.Kind)
	_, ok = ParseConsoleLine("[    0.00] Linux version 6.1.0")
	assert.False(t, ok)
}
