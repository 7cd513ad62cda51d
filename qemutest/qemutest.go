package qemutest

import (
	"context"
	"encoding/json"
	"path/filepath"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// Side names one QEMU of a Pair.
type Side int

// The two sides of a migration.
const (
	Source Side = iota
	Destination
)

func (s Side) String() string {
	if s == Destination {
		return "destination"
	}
	return "source"
}

// Port is the port the fake destination picks when asked to listen on tcp
// port 0.
const Port = 45678

// MirrorManual as Options.MirrorRate makes mirror jobs move only when the
// test calls QEMU.SetMirrorProgress.
const MirrorManual = -1

// Options shape the fake pair. Zero values take the defaults shown; the
// Dst* fields default to their source counterpart.
type Options struct {
	Version        [3]int        // 10.0.2
	DstVersion     [3]int        // = Version
	RAM            uint64        // 150 MiB
	DstRAM         uint64        // = RAM
	Machine        string        // "pc-q35-10.0"
	DstMachine     string        // = Machine
	SrcUUID        string        // "" (no -uuid)
	DstUUID        string        // ""
	Throughput     float64       // bytes/s, 1 GiB/s (capped by max-bandwidth)
	DirtyRate      float64       // bytes/s while the source vCPUs run, 0
	Tick           time.Duration // 10 ms: the RAM model's step
	DstAutostart   bool          // destination started without -S: runs by itself after completion
	DstNotDeferred bool          // destination started with -incoming URI: already listening
	DstRunState    string        // "inmigrate"
	SrcRunState    string        // "running"
	// PostcopyRate is the throughput in postcopy (default Throughput).
	PostcopyRate float64
	// DstDeviceLoad is how long the destination takes, in postcopy, to
	// load the device state before its guest runs (RESUME): time with the
	// link working (0: at once). As in QEMU, whose main thread loads it
	// and waits there on guest pages only the link brings, the
	// destination's monitor answers no in-band command meanwhile (they
	// wait, and are answered once it loaded); exec-oob commands
	// (migrate-pause, migrate-recover) are answered and MIGRATION events
	// sent. A link lost in that window holds the in-band commands until a
	// recovery brings the link back and the load ends. Both versions alike
	// (7.2 and 10.0 allow migrate-recover and migrate-pause out of band).
	DstDeviceLoad time.Duration
	// FailWith makes the migration fail in setup with this error-desc while
	// the destination stays up (exit-on-error false).
	FailWith string
	// LateCancel is how a migrate_cancel received during the stop-and-copy
	// (status device) ends. Real QEMU carries it out only once the device
	// state is written (the migration thread holds the big lock), so the
	// destination may have the whole stream. "" cuts the stream at once:
	// cancelled, source resumed, destination exits.
	LateCancel LateCancel
	// DstFailsLoad makes the destination fail loading the end of the
	// stream and exit, after the source completed.
	DstFailsLoad bool
	// DstNeverCompletes makes the stream go elsewhere: the source
	// completes, the destination stays as it was, listening (a proxy that
	// swallowed the stream).
	DstNeverCompletes bool
	// RefuseObject makes object-add fail with this error text on the side
	// RefuseObjectSide, as QEMU refuses TLS credentials whose files are
	// missing.
	RefuseObject     string
	RefuseObjectSide Side

	// Disk > 0 gives both sides a raw disk "disk0" of that many bytes
	// (/src/disk0.raw and /dst/disk0.raw, device vd0). Disks and DstDisks
	// give each side the block devices listed instead (query-block's
	// answer). With any disk on either side both sides get the block
	// layer (block.go): named nodes, NBD server and exports, mirror jobs,
	// blockdev-create jobs; block-job-change from 8.2.
	Disk          uint64
	Disks         []qmp.BlockInfo
	DstDisks      []qmp.BlockInfo
	MirrorRate    float64 // bytes/s a mirror copies (100 MiB/s; a lower blockdev-mirror speed lowers it); MirrorManual
	DiskWriteRate float64 // bytes/s the running guest dirties the disk, 0
	// The guest-visible machine (machine.go), what package preflight
	// compares. Machine and DstMachine take QEMU's aliases "pc" and "q35",
	// resolved to each side's version (pc-i440fx-7.2 on 7.2,
	// pc-i440fx-10.0 on 10.0); the default is pc-q35 of the older side's
	// version, pinned alike on both sides. CPU is the -cpu value: "qemu64"
	// (default) or "max", each with the feature words real QEMU gave it,
	// followed by feature flags as QEMU takes them ("qemu64,+avx2,-sse4.1").
	// VCPUs is -smp (1), MaxVCPUs its maxcpus (= VCPUs; the slots above
	// VCPUs are empty hotpluggable ones). Devices are the -device list
	// (nil: DefaultDevices; a disk's virtio-blk-pci device is added by its
	// qdev id). Blockers are the source's migration blockers
	// (query-migrate's blocked-reasons; migrate then fails with the first).
	// As real QEMU 10.0, a side of version 9.0 or later with more than one
	// vCPU slot has ht and cmp-legacy in its feature words (7.2 sets them
	// only when the guest runs CPUID; preflight knows).
	CPU         string
	DstCPU      string // = CPU
	VCPUs       int
	DstVCPUs    int // = VCPUs
	MaxVCPUs    int
	DstMaxVCPUs int      // = MaxVCPUs
	Devices     []Device // nil: DefaultDevices()
	DstDevices  []Device // nil: = Devices
	Blockers    []string
	// Serial makes each monitor run its in-band commands one at a time,
	// as QEMU does (qmptest.WithSerial). By default every command runs in
	// its own goroutine.
	Serial bool
}

// LateCancel is an ending of a migrate_cancel that lands during the
// stop-and-copy, after the whole stream was written.
type LateCancel string

// The endings QEMU 7.2 and 10.0 can give.
const (
	// LateCancelCompletes: completed anyway (10.0, the cancel after the
	// file error check); the source stays in postmigrate.
	LateCancelCompletes LateCancel = "completes"
	// LateCancelResumes: cancelled, the source resumes the guest, and the
	// destination completes its incoming migration (and starts the guest
	// itself with DstAutostart, unless stop turned that off).
	LateCancelResumes LateCancel = "resumes"
	// LateCancelPostmigrate: cancelled, the source left in postmigrate
	// (QEMU did not record that the guest ran), the destination completes.
	LateCancelPostmigrate LateCancel = "postmigrate"
	// LateCancelPostmigrateDstFails: cancelled, the source left in
	// postmigrate, the destination fails and exits.
	LateCancelPostmigrateDstFails LateCancel = "postmigrate-dst-fails"
)

func (o *Options) defaults() {
	if o.Version == [3]int{} {
		o.Version = [3]int{10, 0, 2}
	}
	if o.DstVersion == [3]int{} {
		o.DstVersion = o.Version
	}
	if o.RAM == 0 {
		o.RAM = 150 << 20
	}
	if o.DstRAM == 0 {
		o.DstRAM = o.RAM
	}
	if o.Machine == "" {
		older := o.Version
		if o.DstVersion[0] < older[0] || o.DstVersion[0] == older[0] && o.DstVersion[1] < older[1] {
			older = o.DstVersion
		}
		o.Machine = "pc-q35-" + verName(older)
	}
	if o.DstMachine == "" {
		o.DstMachine = o.Machine
	}
	if o.CPU == "" {
		o.CPU = "qemu64"
	}
	if o.DstCPU == "" {
		o.DstCPU = o.CPU
	}
	if o.VCPUs == 0 {
		o.VCPUs = 1
	}
	if o.DstVCPUs == 0 {
		o.DstVCPUs = o.VCPUs
	}
	if o.MaxVCPUs == 0 {
		o.MaxVCPUs = o.VCPUs
	}
	if o.DstMaxVCPUs == 0 {
		o.DstMaxVCPUs = max(o.MaxVCPUs, o.DstVCPUs)
	}
	o.MaxVCPUs = max(o.MaxVCPUs, o.VCPUs)
	if o.Devices == nil {
		o.Devices = DefaultDevices()
	}
	if o.DstDevices == nil {
		o.DstDevices = o.Devices
	}
	if o.Throughput == 0 {
		o.Throughput = 1 << 30
	}
	if o.PostcopyRate == 0 {
		o.PostcopyRate = o.Throughput
	}
	if o.Tick == 0 {
		o.Tick = 10 * time.Millisecond
	}
	if o.DstRunState == "" {
		o.DstRunState = "inmigrate"
	}
	if o.SrcRunState == "" {
		o.SrcRunState = "running"
	}
	if o.MirrorRate == 0 {
		o.MirrorRate = 100 << 20
	}
	if o.Disk > 0 && o.Disks == nil && o.DstDisks == nil {
		o.Disks = []qmp.BlockInfo{rawDisk("disk0", "/src/disk0.raw", o.Disk)}
		o.DstDisks = []qmp.BlockInfo{rawDisk("disk0", "/dst/disk0.raw", o.Disk)}
	}
}

// Pair is a fake source and destination QEMU sharing one migration model.
// All methods are safe for concurrent use.
type Pair struct {
	// Src and Dst are the two monitors. Each embeds its qmptest.Server:
	// connect with Client or ListenUnix, read Calls, replace a handler
	// with Handle to inject a fault.
	Src, Dst *QEMU
	opt      Options

	mu  sync.Mutex // guards the model: everything below and each QEMU's state
	mig migration
	ram ramModel
	pc  postcopyFaults

	fmu            sync.Mutex
	frozen         [2]chan struct{} // non-nil while a side is frozen; closed by Thaw
	dstExitPending bool             // the destination exits once thawed (mu)
}

// QEMU is one fake QEMU of a Pair: a qmptest.Server whose handlers model the
// commands below, on state the Pair guards.
type QEMU struct {
	*qmptest.Server
	p    *Pair
	side Side

	run     string
	caps    map[string]bool
	params  map[string]any
	objects map[string]map[string]any // object-add arguments by id
	stops   int
	block   *blockLayer // nil without disks
	hw      *hardware   // the guest-visible machine, fixed at New
}

// New starts a fake pair. Close it when done. It panics on a CPU model or
// feature the fake does not model (a mistake of the test).
func New(opt Options) *Pair {
	opt.defaults()
	p := &Pair{opt: opt}
	p.mig.status, p.mig.dstStatus = qmp.StatusNone, qmp.StatusNone
	withBlock := len(opt.Disks) > 0 || len(opt.DstDisks) > 0
	for _, side := range []Side{Source, Destination} {
		v := p.version(side)
		sopts := []qmptest.Option{qmptest.WithVersion(v[0], v[1], v[2])}
		if opt.Serial {
			sopts = append(sopts, qmptest.WithSerial())
		}
		q := &QEMU{Server: qmptest.NewServer(sopts...), p: p, side: side,
			caps: map[string]bool{}, objects: map[string]map[string]any{}, params: defaultParams()}
		for _, c := range capNames() {
			q.caps[c] = false
		}
		if withBlock {
			disks := opt.Disks
			if side == Destination {
				disks = opt.DstDisks
			}
			q.block = newBlockLayer(disks)
		}
		hw, err := newHardware(&opt, side, v, diskDevices(sideDisks(opt, side)))
		if err != nil {
			panic(err)
		}
		q.hw = hw
		if side == Source {
			p.Src, q.run = q, opt.SrcRunState
		} else {
			p.Dst, q.run = q, opt.DstRunState
		}
	}
	if opt.DstDeviceLoad > 0 {
		p.Dst.SetInBandGate(p.waitDeviceLoaded)
	}
	for _, q := range []*QEMU{p.Src, p.Dst} {
		q.installRunState()
		q.installConfig()
		q.installObjects()
		q.installMigration()
		q.installPostcopy()
		if q.block != nil {
			q.installBlock()
		} else {
			q.installNoBlock()
		}
		q.installMachine()
	}
	if opt.DstNotDeferred {
		p.mig.listening = true
		p.mig.sockAddr = []qmp.SocketAddress{{Type: "inet", Host: "127.0.0.1", Port: "4444"}}
		p.mig.dstStatus = qmp.StatusSetup
	}
	return p
}

// Clients connects one client to each side (over net.Pipe, so it works
// inside testing/synctest bubbles). The caller closes them.
func (p *Pair) Clients(ctx context.Context, opts ...qmp.Option) (src, dst *qmp.Client, err error) {
	src, err = p.Src.Client(ctx, opts...)
	if err != nil {
		return nil, nil, err
	}
	dst, err = p.Dst.Client(ctx, opts...)
	if err != nil {
		src.Close()
		return nil, nil, err
	}
	return src, dst, nil
}

// ListenUnix makes both monitors also listen on unix sockets in dir
// (src.sock and dst.sock), for code that dials an address, and returns
// their paths. Close removes them.
func (p *Pair) ListenUnix(dir string) (src, dst string, err error) {
	src, dst = filepath.Join(dir, "src.sock"), filepath.Join(dir, "dst.sock")
	if err := p.Src.ListenUnix(src); err != nil {
		return "", "", err
	}
	if err := p.Dst.ListenUnix(dst); err != nil {
		return "", "", err
	}
	return src, dst, nil
}

// QEMU returns one side's fake.
func (p *Pair) QEMU(s Side) *QEMU {
	if s == Destination {
		return p.Dst
	}
	return p.Src
}

func (p *Pair) version(s Side) [3]int {
	if s == Destination {
		return p.opt.DstVersion
	}
	return p.opt.Version
}

// Close stops the model and both servers (thawing both sides first).
func (p *Pair) Close() {
	p.Thaw(Source)
	p.Thaw(Destination)
	p.mu.Lock()
	p.deviceLoaded()
	p.mu.Unlock()
	p.stopRAM()
	p.Src.Server.Close()
	p.Dst.Server.Close()
}

// Freeze stops one side's QEMU as SIGSTOP does: its monitor answers nothing
// (commands wait, and are answered once it is thawed) and the migration
// stream stalls. A frozen source does nothing at all (the model does not
// advance, no events); with a frozen destination the source goes on (a
// cancel is carried out) and a destination that should exit does so when
// thawed. Handlers a test installed with Handle are not held.
func (p *Pair) Freeze(s Side) {
	p.fmu.Lock()
	defer p.fmu.Unlock()
	if p.frozen[s] == nil {
		p.frozen[s] = make(chan struct{})
	}
}

// Thaw resumes a side stopped by Freeze (SIGCONT).
func (p *Pair) Thaw(s Side) {
	p.fmu.Lock()
	if ch := p.frozen[s]; ch != nil {
		close(ch)
		p.frozen[s] = nil
	}
	p.fmu.Unlock()
	if s == Destination {
		p.mu.Lock()
		if p.dstExitPending {
			p.dstExitPending = false
			p.dstExit()
		}
		p.mu.Unlock()
	}
}

func (p *Pair) isFrozen(s Side) bool {
	p.fmu.Lock()
	defer p.fmu.Unlock()
	return p.frozen[s] != nil
}

// gate waits while side s is frozen.
func (p *Pair) gate(s Side) {
	p.fmu.Lock()
	ch := p.frozen[s]
	p.fmu.Unlock()
	if ch != nil {
		<-ch
	}
}

// KillDst makes the destination QEMU exit: its connections close and the
// source's migration fails on the next tick.
func (p *Pair) KillDst() {
	p.mu.Lock()
	p.mig.dstDead = true
	p.deviceLoaded() // its held commands end with it
	p.mu.Unlock()
	p.Dst.CloseConns()
}

// RestartDst starts the destination QEMU again, as a manager retrying a
// failed migration on a fresh destination does: the old one's connections
// close (if it had not exited already) and a new one waits as a new
// process would (Options.DstRunState, QEMU's default capabilities and
// parameters, no objects, its disks as at New), on the same monitor:
// connect to it again with Dst.Client or its unix socket. Call it once the
// source's migration has ended (failed or cancelled).
func (p *Pair) RestartDst() {
	p.Dst.CloseConns()
	p.fmu.Lock()
	if ch := p.frozen[Destination]; ch != nil {
		close(ch)
		p.frozen[Destination] = nil
	}
	p.fmu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dstExitPending = false
	m := &p.mig
	m.dstDead, m.listening, m.sockAddr, m.dstStatus = false, false, nil, qmp.StatusNone
	m.dstHeld, m.continued, m.wantPost, m.lateCancel, m.errDesc = false, false, false, false, ""
	q := p.Dst
	q.run, q.params, q.objects, q.stops = p.opt.DstRunState, defaultParams(), map[string]map[string]any{}, 0
	for c := range q.caps {
		q.caps[c] = false
	}
	if q.block != nil {
		q.block = newBlockLayer(p.opt.DstDisks)
	}
}

// DstGone reports whether the destination QEMU exited.
func (p *Pair) DstGone() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.mig.dstDead }

// SrcRunState returns the source's run state.
func (p *Pair) SrcRunState() string { return p.Src.RunState() }

// DstRunState returns the destination's run state.
func (p *Pair) DstRunState() string { return p.Dst.RunState() }

// Caps returns a copy of one side's migration capabilities.
func (p *Pair) Caps(s Side) map[string]bool { return p.QEMU(s).Caps() }

// Param returns one side's migration parameter (uint64, int, bool or
// string, as QEMU's schema types it).
func (p *Pair) Param(s Side, name string) any { return p.QEMU(s).Param(name) }

// Objects returns the object-add arguments of one side's objects, by id.
func (p *Pair) Objects(s Side) map[string]map[string]any { return p.QEMU(s).Objects() }

// Stops counts the stop commands one side received.
func (p *Pair) Stops(s Side) int { return p.QEMU(s).Stops() }

// Side tells which side q is.
func (q *QEMU) Side() Side { return q.side }

// RunState returns q's run state ("running", "paused", "inmigrate", ...).
func (q *QEMU) RunState() string { q.p.mu.Lock(); defer q.p.mu.Unlock(); return q.run }

// Caps returns a copy of q's migration capabilities.
func (q *QEMU) Caps() map[string]bool {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	out := map[string]bool{}
	for k, v := range q.caps {
		out[k] = v
	}
	return out
}

// Param returns one migration parameter of q.
func (q *QEMU) Param(name string) any {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	return q.params[name]
}

// Objects returns the object-add arguments of q's objects, by id.
func (q *QEMU) Objects() map[string]map[string]any {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	out := map[string]map[string]any{}
	for id, o := range q.objects {
		out[id] = o
	}
	return out
}

// Stops counts the stop commands q received.
func (q *QEMU) Stops() int { q.p.mu.Lock(); defer q.p.mu.Unlock(); return q.stops }

// handle registers a model handler: it waits while q is frozen, then runs
// under the pair's lock.
func (q *QEMU) handle(name string, f qmptest.HandlerFunc) {
	q.Server.Handle(name, func(args json.RawMessage) (any, error) {
		q.p.gate(q.side)
		q.p.mu.Lock()
		defer q.p.mu.Unlock()
		return f(args)
	})
}

// errGeneric is QEMU's GenericError with desc.
func errGeneric(desc string) error { return &qmp.Error{Class: "GenericError", Desc: desc} }
