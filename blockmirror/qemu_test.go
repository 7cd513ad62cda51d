package blockmirror

import (
	"context"
	"encoding/json"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
)

// fakeQEMU is one side of a qemutest pair with a client connected to it.
// Mirror jobs move only when the test says (SetMirrorProgress).
type fakeQEMU struct {
	*qemutest.QEMU
	c *qmp.Client
}

func blk(node, file string, size uint64, ro bool) qmp.BlockInfo {
	return qmp.BlockInfo{QDev: "/machine/peripheral/vd-" + node + "/virtio-backend", Inserted: &qmp.BlockDeviceInfo{
		NodeName: node, File: file, ReadOnly: ro, Driver: "raw", Image: &qmp.ImageInfo{VirtualSize: size, Format: "raw"},
	}}
}

func qerr(desc string) *qmp.Error { return &qmp.Error{Class: "GenericError", Desc: desc} }

// fakes starts a source with the block devices src and a destination with
// dst, their monitors serial as QEMU's.
func fakes(t *testing.T, src, dst []qmp.BlockInfo) (*fakeQEMU, *fakeQEMU) {
	t.Helper()
	if src == nil {
		src = []qmp.BlockInfo{}
	}
	if dst == nil {
		dst = []qmp.BlockInfo{}
	}
	p := qemutest.New(qemutest.Options{Disks: src, DstDisks: dst, MirrorRate: qemutest.MirrorManual, Serial: true})
	sc, dc, err := p.Clients(context.Background())
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = sc.Close()
		_ = dc.Close()
		p.Close()
	})
	return &fakeQEMU{QEMU: p.Src, c: sc}, &fakeQEMU{QEMU: p.Dst, c: dc}
}

// failServerStart makes the next n nbd-server-start fail as a port in use
// does.
func (f *fakeQEMU) failServerStart(n int) {
	next := f.Handler("nbd-server-start")
	var mu sync.Mutex
	f.Handle("nbd-server-start", func(args json.RawMessage) (any, error) {
		mu.Lock()
		fail := n > 0
		if fail {
			n--
		}
		mu.Unlock()
		if fail {
			return nil, qerr("Failed to bind socket: Address already in use")
		}
		return next(args)
	})
}

// state is a summary of what exists, for "nothing left" checks.
func (f *fakeQEMU) state() (nodes, jobs, exports int, server bool) { return f.BlockLeft() }

// commands lists the commands received, without the queries.
func (f *fakeQEMU) commands() []string {
	var out []string
	for _, c := range f.Calls() {
		if len(c.Command) > 6 && c.Command[:6] == "query-" {
			continue
		}
		out = append(out, c.Command)
	}
	return out
}

func (f *fakeQEMU) args(command string, i int) map[string]any {
	calls := f.CallsOf(command)
	if i >= len(calls) {
		return nil
	}
	var m map[string]any
	_ = json.Unmarshal(calls[i].Args, &m)
	return m
}
