package qmp_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// Driving a (fake) QEMU: typed helpers, an error with its class, and the
// migration state with times as durations.
func Example() {
	qemu := qmptest.NewServer(qmptest.WithVersion(7, 2, 22))
	defer qemu.Close()
	qemu.Handle("query-migrate", qmptest.Return(json.RawMessage(
		`{"status": "active", "total-time": 2504, "expected-downtime": 300,
		  "ram": {"transferred": 10826565, "remaining": 56832000, "total": 67641344, "mbps": 33.8184}}`)))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// With a real QEMU: qmp.Dial(ctx, "unix", "/run/vm.qmp").
	c, err := qemu.Client(ctx)
	if err != nil {
		panic(err)
	}
	defer c.Close()
	fmt.Println("QEMU", c.Version(), "oob:", c.OOB())

	info, err := c.QueryMigrate(ctx)
	if err != nil {
		panic(err)
	}
	fmt.Println(info.Status, info.TotalTime, "expected downtime", info.ExpectedDowntime)
	fmt.Printf("%d of %d bytes left\n", info.RAM.Remaining, info.RAM.Total)

	err = c.BlockJobChange(ctx, "mirror0", "write-blocking")
	if qmp.IsCommandNotFound(err) {
		fmt.Println("no block-job-change on this QEMU")
	}
	var qerr *qmp.Error
	if errors.As(err, &qerr) {
		fmt.Println(qerr.Class, qerr.Command)
	}
	// Output:
	// QEMU 7.2.22 oob: true
	// active 2.504s expected downtime 300ms
	// 56832000 of 67641344 bytes left
	// no block-job-change on this QEMU
	// CommandNotFound block-job-change
}

// Subscribe before the command that causes the event.
func ExampleClient_Subscribe() {
	qemu := qmptest.NewServer()
	defer qemu.Close()
	qemu.Handle("block-job-complete", func(args json.RawMessage) (any, error) {
		qemu.Emit("BLOCK_JOB_COMPLETED", map[string]any{"device": "other", "type": "mirror"})
		qemu.Emit("BLOCK_JOB_COMPLETED", map[string]any{"device": "mirror0", "type": "mirror", "len": 1024, "offset": 1024})
		return nil, nil
	})
	ctx := context.Background()
	c, err := qemu.Client(ctx)
	if err != nil {
		panic(err)
	}
	defer c.Close()

	sub := c.Subscribe(qmp.EventFilter{
		Names: []string{"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"},
		Match: qmp.ForDevice("mirror0"),
	})
	defer sub.Close()
	if err := c.BlockJobComplete(ctx, "mirror0"); err != nil {
		panic(err)
	}
	ev := <-sub.C
	var data struct{ Len, Offset uint64 }
	if err := ev.Decode(&data); err != nil {
		panic(err)
	}
	fmt.Println(ev.Name, ev.Field("device"), data.Offset, "/", data.Len)
	// Output:
	// BLOCK_JOB_COMPLETED mirror0 1024 / 1024
}

// Choosing commands from the schema rather than from the version.
func ExampleClient_ProbeFeatures() {
	qemu := qmptest.NewServer()
	defer qemu.Close()
	// A tiny excerpt of a 10.0 schema; real ones have thousands of entries.
	qemu.Handle("query-qmp-schema", qmptest.Return(json.RawMessage(`[
		{"name": "migrate", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
		{"name": "1", "meta-type": "object", "members": [{"name": "uri", "type": "str"}, {"name": "channels", "type": "[2]"}]},
		{"name": "migrate-incoming", "meta-type": "command", "arg-type": "3", "ret-type": "0"},
		{"name": "3", "meta-type": "object", "members": [{"name": "uri", "type": "str"}, {"name": "channels", "type": "[2]"}, {"name": "exit-on-error", "type": "bool"}]},
		{"name": "block-job-change", "meta-type": "command", "arg-type": "4", "ret-type": "0"}
	]`)))
	ctx := context.Background()
	c, err := qemu.Client(ctx)
	if err != nil {
		panic(err)
	}
	defer c.Close()
	f, err := c.ProbeFeatures(ctx)
	if err != nil {
		panic(err)
	}
	fmt.Println("channels:", f.MigrateChannels, "exit-on-error:", f.IncomingExitOnError, "block-job-change:", f.BlockJobChange)
	// Output:
	// channels: true exit-on-error: true block-job-change: true
}
