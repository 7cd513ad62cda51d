package qemulab

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
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

func TestArgsOptions(t *testing.T) {
	dir := t.TempDir()
	q := &QEMU{Binary: "qemu-system-x86_64", ver: qmp.Version{Major: 7, Minor: 2}}
	cfg := Config{Name: "bm", MemMiB: 64, Paused: true, Incoming: true,
		MemBackend: &MemBackend{Path: "/tmp/ram", Share: true},
		Drives: []Drive{
			{Path: "/img/a.qcow2", Format: "qcow2", Node: "disk0", Device: "vd0", Discard: true},
			{Path: "/img/ro.raw", Node: "ro0", ReadOnly: true},
		},
		QMPSockets: []string{"cli"},
		Args:       []string{"-no-reboot"},
	}
	args, err := q.Args(dir, cfg)
	require.NoError(t, err)
	line := strings.Join(args, " ")
	for _, want := range []string{
		"-M q35,memory-backend=ram0", "-m 65544K",
		"-object memory-backend-file,id=ram0,size=65544K,share=on,mem-path=/tmp/ram",
		"-qmp unix:" + filepath.Join(dir, "cli.qmp.sock") + ",server=on,wait=off",
		"-S", "-incoming defer",
		"-blockdev driver=file,filename=/img/a.qcow2,node-name=disk0-file,discard=unmap " +
			"-blockdev driver=qcow2,file=disk0-file,node-name=disk0,discard=unmap " +
			"-device virtio-blk-pci,drive=disk0,id=vd0",
		"-blockdev driver=file,filename=/img/ro.raw,node-name=ro0-file,read-only=on " +
			"-blockdev driver=raw,file=ro0-file,node-name=ro0,read-only=on",
	} {
		assert.Contains(t, line, want)
	}
	assert.Equal(t, "-no-reboot", args[len(args)-1])
	assert.Equal(t, int64(64<<20+8<<10), q.RAMBytes(cfg), "the backend file's size")
	assert.Equal(t, (&Instance{dir: dir}).QMPSocketOf("cli"), filepath.Join(dir, "cli.qmp.sock"))

	cfg = Config{MemBackend: &MemBackend{}}
	q.ver = qmp.Version{Major: 10}
	args, err = q.Args(dir, cfg)
	require.NoError(t, err)
	line = strings.Join(args, " ")
	assert.Contains(t, line, "-object memory-backend-ram,id=ram0,size=153600K")
	assert.NotContains(t, line, " -S")
	assert.Equal(t, int64(150<<20), q.RAMBytes(cfg))
}

func TestFindQEMUs(t *testing.T) {
	path := t.TempDir()
	sys := filepath.Join(path, "qemu-system-x86_64")
	require.NoError(t, os.WriteFile(sys, []byte("#!/bin/sh\necho 'QEMU emulator version 7.2.22 (Debian)'\n"), 0o755))
	newer := fakeQEMU(t, "echo 'QEMU emulator version 10.0.2'")
	cache, fw := t.TempDir(), t.TempDir()
	write := func(name, body string) {
		require.NoError(t, os.WriteFile(filepath.Join(cache, name), []byte(body), 0o644))
	}
	write("qemu-10.0.env", "QMIGRATE_QEMU="+newer+"\nQMIGRATE_QEMU_FIRMWARE="+fw+"\n")
	write("qemu-7.2.env", "QMIGRATE_QEMU="+sys+"\n")                         // the same binary as PATH's
	write("qemu-9.0.env", "QMIGRATE_QEMU=/nonexistent/qemu-system-x86_64\n") // not there: left out
	t.Setenv("PATH", path)
	t.Setenv(EnvCache, cache)
	t.Setenv(EnvQEMU, "")
	t.Setenv(EnvQEMUFirmware, "")
	t.Setenv(EnvQEMUImg, "")

	qs, err := FindQEMUs()
	require.NoError(t, err)
	require.Len(t, qs, 2)
	assert.Equal(t, "7.2", qs[0].Name())
	assert.Equal(t, sys, qs[0].Binary)
	assert.Equal(t, "10.0", qs[1].Name())
	assert.Equal(t, qmp.Version{Major: 10, Micro: 2}, qs[1].Ver())
	assert.Equal(t, fw, qs[1].Firmware)

	t.Setenv(EnvQEMU, newer) // the environment picks one
	qs, err = FindQEMUs()
	require.NoError(t, err)
	require.Len(t, qs, 1)
	assert.Equal(t, newer, qs[0].Binary)

	t.Setenv(EnvQEMU, "")
	t.Setenv("PATH", t.TempDir())
	t.Setenv(EnvCache, t.TempDir())
	_, err = FindQEMUs()
	require.ErrorIs(t, err, ErrQEMUNotFound)

	assert.Equal(t, "qemu-kvm", (&QEMU{Binary: "/usr/libexec/qemu-kvm"}).Name(), "unknown version")
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

// The context ends once the process is being started (Logf runs just
// before the fork): Start kills it and returns instead of waiting a minute
// for QMP.
func TestStartKilledWithContext(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "pid")
	q := &QEMU{Binary: fakeQEMU(t, "echo $$ > "+marker+"; exec sleep 60")}
	ctx, cancel := context.WithCancel(context.Background())
	start := time.Now()
	_, err := q.Start(ctx, Config{Name: "cancel", ConnectTimeout: time.Minute, Logf: func(string, ...any) { cancel() }})
	require.ErrorIs(t, err, context.Canceled)
	assert.Less(t, time.Since(start), 30*time.Second, "Start returned without waiting for the connect timeout")
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

// waiting runs f in a goroutine of the synctest bubble and returns once f
// is blocked (waiting for the serial file) or done; done reports whether f
// returned.
func waiting(f func()) (done func() bool) {
	ch := make(chan struct{})
	go func() { f(); close(ch) }()
	synctest.Wait()
	return func() bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}
}

// The serial waits run in a synctest bubble: a wait polls the file on a
// ticker of the bubble's clock, so "it has not matched yet" is checked when
// every goroutine is blocked, and each append is seen at the next poll.
func TestWaitSerial(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		i := fakeInstance(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var n int
		var err error
		done := waiting(func() { n, err = i.CountSerial(ctx, sweep.StartChar, sweep.PassChar, 3) })
		for _, chunk := range []string{"SeaBIOS banner\r\nBooting from Hard Disk..A", "BB"} {
			appendSerial(t, i, chunk)
			time.Sleep(SerialPoll)
			synctest.Wait()
			require.False(t, done(), "matched before the third pass after A (the B in SeaBIOS is not counted)")
		}
		appendSerial(t, i, "B")
		time.Sleep(SerialPoll)
		synctest.Wait()
		require.True(t, done())
		require.NoError(t, err)
		assert.Equal(t, 3, n)

		short, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel2()
		_, err = i.CountSerial(short, sweep.StartChar, sweep.PassChar, 10)
		require.ErrorIs(t, err, ErrSerialTimeout)
		require.ErrorIs(t, err, context.DeadlineExceeded)
	})
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
		synctest.Test(t, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			i := fakeInstance(t)
			appendSerial(t, i, "ssed line from the source\n"+
				"QMIGRATE CHECK OK pass=5 failed_passes=0\n"+ // the pass in flight at switchover
				"QMIGRATE PROGRESS pass=6 pages=1 rate=1 uptime=1\n")
			var l linux.Line
			var err error
			done := waiting(func() { l, err = CheckLinux(ctx, i, 3) })
			require.False(t, done(), "pass 5 was in flight at the switchover: it proves nothing")
			appendSerial(t, i, "QMIGRATE CHECK OK pass=6 failed_passes=0\n")
			time.Sleep(SerialPoll)
			synctest.Wait()
			require.True(t, done())
			require.NoError(t, err)
			assert.Equal(t, "QMIGRATE CHECK OK pass=6 failed_passes=0", l.Raw)
		})
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
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		src := fakeInstance(t)
		appendSerial(t, src, "QMIGRATE DISK seq=100 synced=90\nQMIGRATE DISKVERIFY OK records=100 last=100\nQMIGRATE DISK seq=250 synced=250\n")
		seq, err := LinuxDiskSeq(src)
		require.NoError(t, err)
		assert.Equal(t, uint64(250), seq)

		dst := fakeInstance(t)
		appendSerial(t, dst, "QMIGRATE DISK seq=300 synced=300\nQMIGRATE DISKVERIFY OK records=200 last=240\n")
		var l linux.Line
		done := waiting(func() { l, err = CheckLinuxDisk(ctx, dst, seq) })
		require.False(t, done(), "a verification up to record 240 does not cover the source's 250")
		appendSerial(t, dst, "QMIGRATE DISKVERIFY OK records=300 last=310\n")
		time.Sleep(SerialPoll)
		synctest.Wait()
		require.True(t, done())
		require.NoError(t, err)
		assert.Equal(t, "QMIGRATE DISKVERIFY OK records=300 last=310", l.Raw)

		bad := fakeInstance(t)
		appendSerial(t, bad, "QMIGRATE DISKVERIFY FAIL seq=17 slot=16 reason=stale got=1\n")
		_, err = CheckLinuxDisk(ctx, bad, 1)
		var ie *IntegrityError
		require.ErrorAs(t, err, &ie)
		require.ErrorIs(t, err, ErrGuestFailed)
	})
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
