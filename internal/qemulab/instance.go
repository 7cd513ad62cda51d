package qemulab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// Defaults of Config.
const (
	DefaultMachine = "q35"
	DefaultAccel   = "tcg"
	DefaultCPU     = "max"
	DefaultMemMiB  = 150
	// DefaultConnectTimeout bounds the wait for the QMP socket.
	DefaultConnectTimeout = 30 * time.Second
)

// Guest is what a QEMU runs: it prepares its files in the instance's private
// folder and returns the QEMU arguments for its boot media and devices. The
// source and the destination of a migration must be given equal guests.
type Guest interface {
	Args(dir string) ([]string, error)
	String() string
}

// Config describes one QEMU process.
type Config struct {
	Name     string // short name for logs and the temp folder ("src", "dst")
	Guest    Guest  // may be nil (no boot media)
	MemMiB   int    // guest RAM, DefaultMemMiB when 0
	Machine  string // DefaultMachine when empty
	Accel    string // DefaultAccel when empty ("kvm" only where a probe proved it works)
	CPU      string // DefaultCPU when empty
	Incoming bool   // start with -incoming defer (a destination)
	Paused   bool   // start with -S: the guest runs after "cont" (with Incoming: stays paused after the migration)
	UUID     string // -uuid when set
	Netns    string // run inside this network namespace (ip netns exec)
	// MemBackend, when set, backs the guest RAM with a memory backend of
	// the guest's size (QEMU.RAMBytes).
	MemBackend *MemBackend
	// Drives are disk images on -blockdev nodes, after the guest's media.
	Drives []Drive
	// QMPSockets names more QMP monitors, each a unix socket in Dir
	// (Instance.QMPSocketOf) that the harness does not connect to: for a
	// second client, such as the CLI under test while the test watches.
	QMPSockets []string
	// Args are more QEMU arguments, last on the command line (-object,
	// -blockdev, -device... the options above do not cover).
	Args []string
	// ConnectTimeout bounds the wait for QMP (DefaultConnectTimeout when 0).
	ConnectTimeout time.Duration
	// QMPOptions are passed to qmp.Dial.
	QMPOptions []qmp.Option
	// Logf, when set, receives the command line and life-cycle notes.
	Logf func(format string, args ...any)
}

// MemBackendID is the id of the memory backend object of Config.MemBackend
// (a RAM block name the source and destination of a migration share).
const MemBackendID = "ram0"

// MemBackend backs the guest RAM (-object memory-backend-*,
// -machine memory-backend=MemBackendID).
type MemBackend struct {
	// Path is the file of memory-backend-file (QEMU creates it when
	// missing; an existing file must have QEMU.RAMBytes). Empty means
	// memory-backend-ram.
	Path string
	// Share maps the file shared (share=on): guest writes reach it and
	// writes to it reach the guest. Otherwise the mapping is private.
	Share bool
}

func (m *MemBackend) args(size string) []string {
	if m.Path == "" {
		return []string{"-object", "memory-backend-ram,id=" + MemBackendID + ",size=" + size}
	}
	share := "off"
	if m.Share {
		share = "on"
	}
	return []string{"-object", "memory-backend-file,id=" + MemBackendID + ",size=" + size + ",share=" + share + ",mem-path=" + m.Path}
}

// Drive is a disk image on two -blockdev nodes (a file node under a format
// node), optionally with a virtio-blk-pci device.
type Drive struct {
	Path   string // the image file
	Format string // "raw" when empty, "qcow2"...
	// Node is the format node's name (the device's drive); the file node
	// below it is Node+"-file".
	Node     string
	Device   string // id of a virtio-blk-pci device on Node; no device when empty
	ReadOnly bool   // read-only=on on both nodes
	Discard  bool   // discard=unmap on both nodes (keeps a mirrored image sparse)
}

// Args are the drive's -blockdev and -device arguments.
func (d Drive) Args() []string {
	format := d.Format
	if format == "" {
		format = "raw"
	}
	opts := ""
	if d.ReadOnly {
		opts += ",read-only=on"
	}
	if d.Discard {
		opts += ",discard=unmap"
	}
	file := d.Node + "-file"
	args := []string{
		"-blockdev", "driver=file,filename=" + d.Path + ",node-name=" + file + opts,
		"-blockdev", "driver=" + format + ",file=" + file + ",node-name=" + d.Node + opts,
	}
	if d.Device != "" {
		args = append(args, "-device", "virtio-blk-pci,drive="+d.Node+",id="+d.Device)
	}
	return args
}

// ExitError reports a QEMU process that exited on its own; Log is the tail of
// its stdout/stderr.
type ExitError struct {
	Name string
	Err  error
	Log  string
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("qemulab: qemu %s exited: %v; log: %s", e.Name, e.Err, e.Log)
}

func (e *ExitError) Unwrap() error { return e.Err }

// Instance is a running QEMU process with a connected QMP client. Close (or
// Kill) always reaps the process and removes its private folder.
type Instance struct {
	Name    string
	QMP     *qmp.Client
	Started time.Time // when the process was started

	cfg     Config
	dir     string
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error // set before done is closed
	stopCtx context.CancelFunc

	closeOnce sync.Once
	closeErr  error
}

// Start launches QEMU as described by cfg and connects to its QMP socket.
// The process is killed when ctx ends; call Close when done with it.
//
// QEMU runs in its own process group (killed as a whole) with a parent-death
// signal of SIGKILL, so it does not outlive a crashed test binary. (The
// parent-death signal is tied to the OS thread that forked; nothing in this
// module ends threads with runtime.LockOSThread, which would fire it early.)
func (q *QEMU) Start(ctx context.Context, cfg Config) (_ *Instance, err error) {
	if cfg.Name == "" {
		cfg.Name = "vm"
	}
	dir, err := os.MkdirTemp("", "qm-"+cfg.Name+"-")
	if err != nil {
		return nil, fmt.Errorf("qemulab: start %s: %w", cfg.Name, err)
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
		}
	}()
	args, err := q.Args(dir, cfg)
	if err != nil {
		return nil, fmt.Errorf("qemulab: start %s: %w", cfg.Name, err)
	}
	name := q.Binary
	if cfg.Netns != "" {
		args = append([]string{"netns", "exec", cfg.Netns, q.Binary}, args...)
		name = "ip"
	}
	logFile, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		return nil, fmt.Errorf("qemulab: start %s: %w", cfg.Name, err)
	}
	defer logFile.Close() // the child has its own descriptor

	cmd := exec.Command(name, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if cfg.Logf != nil {
		cfg.Logf("qemulab: %s: %s %s", cfg.Name, name, shellJoin(args))
	}
	inst := &Instance{Name: cfg.Name, cfg: cfg, dir: dir, cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemulab: start %s: %w", cfg.Name, err)
	}
	inst.Started = time.Now()
	go func() {
		inst.waitErr = cmd.Wait()
		close(inst.done)
	}()
	// Kill the process group when the parent context ends.
	watchCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	inst.stopCtx = stop
	go func() {
		select {
		case <-ctx.Done():
			inst.killGroup()
		case <-watchCtx.Done():
		case <-inst.done:
		}
	}()
	defer func() {
		if err != nil {
			_ = inst.Close()
		}
	}()
	c, err := inst.connect(ctx)
	if err != nil {
		return nil, err
	}
	inst.QMP = c
	return inst, nil
}

// Args returns the QEMU command line (without the binary) that Start uses
// for cfg with dir as the private folder; it also prepares the guest's files
// in dir.
func (q *QEMU) Args(dir string, cfg Config) ([]string, error) {
	mem := cfg.MemMiB
	if mem == 0 {
		mem = DefaultMemMiB
	}
	machine := cfg.Machine
	if machine == "" {
		machine = DefaultMachine
	}
	accel := cfg.Accel
	if accel == "" {
		accel = DefaultAccel
	}
	cpu := cfg.CPU
	if cpu == "" {
		cpu = DefaultCPU
	}
	size := RAMSize(q.ver, accel, mem)
	if cfg.MemBackend != nil {
		machine += ",memory-backend=" + MemBackendID
	}
	args := q.FirmwareArgs()
	args = append(args,
		"-name", cfg.Name,
		"-accel", accel,
		"-M", machine,
		"-cpu", cpu,
		"-m", size,
		"-nographic", "-nodefaults",
		"-serial", "file:"+filepath.Join(dir, "serial.log"),
		"-qmp", "unix:"+filepath.Join(dir, "qmp.sock")+",server=on,wait=off",
	)
	for _, name := range cfg.QMPSockets {
		args = append(args, "-qmp", "unix:"+qmpSocketOf(dir, name)+",server=on,wait=off")
	}
	if cfg.MemBackend != nil {
		args = append(args, cfg.MemBackend.args(size)...)
	}
	if cfg.Paused {
		args = append(args, "-S")
	}
	if cfg.UUID != "" {
		args = append(args, "-uuid", cfg.UUID)
	}
	if cfg.Incoming {
		args = append(args, "-incoming", "defer")
	}
	if cfg.Guest != nil {
		ga, err := cfg.Guest.Args(dir)
		if err != nil {
			return nil, fmt.Errorf("guest %s: %w", cfg.Guest, err)
		}
		args = append(args, ga...)
	}
	for _, d := range cfg.Drives {
		args = append(args, d.Args()...)
	}
	return append(args, cfg.Args...), nil
}

func (i *Instance) connect(ctx context.Context) (*qmp.Client, error) {
	timeout := i.cfg.ConnectTimeout
	if timeout == 0 {
		timeout = DefaultConnectTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	sock := i.QMPSocket()
	delay := 2 * time.Millisecond
	var lastErr error
	for {
		select {
		case <-i.done:
			return nil, i.exitError()
		default:
		}
		if _, err := os.Stat(sock); err == nil {
			c, err := qmp.Dial(ctx, "unix", sock, i.cfg.QMPOptions...)
			if err == nil {
				return c, nil
			}
			lastErr = err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("qemulab: %s: waiting for QMP at %s: %w (last error: %v; log: %s)",
				i.Name, sock, ctx.Err(), lastErr, i.LogTail())
		case <-i.done:
			t.Stop()
			return nil, i.exitError()
		case <-t.C:
		}
		delay = min(delay*2, 100*time.Millisecond)
	}
}

func (i *Instance) exitError() error {
	return &ExitError{Name: i.Name, Err: i.waitErr, Log: i.LogTail()}
}

// Dir is the instance's private folder (QMP socket, serial log, guest files).
// It is removed by Close; QEMU can read and write files there.
func (i *Instance) Dir() string { return i.dir }

// QMPSocket is the path of the QMP unix socket.
func (i *Instance) QMPSocket() string { return filepath.Join(i.dir, "qmp.sock") }

// QMPSocketOf is the path of the extra QMP socket name (Config.QMPSockets).
func (i *Instance) QMPSocketOf(name string) string { return qmpSocketOf(i.dir, name) }

func qmpSocketOf(dir, name string) string { return filepath.Join(dir, name+".qmp.sock") }

// SerialPath is the file COM1 is written to.
func (i *Instance) SerialPath() string { return filepath.Join(i.dir, "serial.log") }

// Pid is the QEMU process id.
func (i *Instance) Pid() int { return i.cmd.Process.Pid }

// Done is closed when the QEMU process has exited and been reaped.
func (i *Instance) Done() <-chan struct{} { return i.done }

// ExitErr is the process's exit status once Done is closed (nil for exit 0).
func (i *Instance) ExitErr() error {
	select {
	case <-i.done:
		return i.waitErr
	default:
		return nil
	}
}

// Exited reports whether the process has exited.
func (i *Instance) Exited() bool {
	select {
	case <-i.done:
		return true
	default:
		return false
	}
}

// LogTail returns the last 2 KiB of QEMU's stdout/stderr.
func (i *Instance) LogTail() string {
	b, err := os.ReadFile(filepath.Join(i.dir, "qemu.log"))
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return string(b)
}

// Signal sends sig to the QEMU process (SIGSTOP freezes it, SIGCONT thaws
// it).
func (i *Instance) Signal(sig syscall.Signal) error {
	if i.Exited() {
		return fmt.Errorf("qemulab: signal %s: %w", i.Name, os.ErrProcessDone)
	}
	return syscall.Kill(i.cmd.Process.Pid, sig)
}

func (i *Instance) killGroup() {
	// Setpgid made the process a group leader; ip netns exec execs QEMU in
	// place, so the group holds QEMU and nothing else of ours.
	_ = syscall.Kill(-i.cmd.Process.Pid, syscall.SIGKILL)
}

// Kill kills the QEMU process group and waits for it to be reaped. The
// private folder stays until Close.
func (i *Instance) Kill() {
	select {
	case <-i.done:
		return
	default:
	}
	i.killGroup()
	<-i.done
}

// Close kills QEMU if it still runs, reaps it, closes the QMP connection and
// removes the private folder. It is safe to call more than once.
func (i *Instance) Close() error {
	i.closeOnce.Do(func() {
		i.Kill()
		i.stopCtx()
		if i.QMP != nil {
			_ = i.QMP.Close()
		}
		if err := os.RemoveAll(i.dir); err != nil {
			i.closeErr = fmt.Errorf("qemulab: close %s: %w", i.Name, err)
		}
	})
	return i.closeErr
}

// Quit asks QEMU to quit over QMP and waits for the process to exit (killing
// it when ctx ends first). It does not remove the folder; Close does.
func (i *Instance) Quit(ctx context.Context) error {
	if i.Exited() {
		return nil
	}
	err := i.QMP.Quit(ctx)
	select {
	case <-i.done:
		if err != nil && !errors.Is(err, qmp.ErrClosed) {
			return err
		}
		return nil
	case <-ctx.Done():
		i.Kill()
		return fmt.Errorf("qemulab: quit %s: %w", i.Name, ctx.Err())
	}
}

func shellJoin(args []string) string {
	out := make([]byte, 0, 256)
	for n, a := range args {
		if n > 0 {
			out = append(out, ' ')
		}
		if a == "" || strings.ContainsAny(a, " \t\"'\\$") {
			out = strconv.AppendQuote(out, a)
		} else {
			out = append(out, a...)
		}
	}
	return string(out)
}
