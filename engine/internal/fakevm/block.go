package fakevm

import (
	"encoding/json"
	"slices"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// The block layer: with Options.Disk > 0 both sides have a raw disk "disk0"
// (device vd0, different files), the destination an NBD server and exports,
// the source NBD client nodes and mirror jobs. A mirror copies at
// Options.MirrorRate (or its speed, when lower) while the running source's
// guest dirties Options.DiskWriteRate bytes/s of it in background mode; in
// write-blocking mode guest writes do not dirty it. Jobs advance when they
// are queried (query-block-jobs), by the time since the last query.

type mirrorJob struct {
	id, target  string
	dirty, done float64
	rate        float64
	ready       bool
	mode        string
	last        time.Time
}

type blockState struct {
	nodes   [2]map[string]string // blockdev-add'ed nodes per side: name -> driver
	exports map[string]string    // destination: id -> node
	server  bool                 // destination NBD server
	jobs    []*mirrorJob
	changes int // block-job-change calls accepted
}

func (p *Pair) hasBlockJobChange() bool {
	v := p.opt.Version
	return v[0] > 8 || (v[0] == 8 && v[1] >= 2)
}

func (p *Pair) blockInfo(i int) qmp.BlockInfo {
	file := "/src/disk0.raw"
	if i == 1 {
		file = "/dst/disk0.raw"
	}
	return qmp.BlockInfo{Device: "", QDev: "/machine/peripheral/vd0/virtio-backend", Type: "unknown",
		Inserted: &qmp.BlockDeviceInfo{NodeName: "disk0", File: file, Driver: "raw",
			Image: &qmp.ImageInfo{Filename: file, VirtualSize: p.opt.Disk, Format: "raw"}}}
}

// advance moves a mirror on to now. Caller holds mu.
func (p *Pair) advance(j *mirrorJob) {
	now := time.Now()
	dt := now.Sub(j.last).Seconds()
	j.last = now
	if dt <= 0 {
		return
	}
	if j.mode == "background" && p.side[0].run == "running" {
		j.dirty = min(j.dirty+p.opt.DiskWriteRate*dt, float64(p.opt.Disk))
	}
	c := min(j.rate*dt, j.dirty)
	j.dirty -= c
	j.done += c
	if j.dirty < 1 && !j.ready {
		j.dirty, j.ready = 0, true
		p.Src.Emit("BLOCK_JOB_READY", map[string]any{"type": "mirror", "device": j.id, "len": uint64(j.done), "offset": uint64(j.done), "speed": 0})
	}
}

func (p *Pair) job(id string) (int, *mirrorJob) {
	for i, j := range p.block.jobs {
		if j.id == id {
			return i, j
		}
	}
	return -1, nil
}

func (p *Pair) installBlock(i int) {
	m := p.side[i]
	srv := m.srv
	b := &p.block
	if b.nodes[i] == nil {
		b.nodes[i] = map[string]string{}
		b.exports = map[string]string{}
	}
	h := func(name string, f func(a map[string]any) (any, error)) {
		srv.Handle(name, func(raw json.RawMessage) (any, error) {
			var a map[string]any
			if len(raw) > 0 {
				if err := json.Unmarshal(raw, &a); err != nil {
					return nil, err
				}
			}
			p.gate(i)
			p.mu.Lock()
			defer p.mu.Unlock()
			return f(a)
		})
	}
	str := func(a map[string]any, k string) string { s, _ := a[k].(string); return s }
	h("query-block", func(map[string]any) (any, error) { return []qmp.BlockInfo{p.blockInfo(i)}, nil })
	h("query-named-block-nodes", func(map[string]any) (any, error) {
		out := []qmp.BlockDeviceInfo{*p.blockInfo(i).Inserted}
		for n, drv := range b.nodes[i] {
			out = append(out, qmp.BlockDeviceInfo{NodeName: n, Driver: drv})
		}
		slices.SortFunc(out, func(x, y qmp.BlockDeviceInfo) int { return strings.Compare(x.NodeName, y.NodeName) })
		return out, nil
	})
	h("blockdev-add", func(a map[string]any) (any, error) {
		n := str(a, "node-name")
		if _, ok := b.nodes[i][n]; ok || n == "disk0" {
			return nil, errGeneric("Duplicate nodes with node-name='" + n + "'")
		}
		b.nodes[i][n] = str(a, "driver")
		return nil, nil
	})
	h("blockdev-del", func(a map[string]any) (any, error) {
		n := str(a, "node-name")
		if _, ok := b.nodes[i][n]; !ok {
			return nil, errGeneric("Failed to find node with node-name='" + n + "'")
		}
		for _, j := range b.jobs {
			if j.target == n {
				return nil, errGeneric("Node " + n + " is in use")
			}
		}
		delete(b.nodes[i], n)
		return nil, nil
	})
	if i == 1 {
		h("nbd-server-start", func(map[string]any) (any, error) {
			if b.server {
				return nil, errGeneric("NBD server already running")
			}
			b.server = true
			return nil, nil
		})
		h("nbd-server-stop", func(map[string]any) (any, error) {
			if !b.server {
				return nil, errGeneric("NBD server not running")
			}
			b.server = false
			return nil, nil
		})
		h("block-export-add", func(a map[string]any) (any, error) {
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
		h("block-export-del", func(a map[string]any) (any, error) {
			id := str(a, "id")
			if _, ok := b.exports[id]; !ok {
				return nil, errGeneric("Export '" + id + "' is not found")
			}
			delete(b.exports, id)
			p.Dst.Emit("BLOCK_EXPORT_DELETED", map[string]any{"id": id})
			return nil, nil
		})
		h("query-block-exports", func(map[string]any) (any, error) {
			out := []qmp.BlockExportInfo{}
			for id, n := range b.exports {
				out = append(out, qmp.BlockExportInfo{ID: id, Type: "nbd", NodeName: n})
			}
			return out, nil
		})
		return
	}
	h("blockdev-mirror", func(a map[string]any) (any, error) {
		mode := str(a, "copy-mode")
		if mode == "" {
			mode = "background"
		}
		rate := p.opt.MirrorRate
		if s, _ := a["speed"].(float64); s > 0 && s < rate {
			rate = s
		}
		b.jobs = append(b.jobs, &mirrorJob{id: str(a, "job-id"), target: str(a, "target"), dirty: float64(p.opt.Disk),
			rate: rate, mode: mode, last: time.Now()})
		return nil, nil
	})
	h("query-block-jobs", func(map[string]any) (any, error) {
		out := []qmp.BlockJobInfo{}
		for _, j := range b.jobs {
			p.advance(j)
			st := "running"
			if j.ready {
				st = "ready"
			}
			out = append(out, qmp.BlockJobInfo{Type: "mirror", Device: j.id, Len: uint64(j.done + j.dirty), Offset: uint64(j.done),
				Ready: j.ready, Status: st})
		}
		return out, nil
	})
	if p.hasBlockJobChange() {
		h("block-job-change", func(a map[string]any) (any, error) {
			_, j := p.job(str(a, "id"))
			if j == nil {
				return nil, errGeneric("job not found")
			}
			p.advance(j)
			j.mode = str(a, "copy-mode")
			b.changes++
			return nil, nil
		})
	}
	h("block-job-set-speed", func(map[string]any) (any, error) { return nil, nil })
	h("block-job-cancel", func(a map[string]any) (any, error) {
		k, j := p.job(str(a, "device"))
		if j == nil {
			return nil, &qmp.Error{Class: "DeviceNotActive", Desc: "Block job '" + str(a, "device") + "' not found"}
		}
		b.jobs = slices.Delete(b.jobs, k, k+1)
		ev := map[string]any{"type": "mirror", "device": j.id, "len": uint64(j.done + j.dirty), "offset": uint64(j.done), "speed": 0}
		if force, _ := a["force"].(bool); force || !j.ready {
			p.Src.Emit("BLOCK_JOB_CANCELLED", ev)
		} else {
			p.Src.Emit("BLOCK_JOB_COMPLETED", ev)
		}
		return nil, nil
	})
}

// BlockLeft reports what the block layer still holds: blockdev-add'ed nodes
// on both sides, mirror jobs, destination exports and NBD server.
func (p *Pair) BlockLeft() (nodes, jobs, exports int, server bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.block.nodes[0]) + len(p.block.nodes[1]), len(p.block.jobs), len(p.block.exports), p.block.server
}

// SetDiskWriteRate changes the rate the running guest dirties its disk at
// (Options.DiskWriteRate); the mirrors are advanced to now at the old rate
// first.
func (p *Pair) SetDiskWriteRate(r float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, j := range p.block.jobs {
		p.advance(j)
	}
	p.opt.DiskWriteRate = r
}

// MirrorModeChanges is how many block-job-change calls were accepted.
func (p *Pair) MirrorModeChanges() int { p.mu.Lock(); defer p.mu.Unlock(); return p.block.changes }

func (p *Pair) blockCommands() []string {
	if p.opt.Disk == 0 {
		return nil
	}
	c := []string{"query-block", "query-named-block-nodes", "blockdev-add", "blockdev-del", "nbd-server-start",
		"nbd-server-stop", "block-export-add", "block-export-del", "query-block-exports", "blockdev-mirror",
		"query-block-jobs", "block-job-cancel", "block-job-set-speed"}
	if p.hasBlockJobChange() {
		c = append(c, "block-job-change")
	}
	return c
}
