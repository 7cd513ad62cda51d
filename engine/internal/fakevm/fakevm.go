package fakevm

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// Options shape the simulated pair. Zero values take the defaults shown.
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
	Tick           time.Duration // 10 ms
	DstAutostart   bool          // destination started without -S: runs by itself after completion
	DstNotDeferred bool          // destination started with -incoming URI: already listening
	DstRunState    string        // "inmigrate"
	SrcRunState    string        // "running"
	// PostcopyRate is the throughput in postcopy (default Throughput).
	PostcopyRate float64
	// FailWith makes the migration fail in setup with this error-desc while
	// the destination stays up (exit-on-error false).
	FailWith string
	// Disk > 0 gives both sides a raw disk "disk0" of that many bytes and
	// the block layer blockmirror needs (block.go); block-job-change from 8.2.
	Disk          uint64
	MirrorRate    float64 // bytes/s a mirror copies (100 MiB/s; a blockdev-mirror speed lowers it)
	DiskWriteRate float64 // bytes/s the running guest dirties the disk, 0
	// LateCancel is how a migrate_cancel received during the stop-and-copy
	// (status device) ends. Real QEMU carries it out only once the device
	// state is written (the migration thread holds the big lock), so the
	// destination may have the whole stream. "" cuts the stream at once:
	// cancelled, source resumed, destination exits.
	LateCancel LateCancel
	// DstFailsLoad makes the destination fail loading the end of the
	// stream and exit, after the source completed.
	DstFailsLoad bool
	// RefuseObject makes object-add fail with this error text on the
	// side given by RefuseObjectSide (0 source, 1 destination), as QEMU
	// refuses TLS credentials whose files are missing.
	RefuseObject     string
	RefuseObjectSide int
}

// LateCancel is an ending of a migrate_cancel that lands during the
// stop-and-copy, after the whole stream was written.
type LateCancel string

// The endings QEMU 7.2 and 10.0 can give (see engine/rollback.go).
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
		o.Machine = "pc-q35-10.0"
	}
	if o.DstMachine == "" {
		o.DstMachine = o.Machine
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
}

// Pair is a simulated source and destination.
type Pair struct {
	Src, Dst *qmptest.Server
	opt      Options

	mu               sync.Mutex
	side             [2]*vm // 0 src, 1 dst
	status           qmp.MigrationStatus
	dstStatus        qmp.MigrationStatus
	listening        bool
	sockAddr         []qmp.SocketAddress
	iter             uint64
	passLeft         float64 // bytes left in this pass
	dirtyNext        float64 // bytes dirtied since the pass started
	sent             float64
	started          time.Time
	stopAt           time.Time
	downtime         time.Duration
	throttle         int
	wantPost         bool
	continued        bool
	wasRunning       bool
	runningAtStop    bool
	errDesc          string
	dstDead          bool
	cancelInPostcopy int
	dirtyCalcs       []json.RawMessage // calc-dirty-rate arguments received (source)
	dirtyQueries     int               // query-dirty-rate since the last calc-dirty-rate
	dirtyPeriod      time.Duration     // the last calc-dirty-rate's period
	lateCancel       bool              // migrate_cancel received in device status, with Options.LateCancel
	dstHeld          bool              // stop on the destination in inmigrate: autostart off
	stops            [2]int
	stopSim          chan struct{}
	simDone          chan struct{}
	log              []string
	block            blockState

	fmu            sync.Mutex
	frozen         [2]chan struct{} // non-nil while a side is frozen (Freeze); closed by Thaw
	dstExitPending bool             // the destination exits once thawed (mu)
}

type vm struct {
	srv     *qmptest.Server
	run     string
	caps    map[string]bool
	params  map[string]any
	objects map[string]map[string]any // object-add arguments by id
}

func capNames() []string {
	return []string{"xbzrle", "auto-converge", "events", "postcopy-ram", "return-path",
		"pause-before-switchover", "multifd", "late-block-activate", "validate-uuid", "postcopy-preempt"}
}

// New starts a simulated pair. Close it when done.
func New(opt Options) *Pair {
	opt.defaults()
	v, dv := opt.Version, opt.DstVersion
	p := &Pair{
		Src:       qmptest.NewServer(qmptest.WithVersion(v[0], v[1], v[2])),
		Dst:       qmptest.NewServer(qmptest.WithVersion(dv[0], dv[1], dv[2])),
		opt:       opt,
		status:    qmp.StatusNone,
		dstStatus: qmp.StatusNone,
	}
	for i, srv := range []*qmptest.Server{p.Src, p.Dst} {
		m := &vm{srv: srv, caps: map[string]bool{}, objects: map[string]map[string]any{}, params: map[string]any{
			"max-bandwidth": uint64(134217728), "downtime-limit": uint64(300), "multifd-channels": 2,
			"cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
			"throttle-trigger-threshold": 50, "cpu-throttle-tailslow": false,
			"tls-creds": "", "tls-hostname": "", "tls-authz": "",
		}}
		for _, c := range capNames() {
			m.caps[c] = false
		}
		p.side[i] = m
		p.install(i)
		if opt.Disk > 0 {
			p.installBlock(i)
		}
	}
	p.side[0].run = opt.SrcRunState
	p.side[1].run = opt.DstRunState
	if opt.DstNotDeferred {
		p.listening = true
		p.sockAddr = []qmp.SocketAddress{{Type: "inet", Host: "127.0.0.1", Port: "4444"}}
		p.dstStatus = qmp.StatusSetup
	}
	return p
}

// Freeze stops one side's QEMU as SIGSTOP does (0 source, 1 destination):
// its monitor answers nothing (commands wait, and are answered once it is
// thawed) and the migration stream stalls. A frozen source does nothing at
// all (the model does not advance, no events); with a frozen destination
// the source goes on (a cancel is carried out) and a destination that
// should exit does so when thawed. Handlers a test installed with Handle
// are not held.
func (p *Pair) Freeze(side int) {
	p.fmu.Lock()
	defer p.fmu.Unlock()
	if p.frozen[side] == nil {
		p.frozen[side] = make(chan struct{})
	}
}

// Thaw resumes a side stopped by Freeze (SIGCONT).
func (p *Pair) Thaw(side int) {
	p.fmu.Lock()
	if ch := p.frozen[side]; ch != nil {
		close(ch)
		p.frozen[side] = nil
	}
	p.fmu.Unlock()
	if side == 1 {
		p.mu.Lock()
		if p.dstExitPending {
			p.dstExitPending = false
			p.dstExit()
		}
		p.mu.Unlock()
	}
}

func (p *Pair) isFrozen(side int) bool {
	p.fmu.Lock()
	defer p.fmu.Unlock()
	return p.frozen[side] != nil
}

// gate waits while side is frozen.
func (p *Pair) gate(side int) {
	p.fmu.Lock()
	ch := p.frozen[side]
	p.fmu.Unlock()
	if ch != nil {
		<-ch
	}
}

// Close stops the simulation and both servers (thawing both sides first).
func (p *Pair) Close() {
	p.Thaw(0)
	p.Thaw(1)
	p.mu.Lock()
	stop, done := p.stopSim, p.simDone
	p.stopSim = nil
	p.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
	p.Src.Close()
	p.Dst.Close()
}

// KillDst makes the destination QEMU exit: its connections close and the
// source's migration fails on the next tick.
func (p *Pair) KillDst() {
	p.mu.Lock()
	p.dstDead = true
	p.mu.Unlock()
	p.Dst.CloseConns()
}

// SrcRunState returns the source's run state.
func (p *Pair) SrcRunState() string { p.mu.Lock(); defer p.mu.Unlock(); return p.side[0].run }

// DstRunState returns the destination's run state.
func (p *Pair) DstRunState() string { p.mu.Lock(); defer p.mu.Unlock(); return p.side[1].run }

// Status returns the source's migration status.
func (p *Pair) Status() qmp.MigrationStatus { p.mu.Lock(); defer p.mu.Unlock(); return p.status }

// Caps returns a copy of one side's capabilities (0 source, 1 destination).
func (p *Pair) Caps(side int) map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]bool{}
	for k, v := range p.side[side].caps {
		out[k] = v
	}
	return out
}

// Param returns one side's parameter value.
func (p *Pair) Param(side int, name string) any {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.side[side].params[name]
}

// tlsMismatch is the error-desc of a TLS handshake that cannot work: a
// side whose tls-creds names no object of its own with the right endpoint,
// or one side with TLS and the other without ("" when they match).
func (p *Pair) tlsMismatch() string {
	var creds [2]string
	for i, end := range []string{"client", "server"} {
		m := p.side[i]
		creds[i], _ = m.params["tls-creds"].(string)
		if creds[i] == "" {
			continue
		}
		o, ok := m.objects[creds[i]]
		if !ok {
			return fmt.Sprintf("No TLS credentials with id '%s'", creds[i])
		}
		if o["endpoint"] != end {
			return fmt.Sprintf("Expecting TLS credentials with a %s endpoint", end)
		}
	}
	if (creds[0] == "") != (creds[1] == "") {
		return "Unable to read from socket: Connection reset by peer"
	}
	return ""
}

// Objects returns the object-add arguments of one side's objects, by id.
func (p *Pair) Objects(side int) map[string]map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]map[string]any{}
	for id, o := range p.side[side].objects {
		out[id] = o
	}
	return out
}

// CancelsInPostcopy counts migrate_cancel received during postcopy.
func (p *Pair) CancelsInPostcopy() int { p.mu.Lock(); defer p.mu.Unlock(); return p.cancelInPostcopy }

// SetDirtyRate changes the source's dirty rate.
func (p *Pair) SetDirtyRate(r float64) { p.mu.Lock(); p.opt.DirtyRate = r; p.mu.Unlock() }

// SetThroughput changes the link's throughput (0 stalls the migration).
func (p *Pair) SetThroughput(r float64) {
	p.mu.Lock()
	p.opt.Throughput, p.opt.PostcopyRate = r, r
	p.mu.Unlock()
}

func errGeneric(desc string) error { return &qmp.Error{Class: "GenericError", Desc: desc} }

func (p *Pair) install(i int) {
	m := p.side[i]
	srv := m.srv
	isSrc := i == 0
	h := func(name string, f func(args json.RawMessage) (any, error)) {
		srv.Handle(name, func(args json.RawMessage) (any, error) {
			p.gate(i)
			p.mu.Lock()
			defer p.mu.Unlock()
			return f(args)
		})
	}
	h("query-status", func(json.RawMessage) (any, error) {
		return map[string]any{"running": m.run == "running", "singlestep": false, "status": m.run}, nil
	})
	h("query-qmp-schema", func(json.RawMessage) (any, error) { return p.schema(i), nil })
	h("query-memory-size-summary", func(json.RawMessage) (any, error) {
		ram := p.opt.RAM
		if !isSrc {
			ram = p.opt.DstRAM
		}
		return map[string]any{"base-memory": ram}, nil
	})
	h("qom-get", func(json.RawMessage) (any, error) {
		if isSrc {
			return p.opt.Machine, nil
		}
		return p.opt.DstMachine, nil
	})
	h("query-uuid", func(json.RawMessage) (any, error) {
		u := p.opt.SrcUUID
		if !isSrc {
			u = p.opt.DstUUID
		}
		if u == "" {
			u = "00000000-0000-0000-0000-000000000000"
		}
		return map[string]any{"UUID": u}, nil
	})
	h("query-migrate-capabilities", func(json.RawMessage) (any, error) {
		var out []map[string]any
		for _, c := range capNames() {
			out = append(out, map[string]any{"capability": c, "state": m.caps[c]})
		}
		return out, nil
	})
	h("migrate-set-capabilities", func(args json.RawMessage) (any, error) {
		var a struct {
			Capabilities []qmp.MigrationCapabilityStatus `json:"capabilities"`
		}
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		if isSrc && p.active() {
			return nil, errGeneric("There's a migration process in progress")
		}
		for _, c := range a.Capabilities {
			if _, ok := m.caps[c.Capability]; !ok {
				return nil, errGeneric(fmt.Sprintf("Parameter 'capability' does not accept value '%s'", c.Capability))
			}
		}
		for _, c := range a.Capabilities {
			m.caps[c.Capability] = c.State
		}
		return nil, nil
	})
	h("query-migrate-parameters", func(json.RawMessage) (any, error) { return m.params, nil })
	h("object-add", func(args json.RawMessage) (any, error) {
		var a map[string]any
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		id, _ := a["id"].(string)
		if _, dup := m.objects[id]; dup {
			return nil, errGeneric(fmt.Sprintf("attempt to add duplicate property '%s' to object (type 'container')", id))
		}
		if p.opt.RefuseObject != "" && p.opt.RefuseObjectSide == i {
			return nil, errGeneric(p.opt.RefuseObject)
		}
		m.objects[id] = a
		return nil, nil
	})
	h("object-del", func(args json.RawMessage) (any, error) {
		var a struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		if _, ok := m.objects[a.ID]; !ok {
			return nil, errGeneric(fmt.Sprintf("object '%s' not found", a.ID))
		}
		delete(m.objects, a.ID)
		return nil, nil
	})
	h("migrate-set-parameters", func(args json.RawMessage) (any, error) {
		var a map[string]json.RawMessage
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		for k, raw := range a {
			cur, ok := m.params[k]
			if !ok {
				return nil, errGeneric("Invalid parameter '" + k + "'")
			}
			switch cur.(type) {
			case uint64:
				var v uint64
				if err := json.Unmarshal(raw, &v); err != nil {
					return nil, errGeneric("Parameter '" + k + "' expects uint64")
				}
				if k == "downtime-limit" && v > 2000000 {
					return nil, errGeneric("Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms")
				}
				m.params[k] = v
			case int:
				var v int
				if err := json.Unmarshal(raw, &v); err != nil {
					return nil, errGeneric("Parameter '" + k + "' expects int")
				}
				m.params[k] = v
			case bool:
				var v bool
				if err := json.Unmarshal(raw, &v); err != nil {
					return nil, errGeneric("Parameter '" + k + "' expects bool")
				}
				m.params[k] = v
			case string:
				var v string
				if err := json.Unmarshal(raw, &v); err != nil {
					return nil, errGeneric("Parameter '" + k + "' expects string")
				}
				m.params[k] = v
			}
		}
		return nil, nil
	})
	h("stop", func(json.RawMessage) (any, error) {
		p.stops[i]++
		if m.run == "inmigrate" {
			p.dstHeld = true // QEMU's qmp_stop: autostart off
		}
		if m.run == "running" {
			m.run = "paused"
			srv.Emit("STOP", nil)
			if isSrc && p.stopAt.IsZero() && p.active() {
				p.stopAt = time.Now()
			}
		}
		return nil, nil
	})
	h("cont", func(json.RawMessage) (any, error) {
		switch m.run {
		case "inmigrate":
			return nil, errGeneric("Guest is waiting for an incoming migration")
		case "running":
			return nil, nil
		case "finish-migrate":
			return nil, errGeneric("Migration is not finalized yet")
		}
		if !isSrc && p.dstStatus != qmp.StatusCompleted {
			return nil, errGeneric("migration not completed")
		}
		m.run = "running"
		srv.Emit("RESUME", nil)
		return nil, nil
	})
	h("query-migrate", func(json.RawMessage) (any, error) {
		if isSrc {
			return p.srcInfo(), nil
		}
		out := map[string]any{}
		if p.dstStatus != qmp.StatusNone || p.opt.DstVersion[0] >= 8 {
			if p.dstStatus != qmp.StatusNone {
				out["status"] = p.dstStatus
			}
		}
		if p.listening && len(p.sockAddr) > 0 {
			out["socket-address"] = p.sockAddr
		}
		return out, nil
	})
	if isSrc {
		// calc-dirty-rate (page sampling) measures the source's DirtyRate,
		// counting distinct pages as QEMU does: at most the whole RAM (the
		// model's working set) within the period; "calc-time-unit" from
		// 8.2. As in QEMU the status reads
		// "unstarted" until the measuring thread runs (the first query
		// here), then "measuring" (the second), then "measured".
		h("calc-dirty-rate", qmptest.Args(func(args json.RawMessage) (any, error) {
			var a struct {
				CalcTime int    `json:"calc-time"`
				Unit     string `json:"calc-time-unit"`
			}
			if err := json.Unmarshal(args, &a); err != nil || a.CalcTime <= 0 {
				return nil, errGeneric("Invalid calc-time")
			}
			p.dirtyCalcs = append(p.dirtyCalcs, args)
			p.dirtyQueries = 0
			p.dirtyPeriod = time.Duration(a.CalcTime) * time.Second
			if a.Unit == "millisecond" {
				p.dirtyPeriod = time.Duration(a.CalcTime) * time.Millisecond
			}
			return nil, nil
		}, calcDirtyRateMembers(p.opt.Version)...))
		h("query-dirty-rate", func(json.RawMessage) (any, error) {
			p.dirtyQueries++
			if len(p.dirtyCalcs) == 0 || p.dirtyQueries <= 2 {
				st := "unstarted"
				if len(p.dirtyCalcs) > 0 && p.dirtyQueries == 2 {
					st = "measuring"
				}
				return map[string]any{"status": st, "calc-time": 0, "sample-pages": 0, "mode": "page-sampling", "start-time": 0}, nil
			}
			rate := min(p.opt.DirtyRate, float64(p.opt.RAM)/p.dirtyPeriod.Seconds())
			return map[string]any{"status": "measured", "dirty-rate": int64(rate / (1 << 20)),
				"calc-time": 1, "sample-pages": 4096, "mode": "page-sampling", "start-time": 1}, nil
		})
		h("migrate", qmptest.Args(p.migrate, migrateMembers(p.opt.Version)...))
		h("migrate_cancel", func(json.RawMessage) (any, error) {
			if p.status.Postcopy() {
				p.cancelInPostcopy++
				if p.opt.Version[0] >= 10 {
					return nil, errGeneric("Postcopy migration in progress, cannot cancel.")
				}
			}
			if p.status == qmp.StatusDevice && p.opt.LateCancel != "" {
				p.lateCancel = true
				return nil, nil
			}
			if p.active() {
				p.setStatus(qmp.StatusCancelling)
			}
			return nil, nil
		})
		h("migrate-continue", func(args json.RawMessage) (any, error) {
			var a struct {
				State string `json:"state"`
			}
			_ = json.Unmarshal(args, &a)
			if string(p.status) != a.State {
				return nil, errGeneric(fmt.Sprintf("Migration not in expected state: %s", p.status))
			}
			p.continued = true
			return nil, nil
		})
		h("migrate-start-postcopy", func(json.RawMessage) (any, error) {
			if !m.caps["postcopy-ram"] {
				return nil, errGeneric("Enable postcopy with migrate_set_capability before the start of migration")
			}
			if !p.active() {
				return nil, errGeneric("Postcopy must be started after migration has been started")
			}
			p.wantPost = true
			return nil, nil
		})
	} else {
		// yank of the migration instance shuts the incoming channel down:
		// the load fails and the destination exits (just after answering).
		h("yank", func(args json.RawMessage) (any, error) {
			var a struct {
				Instances []struct {
					Type string `json:"type"`
				} `json:"instances"`
			}
			if err := json.Unmarshal(args, &a); err != nil {
				return nil, err
			}
			for _, in := range a.Instances {
				if in.Type != "migration" {
					return nil, &qmp.Error{Class: "DeviceNotFound", Desc: "Instance '" + in.Type + "' not found"}
				}
				if !p.listening {
					return nil, &qmp.Error{Class: "DeviceNotFound", Desc: "Instance 'migration' not found"}
				}
			}
			if p.dstStatus != qmp.StatusCompleted {
				go func() {
					time.Sleep(time.Millisecond)
					p.mu.Lock()
					p.dstExit()
					p.mu.Unlock()
				}()
			}
			return nil, nil
		})
		h("migrate-incoming", qmptest.Args(func(args json.RawMessage) (any, error) {
			if m.run != "inmigrate" {
				return nil, errGeneric("'-incoming' was not specified on the command line")
			}
			if p.listening {
				return nil, errGeneric("The incoming migration has already been started")
			}
			var a qmp.MigrateIncomingArgs
			if err := json.Unmarshal(args, &a); err != nil {
				return nil, err
			}
			sa, err := p.parseChannel(a.URI, a.Channels)
			if err != nil {
				return nil, err
			}
			if sa.Type == "inet" && sa.Port == "0" {
				sa.Port = "45678"
			}
			p.listening = true
			p.sockAddr = []qmp.SocketAddress{sa}
			if p.opt.DstVersion[0] >= 10 {
				p.dstStatus = qmp.StatusSetup
			}
			if m.caps["events"] || p.opt.DstVersion[0] < 8 {
				srv.Emit("MIGRATION", map[string]any{"status": "setup"})
			}
			return nil, nil
		}, incomingMembers(p.opt.DstVersion)...))
	}
}

// migrateMembers are migrate's arguments in QEMU's schema for the
// simulated version ("*" optional): "uri" is mandatory before 8.2, where
// "channels" came; blk and inc went in 9.1. The handler is wrapped with
// qmptest.Args, so another form is refused with QEMU's own error.
func migrateMembers(v [3]int) []string {
	switch {
	case !hasChannels(v):
		return []string{"uri", "*blk", "*inc", "*detach", "*resume"}
	case !hasExitOnError(v):
		return []string{"*uri", "*channels", "*blk", "*inc", "*detach", "*resume"}
	}
	return []string{"*uri", "*channels", "*detach", "*resume"}
}

// incomingMembers are migrate-incoming's arguments: "uri" alone before 8.2,
// "channels" from 8.2, "exit-on-error" from 9.1.
func incomingMembers(v [3]int) []string {
	switch {
	case !hasChannels(v):
		return []string{"uri"}
	case !hasExitOnError(v):
		return []string{"*uri", "*channels"}
	}
	return []string{"*uri", "*channels", "*exit-on-error"}
}

func (p *Pair) parseChannel(uri string, chans []qmp.MigrationChannel) (qmp.SocketAddress, error) {
	if (uri == "") == (len(chans) == 0) {
		return qmp.SocketAddress{}, errGeneric("need either 'uri' or 'channels' argument")
	}
	if len(chans) > 0 {
		return chans[0].Addr.SocketAddress, nil
	}
	switch {
	case len(uri) > 5 && uri[:5] == "unix:":
		return qmp.SocketAddress{Type: "unix", Path: uri[5:]}, nil
	case len(uri) > 4 && uri[:4] == "tcp:":
		rest := uri[4:]
		for i := len(rest) - 1; i >= 0; i-- {
			if rest[i] == ':' {
				host := rest[:i]
				if len(host) > 1 && host[0] == '[' {
					host = host[1 : len(host)-1]
				}
				return qmp.SocketAddress{Type: "inet", Host: host, Port: rest[i+1:]}, nil
			}
		}
	}
	return qmp.SocketAddress{}, errGeneric("unknown migration protocol: " + uri)
}

// calcDirtyRateMembers are calc-dirty-rate's arguments: "calc-time-unit"
// from 8.2.
func calcDirtyRateMembers(v [3]int) []string {
	m := []string{"calc-time", "*sample-pages", "*mode"}
	if hasChannels(v) {
		m = append(m, "*calc-time-unit")
	}
	return m
}

// DirtyRateCalcs returns the arguments of every calc-dirty-rate received.
func (p *Pair) DirtyRateCalcs() []json.RawMessage {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]json.RawMessage(nil), p.dirtyCalcs...)
}

func hasChannels(v [3]int) bool {
	return v[0] > 8 || (v[0] == 8 && v[1] >= 2)
}

func hasExitOnError(v [3]int) bool {
	return v[0] > 9 || (v[0] == 9 && v[1] >= 1)
}

func (p *Pair) active() bool {
	return p.status != qmp.StatusNone && !p.status.Terminal()
}

func (p *Pair) setStatus(s qmp.MigrationStatus) {
	p.status = s
	if p.side[0].caps["events"] {
		p.Src.Emit("MIGRATION", map[string]any{"status": s})
	}
}

func (p *Pair) setDstStatus(s qmp.MigrationStatus) {
	p.dstStatus = s
	if p.side[1].caps["events"] && !p.dstDead {
		p.Dst.Emit("MIGRATION", map[string]any{"status": s})
	}
}

func (p *Pair) migrate(args json.RawMessage) (any, error) {
	src := p.side[0]
	if src.run == "inmigrate" {
		return nil, errGeneric("Guest is waiting for an incoming migration")
	}
	if src.run == "postmigrate" {
		return nil, errGeneric("Can't migrate the vm that was paused due to previous migration")
	}
	if p.active() {
		return nil, errGeneric("There's a migration process in progress")
	}
	var a qmp.MigrateArgs
	if err := json.Unmarshal(args, &a); err != nil {
		return nil, err
	}
	sa, err := p.parseChannel(a.URI, a.Channels)
	if err != nil {
		return nil, err
	}
	p.setStatus(qmp.StatusSetup)
	p.started = time.Now()
	p.iter, p.sent, p.dirtyNext, p.throttle = 0, 0, 0, 0
	p.passLeft = float64(p.opt.RAM)
	p.stopAt = time.Time{}
	p.wasRunning = src.run == "running"
	ok := p.listening && !p.dstDead && len(p.sockAddr) > 0 && sameAddr(p.sockAddr[0], sa)
	if !ok {
		p.errDesc = "Failed to connect to '" + addrString(sa) + "': Connection refused"
	}
	if mf := src.caps["multifd"]; mf != p.side[1].caps["multifd"] ||
		(mf && p.opt.SrcUUID != p.opt.DstUUID) {
		p.errDesc = "multifd: received uuid mismatch or multifd setting differs"
	}
	p.stopSim = make(chan struct{})
	p.simDone = make(chan struct{})
	go p.sim(p.stopSim, p.simDone)
	return nil, nil
}

func sameAddr(a, b qmp.SocketAddress) bool {
	return a.Type == b.Type && a.Path == b.Path && a.Port == b.Port
}

func addrString(sa qmp.SocketAddress) string {
	if sa.Type == "unix" {
		return sa.Path
	}
	return sa.Host + ":" + sa.Port
}

func (p *Pair) param(side int, name string) uint64 {
	switch v := p.side[side].params[name].(type) {
	case uint64:
		return v
	case int:
		return uint64(v)
	}
	return 0
}

func (p *Pair) rate() float64 {
	if p.isFrozen(1) {
		return 0 // a stopped destination reads nothing
	}
	r := p.opt.Throughput
	if p.status.Postcopy() {
		r = p.opt.PostcopyRate
	}
	if bw := float64(p.param(0, "max-bandwidth")); bw > 0 && bw < r {
		r = bw
	}
	return r
}

func (p *Pair) dirty() float64 {
	if p.side[0].run != "running" {
		return 0
	}
	return p.opt.DirtyRate * float64(100-p.throttle) / 100
}

func (p *Pair) srcInfo() map[string]any {
	out := map[string]any{}
	if p.status == qmp.StatusNone {
		return out
	}
	out["status"] = p.status
	rem := uint64(p.passLeft)
	out["ram"] = map[string]any{
		"transferred": uint64(p.sent), "remaining": rem, "total": p.opt.RAM,
		"dirty-pages-rate": uint64(p.dirty() / 4096), "page-size": 4096,
		"mbps": p.rate() * 8 / 1e6, "dirty-sync-count": p.iter,
	}
	out["total-time"] = time.Since(p.started).Milliseconds()
	if p.status == qmp.StatusActive && p.rate() > 0 {
		out["expected-downtime"] = int64(float64(rem) / p.rate() * 1000)
	}
	if p.throttle > 0 {
		out["cpu-throttle-percentage"] = p.throttle
	}
	if p.status == qmp.StatusCompleted {
		out["downtime"] = p.downtime.Milliseconds()
	}
	if p.status == qmp.StatusFailed {
		out["error-desc"] = p.errDesc
	}
	return out
}

func (p *Pair) sim(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(p.opt.Tick)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if p.isFrozen(0) {
			continue // a stopped source does nothing
		}
		p.mu.Lock()
		end := p.step(p.opt.Tick.Seconds())
		p.mu.Unlock()
		if end {
			return
		}
	}
}

func (p *Pair) pass() {
	p.iter++
	if p.side[0].caps["events"] {
		p.Src.Emit("MIGRATION_PASS", map[string]any{"pass": p.iter})
	}
}

// switchover stops the source (QEMU's migration_completion).
func (p *Pair) switchover() {
	src := p.side[0]
	p.runningAtStop = src.run == "running"
	if src.run == "running" {
		src.run = "finish-migrate"
		p.Src.Emit("STOP", nil)
	} else if src.run == "paused" {
		src.run = "finish-migrate"
	}
	if p.stopAt.IsZero() {
		p.stopAt = time.Now()
	}
}

// step advances the model by dt seconds; true ends the simulation.
func (p *Pair) step(dt float64) bool {
	src, dst := p.side[0], p.side[1]
	fail := func(desc string) bool {
		p.errDesc = desc
		p.setStatus(qmp.StatusFailed)
		if src.run == "finish-migrate" && p.runningAtStop {
			src.run = "running"
			p.Src.Emit("RESUME", nil)
		}
		return true
	}
	switch p.status {
	case qmp.StatusCancelling:
		p.setStatus(qmp.StatusCancelled)
		if src.run == "finish-migrate" {
			if p.runningAtStop {
				src.run = "running"
				p.Src.Emit("RESUME", nil)
			} else {
				src.run = "postmigrate"
			}
		}
		p.dstExit()
		return true
	case qmp.StatusSetup:
		if p.opt.FailWith != "" {
			return fail(p.opt.FailWith)
		}
		if desc := p.tlsMismatch(); desc != "" {
			p.dstExit()
			return fail(desc)
		}
		if p.errDesc != "" {
			p.dstExit()
			return fail(p.errDesc)
		}
		p.setStatus(qmp.StatusActive)
		p.setDstStatus(qmp.StatusActive)
		p.pass()
		return false
	}
	if p.dstDead {
		return fail("Unable to write to socket: Broken pipe")
	}
	switch {
	case p.status == qmp.StatusPreSwitchover:
		if p.continued {
			p.setStatus(qmp.StatusDevice)
		}
		return false
	case p.status == qmp.StatusDevice || p.status.Postcopy():
		send := p.rate() * dt
		p.sent += min(send, p.passLeft)
		p.passLeft = max(0, p.passLeft-send)
		if p.passLeft > 0 {
			return false
		}
		if !p.status.Postcopy() {
			p.downtime = time.Since(p.stopAt)
		} else {
			p.downtime = 0
		}
		p.pass()
		if p.lateCancel && p.opt.LateCancel != LateCancelCompletes {
			p.setStatus(qmp.StatusCancelled)
			if p.opt.LateCancel == LateCancelResumes && p.runningAtStop {
				src.run = "running"
				p.Src.Emit("RESUME", nil)
			} else {
				src.run = "postmigrate"
			}
			if p.opt.LateCancel == LateCancelPostmigrateDstFails {
				p.dstExit()
			} else {
				p.dstComplete()
			}
			return true
		}
		src.run = "postmigrate"
		p.setStatus(qmp.StatusCompleted)
		if p.opt.DstFailsLoad {
			p.dstExit()
			return true
		}
		p.dstComplete()
		return true
	}
	// active
	if p.wantPost {
		p.wantPost = false
		p.switchover()
		p.passLeft += p.dirtyNext
		p.dirtyNext = 0
		p.setStatus(qmp.StatusPostcopyActive)
		p.setDstStatus(qmp.StatusPostcopyActive)
		dst.run = "running"
		p.Dst.Emit("RESUME", nil)
		return false
	}
	send := p.rate() * dt
	p.sent += min(send, p.passLeft)
	p.passLeft = max(0, p.passLeft-send)
	p.dirtyNext = min(p.dirtyNext+p.dirty()*dt, float64(p.opt.RAM))
	if p.passLeft > 0 || p.rate() == 0 {
		return false
	}
	// End of pass: sync the dirty bitmap.
	p.passLeft, p.dirtyNext = p.dirtyNext, 0
	p.pass()
	limit := time.Duration(p.param(0, "downtime-limit")) * time.Millisecond
	if time.Duration(p.passLeft/p.rate()*float64(time.Second)) <= limit || p.passLeft == 0 {
		p.switchover()
		if src.caps["pause-before-switchover"] {
			p.setStatus(qmp.StatusPreSwitchover)
			return false
		}
		p.setStatus(qmp.StatusDevice)
		return false
	}
	if src.caps["auto-converge"] && p.iter >= 2 && p.dirty() > p.rate()*float64(p.param(0, "throttle-trigger-threshold"))/100 {
		if p.throttle == 0 {
			p.throttle = int(p.param(0, "cpu-throttle-initial"))
		} else {
			p.throttle = min(p.throttle+int(p.param(0, "cpu-throttle-increment")), int(p.param(0, "max-cpu-throttle")))
		}
	}
	return false
}

// dstComplete is the destination completing its incoming migration: it
// starts the guest by itself with DstAutostart unless stop turned that off.
func (p *Pair) dstComplete() {
	dst := p.side[1]
	p.setDstStatus(qmp.StatusCompleted)
	if dst.run == "inmigrate" {
		if p.opt.DstAutostart && !p.dstHeld {
			dst.run = "running"
			p.Dst.Emit("RESUME", nil)
		} else {
			dst.run = "paused"
		}
	}
}

// Stops counts the stop commands one side received (0 source, 1
// destination).
func (p *Pair) Stops(side int) int { p.mu.Lock(); defer p.mu.Unlock(); return p.stops[side] }

// DstStatus returns the destination's incoming migration status.
func (p *Pair) DstStatus() qmp.MigrationStatus { p.mu.Lock(); defer p.mu.Unlock(); return p.dstStatus }

// DstGone reports whether the destination QEMU exited.
func (p *Pair) DstGone() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.dstDead }

// dstExit is the destination QEMU exiting after a failed incoming migration
// (exit-on-error default).
func (p *Pair) dstExit() {
	if p.dstDead || !p.listening {
		return
	}
	if p.isFrozen(1) {
		p.dstExitPending = true // it exits once it runs again
		return
	}
	p.dstDead = true
	go p.Dst.CloseConns()
}

// schema builds a minimal query-qmp-schema of one side for
// qmp.FeaturesFromSchema.
func (p *Pair) schema(side int) []map[string]any {
	v := p.opt.Version
	if side == 1 {
		v = p.opt.DstVersion
	}
	caps := []string{}
	caps = append(caps, capNames()...)
	statuses := []string{"none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
		"postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug"}
	members := func(names ...string) []map[string]any {
		var out []map[string]any
		for _, n := range names {
			out = append(out, map[string]any{"name": n, "type": "str"})
		}
		return out
	}
	var migrateArgs, incomingArgs []string
	for _, m := range migrateMembers(v) {
		migrateArgs = append(migrateArgs, strings.TrimPrefix(m, "*"))
	}
	for _, m := range incomingMembers(v) {
		incomingArgs = append(incomingArgs, strings.TrimPrefix(m, "*"))
	}
	var params []string
	for k := range p.side[0].params {
		params = append(params, k)
	}
	cmds := []string{"query-status", "query-migrate", "migrate-set-capabilities", "migrate-set-parameters",
		"query-migrate-capabilities", "query-migrate-parameters", "migrate", "migrate-incoming", "migrate_cancel",
		"migrate-continue", "migrate-start-postcopy", "stop", "cont", "query-uuid", "qom-get", "query-memory-size-summary",
		"object-add", "object-del"}
	cmds = append(cmds, p.blockCommands()...)
	out := []map[string]any{
		{"name": "migrate-set-capabilities", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
		{"name": "0", "meta-type": "object", "members": []map[string]any{{"name": "capabilities", "type": "[2]"}}},
		{"name": "[2]", "meta-type": "array", "element-type": "2"},
		{"name": "2", "meta-type": "object", "members": []map[string]any{{"name": "capability", "type": "3"}, {"name": "state", "type": "bool"}}},
		{"name": "3", "meta-type": "enum", "values": caps},
		{"name": "migrate-set-parameters", "meta-type": "command", "arg-type": "4", "ret-type": "1"},
		{"name": "4", "meta-type": "object", "members": members(params...)},
		{"name": "query-migrate", "meta-type": "command", "arg-type": "1", "ret-type": "5"},
		{"name": "5", "meta-type": "object", "members": []map[string]any{{"name": "status", "type": "6"}}},
		{"name": "6", "meta-type": "enum", "values": statuses},
		{"name": "migrate", "meta-type": "command", "arg-type": "7", "ret-type": "1"},
		{"name": "7", "meta-type": "object", "members": members(migrateArgs...)},
		{"name": "migrate-incoming", "meta-type": "command", "arg-type": "8", "ret-type": "1"},
		{"name": "8", "meta-type": "object", "members": members(incomingArgs...)},
		{"name": "1", "meta-type": "object", "members": []map[string]any{}},
	}
	for _, c := range cmds {
		switch c {
		case "migrate-set-capabilities", "migrate-set-parameters", "query-migrate", "migrate", "migrate-incoming":
			continue
		}
		out = append(out, map[string]any{"name": c, "meta-type": "command", "arg-type": "1", "ret-type": "1"})
	}
	for _, e := range []string{"MIGRATION", "MIGRATION_PASS", "STOP", "RESUME"} {
		out = append(out, map[string]any{"name": e, "meta-type": "event", "arg-type": "1"})
	}
	return out
}

// Port is the port the simulated destination picks for tcp port 0.
const Port = 45678
