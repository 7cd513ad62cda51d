package blockmirror

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// fakeQEMU is a qmptest server that models the block layer just enough for
// blockmirror: devices, named nodes, NBD server, exports and mirror jobs.
type fakeQEMU struct {
	s *qmptest.Server
	c *qmp.Client

	mu      sync.Mutex
	blocks  []qmp.BlockInfo
	nodes   map[string]map[string]any // blockdev-add'ed nodes
	jobs    map[string]*qmp.BlockJobInfo
	exports map[string]string // id -> node
	server  bool
	// knobs
	mirrorErr  map[string]*qmp.Error // by device: blockdev-mirror fails
	serverErr  int                   // nbd-server-start fails this many times
	createJobs []qmp.JobInfo
	createErr  string // blockdev-create jobs conclude with this error
}

func blk(node, file string, size uint64, ro bool) qmp.BlockInfo {
	return qmp.BlockInfo{QDev: "/machine/peripheral/vd-" + node + "/virtio-backend", Inserted: &qmp.BlockDeviceInfo{
		NodeName: node, File: file, ReadOnly: ro, Driver: "raw", Image: &qmp.ImageInfo{VirtualSize: size, Format: "raw"},
	}}
}

func qerr(desc string) *qmp.Error { return &qmp.Error{Class: "GenericError", Desc: desc} }

func newFake(t *testing.T, blocks ...qmp.BlockInfo) *fakeQEMU {
	t.Helper()
	f := &fakeQEMU{
		s:         qmptest.NewServer(qmptest.WithVersion(7, 2, 22), qmptest.WithSerial()),
		blocks:    blocks,
		nodes:     map[string]map[string]any{},
		jobs:      map[string]*qmp.BlockJobInfo{},
		exports:   map[string]string{},
		mirrorErr: map[string]*qmp.Error{},
	}
	t.Cleanup(f.s.Close)
	h := func(name string, fn func(args map[string]any) (any, error)) {
		f.s.Handle(name, func(raw json.RawMessage) (any, error) {
			var args map[string]any
			if len(raw) > 0 {
				if err := json.Unmarshal(raw, &args); err != nil {
					return nil, err
				}
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			return fn(args)
		})
	}
	h("query-block", func(map[string]any) (any, error) { return f.blocks, nil })
	h("query-named-block-nodes", func(map[string]any) (any, error) {
		var out []qmp.BlockDeviceInfo
		for _, b := range f.blocks {
			if b.Inserted != nil {
				out = append(out, *b.Inserted)
			}
		}
		for n, o := range f.nodes {
			out = append(out, qmp.BlockDeviceInfo{NodeName: n, Driver: fmt.Sprint(o["driver"])})
		}
		return out, nil
	})
	h("blockdev-add", func(a map[string]any) (any, error) {
		n := a["node-name"].(string)
		if _, ok := f.nodes[n]; ok {
			return nil, qerr("Duplicate nodes with node-name='" + n + "'")
		}
		f.nodes[n] = a
		return nil, nil
	})
	h("blockdev-del", func(a map[string]any) (any, error) {
		n := a["node-name"].(string)
		if _, ok := f.nodes[n]; !ok {
			return nil, qerr("Failed to find node with node-name='" + n + "'")
		}
		for _, j := range f.jobs {
			if j.Type == n { // Type holds the target node in this fake
				return nil, qerr("Node " + n + " is in use")
			}
		}
		delete(f.nodes, n)
		return nil, nil
	})
	h("nbd-server-start", func(a map[string]any) (any, error) {
		if f.serverErr > 0 {
			f.serverErr--
			return nil, qerr("Failed to bind socket: Address already in use")
		}
		if f.server {
			return nil, qerr("NBD server already running")
		}
		f.server = true
		return nil, nil
	})
	h("nbd-server-stop", func(map[string]any) (any, error) {
		if !f.server {
			return nil, qerr("NBD server not running")
		}
		f.server = false
		return nil, nil
	})
	h("block-export-add", func(a map[string]any) (any, error) {
		if !f.server {
			return nil, qerr("NBD server not running")
		}
		id := a["id"].(string)
		if _, ok := f.exports[id]; ok {
			return nil, qerr("Block export id '" + id + "' is already in use")
		}
		f.exports[id] = a["node-name"].(string)
		return nil, nil
	})
	h("block-export-del", func(a map[string]any) (any, error) {
		id := a["id"].(string)
		if _, ok := f.exports[id]; !ok {
			return nil, qerr("Export '" + id + "' is not found")
		}
		delete(f.exports, id)
		f.s.Emit("BLOCK_EXPORT_DELETED", map[string]any{"id": id})
		return nil, nil
	})
	h("query-block-exports", func(map[string]any) (any, error) {
		out := []qmp.BlockExportInfo{}
		for id, n := range f.exports {
			out = append(out, qmp.BlockExportInfo{ID: id, Type: "nbd", NodeName: n})
		}
		return out, nil
	})
	h("blockdev-mirror", func(a map[string]any) (any, error) {
		dev := a["device"].(string)
		if e := f.mirrorErr[dev]; e != nil {
			return nil, e
		}
		id := a["job-id"].(string)
		var size uint64
		for _, b := range f.blocks {
			if b.Inserted != nil && b.Inserted.NodeName == dev {
				size = b.Inserted.Image.VirtualSize
			}
		}
		f.jobs[id] = &qmp.BlockJobInfo{Type: a["target"].(string), Device: id, Len: size, Status: "running"}
		return nil, nil
	})
	h("query-block-jobs", func(map[string]any) (any, error) {
		out := []qmp.BlockJobInfo{}
		for _, j := range f.jobs {
			c := *j
			c.Type = "mirror"
			out = append(out, c)
		}
		slices.SortFunc(out, func(a, b qmp.BlockJobInfo) int { return strings.Compare(a.Device, b.Device) })
		return out, nil
	})
	h("block-job-cancel", func(a map[string]any) (any, error) {
		id := a["device"].(string)
		j, ok := f.jobs[id]
		if !ok {
			return nil, &qmp.Error{Class: "DeviceNotActive", Desc: "Block job '" + id + "' not found"}
		}
		delete(f.jobs, id)
		ev := map[string]any{"type": "mirror", "device": id, "len": j.Len, "offset": j.Offset, "speed": 0}
		if force, _ := a["force"].(bool); force || !j.Ready {
			f.s.Emit("BLOCK_JOB_CANCELLED", ev)
		} else {
			f.s.Emit("BLOCK_JOB_COMPLETED", ev)
		}
		return nil, nil
	})
	h("block-job-change", func(a map[string]any) (any, error) {
		if _, ok := f.jobs[a["id"].(string)]; !ok {
			return nil, qerr("job not found")
		}
		return nil, nil
	})
	h("block-job-set-speed", func(map[string]any) (any, error) { return nil, nil })
	h("job-dismiss", func(a map[string]any) (any, error) {
		f.createJobs = slices.DeleteFunc(f.createJobs, func(j qmp.JobInfo) bool { return j.ID == a["id"] })
		delete(f.jobs, a["id"].(string))
		return nil, nil
	})
	h("blockdev-create", func(a map[string]any) (any, error) {
		id := a["job-id"].(string)
		f.createJobs = append(f.createJobs, qmp.JobInfo{ID: id, Type: "create", Status: "concluded", Error: f.createErr})
		f.s.Emit("JOB_STATUS_CHANGE", map[string]any{"id": id, "status": "concluded"})
		return nil, nil
	})
	h("query-jobs", func(map[string]any) (any, error) { return append([]qmp.JobInfo{}, f.createJobs...), nil })
	c, err := f.s.Client(context.Background())
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	f.c = c
	return f
}

// progress moves every job to done bytes and READY when ready, emitting
// BLOCK_JOB_READY like QEMU.
func (f *fakeQEMU) progress(done uint64, ready bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, j := range f.jobs {
		j.Offset = min(done, j.Len)
		if ready && !j.Ready {
			j.Ready = true
			f.s.Emit("BLOCK_JOB_READY", map[string]any{"type": "mirror", "device": j.Device, "len": j.Len, "offset": j.Offset, "speed": 0})
		}
	}
}

// fail ends job id with an I/O error the way QEMU reports it.
func (f *fakeQEMU) fail(id, msg string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	j := f.jobs[id]
	delete(f.jobs, id)
	f.s.Emit("BLOCK_JOB_ERROR", map[string]any{"device": id, "operation": "write", "action": "report"})
	f.s.Emit("BLOCK_JOB_COMPLETED", map[string]any{"type": "mirror", "device": id, "len": j.Len, "offset": j.Offset, "speed": 0, "error": msg})
}

// state is a summary of what exists, for "nothing left" checks.
func (f *fakeQEMU) state() (nodes, jobs, exports int, server bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.nodes), len(f.jobs), len(f.exports), f.server
}

// commands lists the commands received, without the queries.
func (f *fakeQEMU) commands() []string {
	var out []string
	for _, c := range f.s.Calls() {
		if len(c.Command) > 6 && c.Command[:6] == "query-" {
			continue
		}
		out = append(out, c.Command)
	}
	return out
}

func (f *fakeQEMU) args(command string, i int) map[string]any {
	calls := f.s.CallsOf(command)
	if i >= len(calls) {
		return nil
	}
	var m map[string]any
	_ = json.Unmarshal(calls[i].Args, &m)
	return m
}
