package testbed

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/guest/linux"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/qmp"
)

func TestParseVersion(t *testing.T) {
	for in, want := range map[string]qmp.Version{
		"QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright": {Major: 7, Minor: 2, Micro: 22},
		"QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)":       {Major: 10, Minor: 0, Micro: 2},
		"QEMU emulator version 9.1\n":                                               {Major: 9, Minor: 1},
	} {
		got, ok := parseVersion(in)
		require.True(t, ok, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "no version here", "version x.y"} {
		_, ok := parseVersion(in)
		assert.False(t, ok, in)
	}
}

// fakeQEMU writes an executable shell script standing in for QEMU.
func fakeQEMU(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu-system-x86_64")
	require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755))
	return p
}

func TestFindQEMU(t *testing.T) {
	bin := fakeQEMU(t, "echo 'QEMU emulator version 8.2.1'")
	fw := t.TempDir()
	t.Setenv(EnvQEMU, bin)
	t.Setenv(EnvQEMUFirmware, fw)
	t.Setenv(EnvQEMUImg, "/nonexistent/qemu-img")
	q, err := FindQEMU()
	require.NoError(t, err)
	assert.Equal(t, bin, q.Binary)
	assert.Empty(t, q.Img)
	assert.Equal(t, []string{"-L", fw, "-L", SeaBIOSDir}, q.FirmwareArgs())
	v, err := q.Version(context.Background())
	require.NoError(t, err)
	assert.Equal(t, qmp.Version{Major: 8, Minor: 2, Micro: 1}, v)

	t.Setenv(EnvQEMUFirmware, filepath.Join(fw, "missing"))
	_, err = FindQEMU()
	require.ErrorIs(t, err, ErrQEMUNotFound)

	t.Setenv(EnvQEMUFirmware, "")
	t.Setenv(EnvQEMU, "/nonexistent/qemu-system-x86_64")
	_, err = FindQEMU()
	require.ErrorIs(t, err, ErrQEMUNotFound)

	assert.Nil(t, (&QEMU{Binary: bin}).FirmwareArgs())
}

func TestArgs(t *testing.T) {
	dir := t.TempDir()
	q := &QEMU{Binary: "qemu-system-x86_64"}
	args, err := q.Args(dir, Config{Name: "dst", Guest: SweepGuest{Spin: 7}, Incoming: true, UUID: "1111", Args: []string{"-S"}})
	require.NoError(t, err)
	line := strings.Join(args, " ")
	for _, want := range []string{
		"-accel tcg", "-M q35", "-cpu max", "-m 153608K", "-nographic -nodefaults",
		"-serial file:" + filepath.Join(dir, "serial.log"),
		"-qmp unix:" + filepath.Join(dir, "qmp.sock") + ",server=on,wait=off",
		"-uuid 1111", "-incoming defer", "virtio-blk-pci,drive=sweep0",
	} {
		assert.Contains(t, line, want)
	}
	assert.Equal(t, "-S", args[len(args)-1], "extra args come last (150 MiB + 8 KiB under TCG: unalignedRAM)")
	disk, err := os.ReadFile(filepath.Join(dir, "sweep.img"))
	require.NoError(t, err)
	assert.Equal(t, sweep.Image(7), disk[:sweep.ImageSize])

	args, err = q.Args(dir, Config{Accel: "kvm", CPU: "host", Machine: "pc", MemMiB: 512})
	require.NoError(t, err)
	line = strings.Join(args, " ")
	assert.Contains(t, line, "-accel kvm -M pc -cpu host -m 524288K")
	assert.NotContains(t, line, "-incoming")
}

func TestStartQEMUExits(t *testing.T) {
	q := &QEMU{Binary: fakeQEMU(t, "echo 'qemu: bad option' >&2; exit 1")}
	_, err := q.Start(context.Background(), Config{Name: "bad"})
	var ee *ExitError
	require.ErrorAs(t, err, &ee)
	assert.Contains(t, ee.Log, "bad option")
}

func TestStartNoQMPTimesOutAndCleansUp(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "pid")
	q := &QEMU{Binary: fakeQEMU(t, "echo $$ > "+marker+"; exec sleep 60")}
	start := time.Now()
	_, err := q.Start(context.Background(), Config{Name: "slow", ConnectTimeout: 300 * time.Millisecond})
	require.Error(t, err)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(start), 10*time.Second, "the sleeping process was killed and reaped")
	matches, _ := filepath.Glob(filepath.Join(os.TempDir(), "qm-slow-*"))
	assert.Empty(t, matches, "the private folder is removed")
}

func TestStartKilledWithContext(t *testing.T) {
	q := &QEMU{Binary: fakeQEMU(t, "exec sleep 60")}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := q.Start(ctx, Config{Name: "cancel", ConnectTimeout: time.Minute})
		errc <- err
	}()
	time.Sleep(100 * time.Millisecond)
	cancel()
	select {
	case err := <-errc:
		require.Error(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Start did not return after its context ended")
	}
}

// fakeInstance is an Instance with a serial file and no process.
func fakeInstance(t *testing.T) *Instance {
	t.Helper()
	return &Instance{Name: "fake", dir: t.TempDir(), done: make(chan struct{})}
}

func appendSerial(t *testing.T, i *Instance, s string) {
	t.Helper()
	f, err := os.OpenFile(i.SerialPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	require.NoError(t, err)
	_, err = f.WriteString(s)
	require.NoError(t, err)
	require.NoError(t, f.Close())
}

func TestWaitSerial(t *testing.T) {
	i := fakeInstance(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		time.Sleep(50 * time.Millisecond)
		appendSerial(t, i, "SeaBIOS banner\r\nBooting from Hard Disk..A")
		time.Sleep(50 * time.Millisecond)
		appendSerial(t, i, "BB")
		time.Sleep(50 * time.Millisecond)
		appendSerial(t, i, "B")
	}()
	n, err := i.CountSerial(ctx, sweep.StartChar, sweep.PassChar, 3)
	require.NoError(t, err)
	assert.Equal(t, 3, n, "the B in SeaBIOS is not counted")

	short, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	_, err = i.CountSerial(short, sweep.StartChar, sweep.PassChar, 10)
	require.ErrorIs(t, err, ErrSerialTimeout)
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestWaitSerialProcessExit(t *testing.T) {
	i := fakeInstance(t)
	close(i.done)
	_, err := i.WaitSerial(context.Background(), func([]byte) (bool, error) { return false, nil })
	var ee *ExitError
	require.ErrorAs(t, err, &ee)
}

func TestCountAfter(t *testing.T) {
	assert.Equal(t, 2, CountAfter([]byte("SeaBIOS..ABB"), 'A', 'B'))
	assert.Equal(t, 3, CountAfter([]byte("SeaBIOS..ABB"), 0, 'B'))
	assert.Equal(t, 0, CountAfter([]byte("BBB"), 'A', 'B'))
}

func TestCheckLinux(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	t.Run("needs a pass that started after the migration", func(t *testing.T) {
		i := fakeInstance(t)
		appendSerial(t, i, "ssed line from the source\n"+
			"QMIGRATE CHECK OK pass=5 failed_passes=0\n"+ // the pass in flight at switchover
			"QMIGRATE PROGRESS pass=6 pages=1 rate=1 uptime=1\n")
		go func() {
			time.Sleep(50 * time.Millisecond)
			appendSerial(t, i, "QMIGRATE CHECK OK pass=6 failed_passes=0\n")
		}()
		l, err := CheckLinux(ctx, i, 3)
		require.NoError(t, err)
		assert.Equal(t, "QMIGRATE CHECK OK pass=6 failed_passes=0", l.Raw)
	})
	t.Run("minPass", func(t *testing.T) {
		i := fakeInstance(t)
		appendSerial(t, i, "QMIGRATE PROGRESS pass=2\nQMIGRATE CHECK OK pass=3 failed_passes=0\nQMIGRATE CHECK OK pass=4 failed_passes=0\n")
		l, err := CheckLinux(ctx, i, 3)
		require.NoError(t, err)
		assert.Equal(t, "QMIGRATE CHECK OK pass=4 failed_passes=0", l.Raw)
	})
	t.Run("fail line", func(t *testing.T) {
		i := fakeInstance(t)
		appendSerial(t, i, "QMIGRATE PROGRESS pass=2\nQMIGRATE CHECK FAIL pass=2 page=5 want=3 got=2 state=stale\n")
		_, err := CheckLinux(ctx, i, 0)
		var ie *IntegrityError
		require.ErrorAs(t, err, &ie)
		require.ErrorIs(t, err, ErrGuestFailed)
		assert.Contains(t, err.Error(), "page=5")
	})
	t.Run("earlier failed passes", func(t *testing.T) {
		i := fakeInstance(t)
		appendSerial(t, i, "QMIGRATE PROGRESS pass=2\nQMIGRATE CHECK OK pass=3 failed_passes=1\n")
		_, err := CheckLinux(ctx, i, 0)
		require.ErrorIs(t, err, ErrGuestFailed)
	})
	t.Run("ready and pass", func(t *testing.T) {
		i := fakeInstance(t)
		appendSerial(t, i, "[    1.0] kernel noise\nQMIGRATE READY mode=memdirty mem=1\nQMIGRATE PROGRESS pass=7\n")
		l, err := WaitLinuxReady(ctx, i)
		require.NoError(t, err)
		assert.Equal(t, linux.KindReady, l.Kind)
		p, err := LinuxPass(i)
		require.NoError(t, err)
		assert.Equal(t, uint64(7), p)
	})
}

func TestCheckLinuxDisk(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src := fakeInstance(t)
	appendSerial(t, src, "QMIGRATE DISK seq=100 synced=90\nQMIGRATE DISKVERIFY OK records=100 last=100\nQMIGRATE DISK seq=250 synced=250\n")
	seq, err := LinuxDiskSeq(src)
	require.NoError(t, err)
	assert.Equal(t, uint64(250), seq)

	dst := fakeInstance(t)
	appendSerial(t, dst, "QMIGRATE DISK seq=300 synced=300\nQMIGRATE DISKVERIFY OK records=200 last=240\n")
	go func() {
		time.Sleep(50 * time.Millisecond)
		appendSerial(t, dst, "QMIGRATE DISKVERIFY OK records=300 last=310\n")
	}()
	l, err := CheckLinuxDisk(ctx, dst, seq)
	require.NoError(t, err)
	assert.Equal(t, "QMIGRATE DISKVERIFY OK records=300 last=310", l.Raw)

	bad := fakeInstance(t)
	appendSerial(t, bad, "QMIGRATE DISKVERIFY FAIL seq=17 slot=16 reason=stale got=1\n")
	_, err = CheckLinuxDisk(ctx, bad, 1)
	var ie *IntegrityError
	require.ErrorAs(t, err, &ie)
	require.ErrorIs(t, err, ErrGuestFailed)
}

func TestParseCursor(t *testing.T) {
	out := "CPU#0\r\nEAX=00000000 EBX=00000000 ECX=00000010 EDX=000003f8\r\nESI=00000000 EDI=0012f000 EBP=00000000 ESP=00007c00\r\n"
	v, err := parseCursor(out)
	require.NoError(t, err)
	assert.Equal(t, uint32(0x12f000), v)
	_, err = parseCursor(strings.Replace(out, "0012f000", "00000000", 1))
	require.ErrorIs(t, err, ErrNoCursor)
	_, err = parseCursor("RAX=0000000000000000")
	require.ErrorIs(t, err, ErrNoCursor)
}

func TestShellJoin(t *testing.T) {
	assert.Equal(t, `qemu -append "console=ttyS0 quiet" ""`, shellJoin([]string{"qemu", "-append", "console=ttyS0 quiet", ""}))
}

// fakeTB records what the helpers do with a test.
type fakeTB struct {
	ctx     context.Context
	skipped string
	failed  string
}

func (f *fakeTB) Helper()                           {}
func (f *fakeTB) Cleanup(func())                    {}
func (f *fakeTB) Context() context.Context          { return f.ctx }
func (f *fakeTB) Logf(string, ...any)               {}
func (f *fakeTB) Skipf(format string, args ...any)  { f.skipped = format }
func (f *fakeTB) Fatalf(format string, args ...any) { f.failed = format }

func TestSkipOrFail(t *testing.T) {
	t.Setenv(EnvCI, "")
	f := &fakeTB{ctx: context.Background()}
	SkipOrFail(f, "no qemu")
	assert.Equal(t, "no qemu", f.skipped)
	assert.Empty(t, f.failed)

	t.Setenv(EnvCI, "true")
	f = &fakeTB{ctx: context.Background()}
	SkipOrFail(f, "no qemu")
	assert.Empty(t, f.skipped)
	assert.Contains(t, f.failed, "CI is set")
}

func ipOut(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	require.NoError(t, err, "%v: %s", args, out)
	return string(out)
}

func TestNetwork(t *testing.T) {
	n := NewNetworkT(t, 10e6)
	assert.True(t, strings.HasPrefix(n.A.Netns, "qm-"))
	assert.LessOrEqual(t, len(n.A.Dev), 15, "interface names are at most 15 bytes")
	assert.Contains(t, ipOut(t, "ip", "netns", "list"), n.B.Netns)
	assert.Contains(t, ipOut(t, "ip", "-n", n.A.Netns, "addr", "show", n.A.Dev), AddrA+"/24")
	assert.Contains(t, ipOut(t, "ip", "-n", n.B.Netns, "addr", "show", n.B.Dev), AddrB+"/24")
	qd := ipOut(t, "tc", "-n", n.B.Netns, "qdisc", "show", "dev", n.B.Dev)
	assert.Contains(t, qd, "tbf")
	assert.Contains(t, qd, "80Mbit")
	assert.Equal(t, uint64(10e6), n.Rate())

	ctx := context.Background()
	require.NoError(t, n.SetRate(ctx, 25e6))
	assert.Contains(t, ipOut(t, "tc", "-n", n.A.Netns, "qdisc", "show", "dev", n.A.Dev), "200Mbit")
	require.NoError(t, n.SetRate(ctx, 0))
	assert.NotContains(t, ipOut(t, "tc", "-n", n.A.Netns, "qdisc", "show", "dev", n.A.Dev), "tbf")

	require.NoError(t, n.Cut(ctx))
	assert.NotContains(t, ipOut(t, "ip", "-n", n.A.Netns, "link", "show", n.A.Dev), ",UP")
	require.NoError(t, n.Restore(ctx))
	assert.Contains(t, ipOut(t, "ip", "-n", n.A.Netns, "link", "show", n.A.Dev), ",UP")

	// A process left inside is killed by Close, and the namespaces go.
	sleeper := exec.Command("ip", "netns", "exec", n.A.Netns, "sleep", "60")
	require.NoError(t, sleeper.Start())
	done := make(chan error, 1)
	go func() { done <- sleeper.Wait() }()
	require.Eventually(t, func() bool {
		return strings.TrimSpace(ipOut(t, "ip", "netns", "pids", n.A.Netns)) != ""
	}, 5*time.Second, 20*time.Millisecond)
	require.NoError(t, n.Close())
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the process inside the namespace survived Close")
	}
	list := ipOut(t, "ip", "netns", "list")
	assert.NotContains(t, list, n.A.Netns)
	assert.NotContains(t, list, n.B.Netns)
	require.NoError(t, n.Close(), "Close twice is fine")
}

func TestRAMSize(t *testing.T) {
	v72, v10 := qmp.Version{Major: 7, Minor: 2, Micro: 22}, qmp.Version{Major: 10}
	assert.Equal(t, "153608K", RAMSize(v72, "tcg", 150), "QEMU < 9.0 under TCG: off the 256 KiB alignment")
	assert.Equal(t, "153608K", RAMSize(qmp.Version{}, "tcg", 150), "unknown version: the size safe on all")
	assert.Equal(t, "153600K", RAMSize(v10, "tcg", 150), "9.0+ has the fix: whole MiB")
	assert.Equal(t, "153600K", RAMSize(v72, "kvm", 150), "KVM is not affected")
	assert.Equal(t, int64(150<<20+8<<10), RAMBytes(v72, "kvm:tcg", 150))
}
