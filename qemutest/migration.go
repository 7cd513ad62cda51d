package qemutest

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// The migration's commands and statuses: migrate (source) and
// migrate-incoming (destination) with the arguments of the simulated
// version's schema, refused otherwise with QEMU's own error (qmptest.Args);
// query-migrate on both sides (the source's with Options.Blockers as
// blocked-reasons, and migrate refused for them; a VFIO device fails the
// migration in setup when postcopy-ram is on); migrate_cancel, migrate-continue,
// migrate-start-postcopy; yank of the destination's migration instance; the
// MIGRATION events. The RAM model that moves the migration on is in ram.go.

// migration is the state of the migration between the two sides (Pair.mu).
type migration struct {
	status           qmp.MigrationStatus // source
	dstStatus        qmp.MigrationStatus // destination's incoming migration
	listening        bool                // migrate-incoming ran (or -incoming URI)
	sockAddr         []qmp.SocketAddress // where the destination listens
	errDesc          string              // the failure query-migrate reports
	dstDead          bool                // the destination QEMU exited
	cancelInPostcopy int                 // migrate_cancel received in postcopy
	lateCancel       bool                // migrate_cancel received in device status, with Options.LateCancel
	dstHeld          bool                // stop on the destination in inmigrate: autostart off
	continued        bool                // migrate-continue received
	wantPost         bool                // migrate-start-postcopy received
}

// Status returns the source's migration status.
func (p *Pair) Status() qmp.MigrationStatus { p.mu.Lock(); defer p.mu.Unlock(); return p.mig.status }

// DstStatus returns the destination's incoming migration status.
func (p *Pair) DstStatus() qmp.MigrationStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mig.dstStatus
}

// CancelsInPostcopy counts migrate_cancel received during postcopy.
func (p *Pair) CancelsInPostcopy() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mig.cancelInPostcopy
}

func (q *QEMU) installMigration() {
	v := q.p.version(q.side)
	q.handle("query-migrate", q.queryMigrate)
	if q.side == Source {
		q.handle("migrate", qmptest.Args(q.p.migrate, migrateMembers(v)...))
		q.handle("migrate_cancel", q.p.cancel)
		q.handle("migrate-continue", q.p.continueMigration)
		q.handle("migrate-start-postcopy", q.p.startPostcopy)
		q.handle("calc-dirty-rate", qmptest.Args(q.p.calcDirtyRate, calcDirtyRateMembers(v)...))
		q.handle("query-dirty-rate", q.p.queryDirtyRate)
		return
	}
	q.handle("migrate-incoming", qmptest.Args(q.p.migrateIncoming, incomingMembers(v)...))
	q.handle("yank", q.p.yank)
	q.handle("query-yank", q.p.queryYank)
}

// queryYank lists the yank instances: the monitor's chardev, and the
// migration while the destination listens or loads. Real QEMU runs it out
// of band too (its monitor thread): a destination whose main thread is
// blocked answers it, a frozen one does not.
func (p *Pair) queryYank(json.RawMessage) (any, error) {
	out := []map[string]any{{"type": "chardev", "id": "monitor"}}
	if p.mig.listening && !p.mig.dstStatus.Terminal() {
		out = append(out, map[string]any{"type": "migration"})
	}
	return out, nil
}

func (q *QEMU) queryMigrate(json.RawMessage) (any, error) {
	p := q.p
	if q.side == Source {
		return p.srcInfo(), nil
	}
	out := map[string]any{}
	if p.mig.dstStatus != qmp.StatusNone {
		out["status"] = p.mig.dstStatus
	}
	if p.mig.listening && len(p.mig.sockAddr) > 0 {
		out["socket-address"] = p.mig.sockAddr
	}
	return out, nil
}

func (p *Pair) migrate(args json.RawMessage) (any, error) {
	src := p.Src
	if src.run == "inmigrate" {
		return nil, errGeneric("Guest is waiting for an incoming migration")
	}
	if src.run == "postmigrate" {
		return nil, errGeneric("Can't migrate the vm that was paused due to previous migration")
	}
	var resume struct {
		Resume bool `json:"resume"`
	}
	_ = json.Unmarshal(args, &resume)
	if p.active() && !resume.Resume {
		return nil, errGeneric("There's a migration process in progress")
	}
	if len(p.opt.Blockers) > 0 {
		return nil, errGeneric(p.opt.Blockers[0]) // QEMU gives the first blocker's own text
	}
	var a qmp.MigrateArgs
	if err := json.Unmarshal(args, &a); err != nil {
		return nil, err
	}
	sa, err := parseChannel(a.URI, a.Channels)
	if err != nil {
		return nil, err
	}
	if a.Resume {
		return p.resume(sa)
	}
	p.setStatus(qmp.StatusSetup)
	m := &p.mig
	ok := m.listening && !m.dstDead && len(m.sockAddr) > 0 && sameAddr(m.sockAddr[0], sa)
	if !ok {
		m.errDesc = "Failed to connect to '" + addrString(sa) + "': Connection refused"
	}
	if addr := src.hw.vfio(); addr != "" && src.caps["postcopy-ram"] {
		m.errDesc = addr + ": VFIO migration is not supported with postcopy migration"
	}
	if mf := src.caps["multifd"]; mf != p.Dst.caps["multifd"] ||
		(mf && p.opt.SrcUUID != p.opt.DstUUID) {
		m.errDesc = "multifd: received uuid mismatch or multifd setting differs"
	}
	p.startRAM()
	return nil, nil
}

func (p *Pair) migrateIncoming(args json.RawMessage) (any, error) {
	dst, m := p.Dst, &p.mig
	if dst.run != "inmigrate" {
		return nil, errGeneric("'-incoming' was not specified on the command line")
	}
	if m.listening {
		return nil, errGeneric("The incoming migration has already been started")
	}
	var a qmp.MigrateIncomingArgs
	if err := json.Unmarshal(args, &a); err != nil {
		return nil, err
	}
	sa, err := parseChannel(a.URI, a.Channels)
	if err != nil {
		return nil, err
	}
	if sa.Type == "inet" && sa.Port == "0" {
		sa.Port = fmt.Sprint(Port)
	}
	m.listening = true
	m.sockAddr = []qmp.SocketAddress{sa}
	if p.opt.DstVersion[0] >= 10 {
		m.dstStatus = qmp.StatusSetup
	}
	if dst.caps["events"] || p.opt.DstVersion[0] < 8 {
		dst.Emit("MIGRATION", map[string]any{"status": "setup"})
	}
	return nil, nil
}

func (p *Pair) cancel(json.RawMessage) (any, error) {
	m := &p.mig
	if m.status.Postcopy() {
		m.cancelInPostcopy++
		if p.opt.Version[0] >= 10 {
			return nil, errGeneric("Postcopy migration in progress, cannot cancel.")
		}
	}
	if m.status == qmp.StatusDevice && p.opt.LateCancel != "" {
		m.lateCancel = true
		return nil, nil
	}
	if p.active() {
		p.setStatus(qmp.StatusCancelling)
	}
	return nil, nil
}

func (p *Pair) continueMigration(args json.RawMessage) (any, error) {
	var a struct {
		State string `json:"state"`
	}
	_ = json.Unmarshal(args, &a)
	if string(p.mig.status) != a.State {
		return nil, errGeneric(fmt.Sprintf("Migration not in expected state: %s", p.mig.status))
	}
	p.mig.continued = true
	return nil, nil
}

func (p *Pair) startPostcopy(json.RawMessage) (any, error) {
	if !p.Src.caps["postcopy-ram"] {
		return nil, errGeneric("Enable postcopy with migrate_set_capability before the start of migration")
	}
	if !p.active() {
		return nil, errGeneric("Postcopy must be started after migration has been started")
	}
	p.mig.wantPost = true
	return nil, nil
}

// yank of the migration instance shuts the incoming channel down: the load
// fails and the destination exits (just after answering).
func (p *Pair) yank(args json.RawMessage) (any, error) {
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
		if !p.mig.listening {
			return nil, &qmp.Error{Class: "DeviceNotFound", Desc: "Instance 'migration' not found"}
		}
	}
	if p.mig.dstStatus != qmp.StatusCompleted {
		go func() {
			time.Sleep(time.Millisecond)
			p.mu.Lock()
			p.dstExit()
			p.mu.Unlock()
		}()
	}
	return nil, nil
}

// migrateMembers are migrate's arguments in QEMU's schema for version v
// ("*" optional): "uri" is mandatory before 8.2, where "channels" came;
// blk and inc went in 9.1.
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

func parseChannel(uri string, chans []qmp.MigrationChannel) (qmp.SocketAddress, error) {
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

func sameAddr(a, b qmp.SocketAddress) bool {
	return a.Type == b.Type && a.Path == b.Path && a.Port == b.Port
}

func addrString(sa qmp.SocketAddress) string {
	if sa.Type == "unix" {
		return sa.Path
	}
	return sa.Host + ":" + sa.Port
}

func (p *Pair) active() bool {
	return p.mig.status != qmp.StatusNone && !p.mig.status.Terminal()
}

func (p *Pair) setStatus(s qmp.MigrationStatus) {
	p.mig.status = s
	if p.Src.caps["events"] {
		p.Src.Emit("MIGRATION", map[string]any{"status": s})
	}
}

func (p *Pair) setDstStatus(s qmp.MigrationStatus) {
	p.mig.dstStatus = s
	if p.Dst.caps["events"] && !p.mig.dstDead {
		p.Dst.Emit("MIGRATION", map[string]any{"status": s})
	}
}

// dstComplete is the destination completing its incoming migration: it
// starts the guest by itself with DstAutostart unless stop turned that off.
func (p *Pair) dstComplete() {
	dst := p.Dst
	p.setDstStatus(qmp.StatusCompleted)
	if dst.run == "inmigrate" {
		if p.opt.DstAutostart && !p.mig.dstHeld {
			dst.run = "running"
			dst.Emit("RESUME", nil)
		} else {
			dst.run = "paused"
		}
	}
}

// dstExit is the destination QEMU exiting after a failed incoming migration
// (exit-on-error default).
func (p *Pair) dstExit() {
	if p.mig.dstDead || !p.mig.listening {
		return
	}
	if p.isFrozen(Destination) {
		p.dstExitPending = true // it exits once it runs again
		return
	}
	p.mig.dstDead = true
	p.deviceLoaded() // its held commands end with it
	go p.Dst.CloseConns()
}
