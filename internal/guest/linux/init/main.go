package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qmigrate/qmigrate/internal/guest/linux/wire"
)

func main() {
	out := &printer{w: os.Stdout}
	defer func() {
		if r := recover(); r != nil {
			out.line(wire.KindError, "", "msg", fmt.Sprint("panic: ", r))
		}
		hang()
	}()
	if os.Getpid() != 1 {
		out.line(wire.KindError, "", "msg", "not PID 1; refusing to mount and load modules")
		return
	}
	if err := run(out); err != nil {
		out.line(wire.KindError, "", "msg", err.Error())
	}
}

// hang keeps PID 1 alive: the kernel panics if init exits.
func hang() {
	for {
		time.Sleep(time.Hour)
	}
}

func run(out *printer) error {
	if err := mountAll(); err != nil {
		return err
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	w, err := wire.ParseArgs(string(cmdline))
	if err != nil {
		return err
	}
	if err := loadModules("/modules"); err != nil {
		return err
	}
	clk := realClock{}
	switch w.Mode {
	case wire.ModeIdle:
		out.line(wire.KindReady, "", "mode", string(w.Mode), "uptime", uptime())
		idle(out, clk, w.Report)
	case wire.ModeMemDirty:
		mem, err := unix.Mmap(-1, 0, int(w.MemBytes/wire.PageSize*wire.PageSize),
			unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("mmap %d bytes: %w", w.MemBytes, err)
		}
		d := newDirtier(mem, w.RateBytes, w.Report, out, clk)
		d.fill()
		out.line(wire.KindReady, "", "mode", string(w.Mode), "mem", u(uint64(len(mem))),
			"pages", u(uint64(len(d.gens))), "rate", u(w.RateBytes), "uptime", uptime())
		for {
			d.pass()
		}
	case wire.ModeDiskWrite:
		dev, err := openDisk(w.Disk, unix.O_RDWR)
		if err != nil {
			return err
		}
		verifyReq := make(chan struct{}, 1)
		go readCommands(os.Stdin, verifyReq)
		dw, err := newDiskWriter(dev, w, out, clk, randomRun())
		if err != nil {
			return err
		}
		out.line(wire.KindReady, "", "mode", string(w.Mode), "disk", w.Disk, "slots", u(dw.super.Slots),
			"rate", u(w.RateBytes), "run", strconv.FormatUint(dw.super.Run, 16), "uptime", uptime())
		return dw.run(verifyReq)
	case wire.ModeDiskVerify:
		dev, err := openDisk(w.Disk, unix.O_RDONLY)
		if err != nil {
			return err
		}
		out.line(wire.KindReady, "", "mode", string(w.Mode), "disk", w.Disk, "uptime", uptime())
		verifyOnce(dev, w.Expect, out)
		if w.PowerOff {
			unix.Sync()
			return unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		}
		idle(out, clk, w.Report)
	}
	return nil
}

func mountAll() error {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fs, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fs, m.dst, err)
		}
	}
	return nil
}

// loadModules loads the modules named in dir/order (one name a line, dependencies first).
func loadModules(dir string) error {
	order, err := os.ReadFile(dir + "/order")
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, name := range strings.Fields(string(order)) {
		f, err := os.Open(dir + "/" + name + ".ko")
		if err != nil {
			return err
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("finit_module %s: %w", name, err)
		}
	}
	return nil
}

// openDisk opens a block device with O_DIRECT, waiting for the driver to create it.
func openDisk(path string, flags int) (*blockDev, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		fd, err := unix.Open(path, flags|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err == nil {
			size, err := unix.Seek(fd, 0, io.SeekEnd)
			if err != nil {
				unix.Close(fd)
				return nil, fmt.Errorf("size of %s: %w", path, err)
			}
			return &blockDev{fd: fd, size: uint64(size)}, nil
		}
		if !errors.Is(err, unix.ENOENT) || time.Now().After(deadline) {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readCommands reads console lines and turns "verify" into a request.
func readCommands(r io.Reader, verify chan<- struct{}) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "verify" {
			select {
			case verify <- struct{}{}:
			default:
			}
		}
	}
}

func randomRun() uint64 {
	var b [8]byte
	if _, err := unix.Getrandom(b[:], 0); err != nil {
		return uint64(time.Now().UnixNano())
	}
	run := uint64(0)
	for _, c := range b {
		run = run<<8 | uint64(c)
	}
	return run | 1
}

func idle(out *printer, clk clock, every time.Duration) {
	for n := uint64(1); ; n++ {
		clk.Sleep(every)
		out.line(wire.KindTick, "", "n", u(n), "uptime", uptime())
	}
}

// printer writes whole lines, each with one write(2), so that lines stay intact on the console.
type printer struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *printer) line(kind, status string, kv ...string) {
	s := wire.FormatLine(kind, status, kv...)
	p.mu.Lock()
	defer p.mu.Unlock()
	_, _ = io.WriteString(p.w, s)
}

func u(v uint64) string { return strconv.FormatUint(v, 10) }

// uptime is the guest's CLOCK_BOOTTIME in seconds, as /proc/uptime shows it.
func uptime() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return "0"
	}
	return strconv.FormatFloat(float64(ts.Nano())/1e9, 'f', 2, 64)
}

// clock is the time source of the workloads (tests use a fake).
type clock interface {
	Now() time.Time
	Sleep(time.Duration)
}

type realClock struct{}

func (realClock) Now() time.Time        { return time.Now() }
func (realClock) Sleep(d time.Duration) { time.Sleep(d) }
