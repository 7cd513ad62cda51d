package qemutest

import (
	"encoding/json"
	"slices"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// The block layer, on each side when either has a disk (Options.Disk,
// Disks, DstDisks): the block devices (query-block), named nodes
// (query-named-block-nodes, blockdev-add, blockdev-del), the NBD server and
// its exports, mirror jobs (blockdev-mirror, query-block-jobs,
// block-job-cancel, block-job-set-speed, job-dismiss, block-job-change from
// 8.2), and blockdev-create jobs (query-jobs). Either side answers every
// command, as QEMU does; which side uses which is up to the code under test.
//
// A mirror copies at Options.MirrorRate (or its speed, when lower) while
// the running source's guest dirties Options.DiskWriteRate bytes/s of it in
// background mode; in write-blocking mode guest writes do not dirty it.
// Jobs advance when they are queried (query-block-jobs), by the time since
// the last query, and are ready (BLOCK_JOB_READY) once nothing is left to
// copy. With MirrorRate MirrorManual they move only by SetMirrorProgress.

type mirrorJob struct {
	id, device, target string
	dirty, done        float64
	rate               float64
	ready              bool
	mode               string
	last               time.Time
}

func (j *mirrorJob) info() qmp.BlockJobInfo {
	st := "running"
	if j.ready {
		st = "ready"
	}
	return qmp.BlockJobInfo{Type: "mirror", Device: j.id, Len: uint64(j.done + j.dirty), Offset: uint64(j.done),
		Ready: j.ready, Status: st}
}

func (j *mirrorJob) event() map[string]any {
	return map[string]any{"type": "mirror", "device": j.id, "len": uint64(j.done + j.dirty), "offset": uint64(j.done), "speed": 0}
}

type blockLayer struct {
	devices    []qmp.BlockInfo
	nodes      map[string]string // blockdev-add'ed nodes: name -> driver
	exports    map[string]string // id -> node
	server     bool              // NBD server running
	jobs       []*mirrorJob
	changes    int                   // block-job-change calls accepted
	createJobs []qmp.JobInfo         // blockdev-create jobs, concluded
	createErr  string                // blockdev-create jobs conclude with this error
	mirrorErr  map[string]*qmp.Error // blockdev-mirror of a device fails
}

func newBlockLayer(devices []qmp.BlockInfo) *blockLayer {
	return &blockLayer{devices: devices, nodes: map[string]string{}, exports: map[string]string{},
		mirrorErr: map[string]*qmp.Error{}}
}

// rawDisk is a raw image on a virtio disk named after its node.
func rawDisk(node, file string, size uint64) qmp.BlockInfo {
	return qmp.BlockInfo{QDev: "/machine/peripheral/vd0/virtio-backend", Type: "unknown",
		Inserted: &qmp.BlockDeviceInfo{NodeName: node, File: file, Driver: "raw",
			Image: &qmp.ImageInfo{Filename: file, VirtualSize: size, Format: "raw"}}}
}

// device returns the inserted medium of the device whose node is name.
func (b *blockLayer) device(name string) *qmp.BlockDeviceInfo {
	for _, d := range b.devices {
		if d.Inserted != nil && d.Inserted.NodeName == name {
			return d.Inserted
		}
	}
	return nil
}

func (b *blockLayer) job(id string) (int, *mirrorJob) {
	for i, j := range b.jobs {
		if j.id == id {
			return i, j
		}
	}
	return -1, nil
}

func (q *QEMU) hasBlockJobChange() bool { return hasChannels(q.p.version(q.side)) }

// blockCommands are the block layer's commands, for the schema.
func (q *QEMU) blockCommands() []string {
	if q.block == nil {
		return nil
	}
	c := []string{"query-block", "query-named-block-nodes", "blockdev-add", "blockdev-del", "nbd-server-start",
		"nbd-server-stop", "block-export-add", "block-export-del", "query-block-exports", "blockdev-mirror",
		"query-block-jobs", "block-job-cancel", "block-job-set-speed", "job-dismiss", "blockdev-create", "query-jobs"}
	if q.hasBlockJobChange() {
		c = append(c, "block-job-change")
	}
	return c
}

// advance moves a mirror on to now. Caller holds mu.
func (q *QEMU) advance(j *mirrorJob) {
	p := q.p
	now := time.Now()
	dt := now.Sub(j.last).Seconds()
	j.last = now
	if dt <= 0 || p.opt.MirrorRate < 0 {
		return
	}
	if j.mode == "background" && q.run == "running" {
		size := float64(0)
		if d := q.block.device(j.device); d != nil && d.Image != nil {
			size = float64(d.Image.VirtualSize)
		}
		j.dirty = min(j.dirty+p.opt.DiskWriteRate*dt, size)
	}
	c := min(j.rate*dt, j.dirty)
	j.dirty -= c
	j.done += c
	if j.dirty < 1 && !j.ready {
		j.dirty, j.ready = 0, true
		q.Emit("BLOCK_JOB_READY", j.event())
	}
}

// blockHandler decodes a block command's arguments as an object.
func (q *QEMU) blockHandle(name string, f func(a map[string]any) (any, error)) {
	q.handle(name, func(raw json.RawMessage) (any, error) {
		var a map[string]any
		if len(raw) > 0 {
			if err := json.Unmarshal(raw, &a); err != nil {
				return nil, err
			}
		}
		return f(a)
	})
}

func str(a map[string]any, k string) string { s, _ := a[k].(string); return s }

func (q *QEMU) installBlock() {
	b := q.block
	q.blockHandle("query-block", func(map[string]any) (any, error) { return append([]qmp.BlockInfo{}, b.devices...), nil })
	q.blockHandle("query-named-block-nodes", func(map[string]any) (any, error) {
		out := []qmp.BlockDeviceInfo{}
		for _, d := range b.devices {
			if d.Inserted != nil {
				out = append(out, *d.Inserted)
			}
		}
		for n, drv := range b.nodes {
			out = append(out, qmp.BlockDeviceInfo{NodeName: n, Driver: drv})
		}
		slices.SortFunc(out, func(x, y qmp.BlockDeviceInfo) int { return strings.Compare(x.NodeName, y.NodeName) })
		return out, nil
	})
	q.blockHandle("blockdev-add", func(a map[string]any) (any, error) {
		n := str(a, "node-name")
		if _, ok := b.nodes[n]; ok || b.device(n) != nil {
			return nil, errGeneric("Duplicate nodes with node-name='" + n + "'")
		}
		b.nodes[n] = str(a, "driver")
		return nil, nil
	})
	q.blockHandle("blockdev-del", func(a map[string]any) (any, error) {
		n := str(a, "node-name")
		if _, ok := b.nodes[n]; !ok {
			return nil, errGeneric("Failed to find node with node-name='" + n + "'")
		}
		for _, j := range b.jobs {
			if j.target == n {
				return nil, errGeneric("Node " + n + " is in use")
			}
		}
		delete(b.nodes, n)
		return nil, nil
	})
	q.blockHandle("nbd-server-start", func(map[string]any) (any, error) {
		if b.server {
			return nil, errGeneric("NBD server already running")
		}
		b.server = true
		return nil, nil
	})
	q.blockHandle("nbd-server-stop", func(map[string]any) (any, error) {
		if !b.server {
			return nil, errGeneric("NBD server not running")
		}
		b.server = false
		return nil, nil
	})
	q.blockHandle("block-export-add", func(a map[string]any) (any, error) {
		if !b.server {
			return nil, errGeneric("NBD server not running")
		}
		id := str(a, "id")
		if _, ok := b.exports[id]; ok {
			return nil, errGeneric("Block export id '" + id + "' is already in use")
		}
		b.exports[id] = str(a, "node-name")
		return nil, nil
	})
	q.blockHandle("block-export-del", func(a map[string]any) (any, error) {
		id := str(a, "id")
		if _, ok := b.exports[id]; !ok {
			return nil, errGeneric("Export '" + id + "' is not found")
		}
		delete(b.exports, id)
		q.Emit("BLOCK_EXPORT_DELETED", map[string]any{"id": id})
		return nil, nil
	})
	q.blockHandle("query-block-exports", func(map[string]any) (any, error) {
		out := []qmp.BlockExportInfo{}
		for id, n := range b.exports {
			out = append(out, qmp.BlockExportInfo{ID: id, Type: "nbd", NodeName: n})
		}
		slices.SortFunc(out, func(x, y qmp.BlockExportInfo) int { return strings.Compare(x.ID, y.ID) })
		return out, nil
	})
	q.blockHandle("blockdev-mirror", q.blockdevMirror)
	q.blockHandle("query-block-jobs", func(map[string]any) (any, error) {
		out := []qmp.BlockJobInfo{}
		for _, j := range b.jobs {
			q.advance(j)
			out = append(out, j.info())
		}
		return out, nil
	})
	if q.hasBlockJobChange() {
		q.blockHandle("block-job-change", func(a map[string]any) (any, error) {
			_, j := b.job(str(a, "id"))
			if j == nil {
				return nil, errGeneric("job not found")
			}
			q.advance(j)
			j.mode = str(a, "copy-mode")
			b.changes++
			return nil, nil
		})
	}
	q.blockHandle("block-job-set-speed", func(map[string]any) (any, error) { return nil, nil })
	q.blockHandle("block-job-cancel", func(a map[string]any) (any, error) {
		k, j := b.job(str(a, "device"))
		if j == nil {
			return nil, &qmp.Error{Class: "DeviceNotActive", Desc: "Block job '" + str(a, "device") + "' not found"}
		}
		b.jobs = slices.Delete(b.jobs, k, k+1)
		if force, _ := a["force"].(bool); force || !j.ready {
			q.Emit("BLOCK_JOB_CANCELLED", j.event())
		} else {
			q.Emit("BLOCK_JOB_COMPLETED", j.event())
		}
		return nil, nil
	})
	q.blockHandle("job-dismiss", func(a map[string]any) (any, error) {
		id := str(a, "id")
		b.createJobs = slices.DeleteFunc(b.createJobs, func(j qmp.JobInfo) bool { return j.ID == id })
		if k, j := b.job(id); j != nil {
			b.jobs = slices.Delete(b.jobs, k, k+1)
		}
		return nil, nil
	})
	q.blockHandle("blockdev-create", func(a map[string]any) (any, error) {
		id := str(a, "job-id")
		b.createJobs = append(b.createJobs, qmp.JobInfo{ID: id, Type: "create", Status: "concluded", Error: b.createErr})
		q.Emit("JOB_STATUS_CHANGE", map[string]any{"id": id, "status": "concluded"})
		return nil, nil
	})
	q.blockHandle("query-jobs", func(map[string]any) (any, error) { return append([]qmp.JobInfo{}, b.createJobs...), nil })
}

func (q *QEMU) blockdevMirror(a map[string]any) (any, error) {
	b, dev := q.block, str(a, "device")
	if e := b.mirrorErr[dev]; e != nil {
		return nil, e
	}
	var size uint64
	if d := b.device(dev); d != nil && d.Image != nil {
		size = d.Image.VirtualSize
	}
	mode := str(a, "copy-mode")
	if mode == "" {
		mode = "background"
	}
	rate := q.p.opt.MirrorRate
	if s, _ := a["speed"].(float64); s > 0 && s < rate {
		rate = s
	}
	b.jobs = append(b.jobs, &mirrorJob{id: str(a, "job-id"), device: dev, target: str(a, "target"), dirty: float64(size),
		rate: rate, mode: mode, last: time.Now()})
	return nil, nil
}

// BlockLeft reports what the block layer still holds on both sides:
// blockdev-add'ed nodes, mirror jobs, exports, and whether an NBD server
// runs.
func (p *Pair) BlockLeft() (nodes, jobs, exports int, server bool) {
	for _, q := range []*QEMU{p.Src, p.Dst} {
		n, j, e, s := q.BlockLeft()
		nodes, jobs, exports, server = nodes+n, jobs+j, exports+e, server || s
	}
	return nodes, jobs, exports, server
}

// BlockLeft reports what q's block layer holds: blockdev-add'ed nodes,
// mirror jobs, exports, and whether its NBD server runs.
func (q *QEMU) BlockLeft() (nodes, jobs, exports int, server bool) {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	if q.block == nil {
		return 0, 0, 0, false
	}
	b := q.block
	return len(b.nodes), len(b.jobs), len(b.exports), b.server
}

// SetDiskWriteRate changes the rate the running guest dirties its disk at
// (Options.DiskWriteRate); the mirrors are advanced to now at the old rate
// first.
func (p *Pair) SetDiskWriteRate(r float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if b := p.Src.block; b != nil {
		for _, j := range b.jobs {
			p.Src.advance(j)
		}
	}
	p.opt.DiskWriteRate = r
}

// MirrorModeChanges is how many block-job-change calls the source accepted.
func (p *Pair) MirrorModeChanges() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.Src.block == nil {
		return 0
	}
	return p.Src.block.changes
}

// SetMirrorProgress moves every mirror job of q to done bytes copied (at
// most the disk's size) and, with ready, makes it ready (BLOCK_JOB_READY),
// for tests that drive the jobs themselves (Options.MirrorRate
// MirrorManual).
func (q *QEMU) SetMirrorProgress(done uint64, ready bool) {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	if q.block == nil {
		return
	}
	for _, j := range q.block.jobs {
		total := j.done + j.dirty
		j.done = min(float64(done), total)
		j.dirty = total - j.done
		if ready && !j.ready {
			j.ready = true
			q.Emit("BLOCK_JOB_READY", j.event())
		}
	}
}

// FailMirror ends mirror job id with an I/O error the way QEMU reports it
// (BLOCK_JOB_ERROR, then BLOCK_JOB_COMPLETED with the error). It does
// nothing when there is no such job.
func (q *QEMU) FailMirror(id, msg string) {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	if q.block == nil {
		return
	}
	k, j := q.block.job(id)
	if j == nil {
		return
	}
	q.block.jobs = slices.Delete(q.block.jobs, k, k+1)
	ev := j.event()
	ev["error"] = msg
	q.Emit("BLOCK_JOB_ERROR", map[string]any{"device": id, "operation": "write", "action": "report"})
	q.Emit("BLOCK_JOB_COMPLETED", ev)
}

// RefuseMirror makes blockdev-mirror of device fail with err (nil: accept
// it again), as QEMU refuses a mirror on a node it cannot take.
func (q *QEMU) RefuseMirror(device string, err *qmp.Error) {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	if q.block == nil {
		return
	}
	if err == nil {
		delete(q.block.mirrorErr, device)
		return
	}
	q.block.mirrorErr[device] = err
}

// FailCreate makes blockdev-create jobs conclude with this error ("": they
// succeed).
func (q *QEMU) FailCreate(msg string) {
	q.p.mu.Lock()
	defer q.p.mu.Unlock()
	if q.block != nil {
		q.block.createErr = msg
	}
}

// installNoBlock answers the block layer's queries of a QEMU without
// Options.Disk(s): nothing there (as a real QEMU without disks would).
func (q *QEMU) installNoBlock() {
	for _, cmd := range []string{"query-block", "query-block-jobs", "query-named-block-nodes", "query-block-exports", "query-jobs"} {
		q.handle(cmd, func(json.RawMessage) (any, error) { return []any{}, nil })
	}
}
