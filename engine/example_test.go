package engine_test

import (
	"context"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
)

// Migrate a guest between two fake QEMUs (package qemutest). With real QEMUs, set Endpoint.Address to their
// QMP sockets instead of passing clients.
func Example() {
	vms := qemutest.New(qemutest.Options{RAM: 64 << 20, Throughput: 1 << 30, DirtyRate: 16 << 20})
	defer vms.Close()
	ctx := context.Background()
	src, _ := vms.Src.Client(ctx)
	defer src.Close()
	dst, _ := vms.Dst.Client(ctx)
	defer dst.Close()

	res, err := engine.Migrate(ctx, engine.Config{
		Source:      engine.Endpoint{Client: src},
		Destination: engine.Endpoint{Client: dst},
		URI:         "tcp:127.0.0.1:0", // the destination picks the port
		Observer: func(e engine.Event) {
			if e.Kind == engine.EventPhase {
				fmt.Println("phase", e.Phase)
			}
		},
	})
	if err != nil {
		fmt.Println("failed:", err)
		return
	}
	fmt.Println(res.Status, "downtime within 300ms:", res.Downtime <= 300*time.Millisecond)
	fmt.Println("destination", vms.DstRunState(), "source", vms.SrcRunState())
	// Output:
	// phase prepare
	// phase start
	// phase converge
	// phase switchover
	// phase complete
	// completed downtime within 300ms: true
	// destination running source postmigrate
}

// A manager's use of the job API: start, watch, steer, wait. The README's
// "Embedding" section shows this function's body (TestReadmeExample keeps
// them the same).
func ExampleStart() {
	vms := qemutest.New(qemutest.Options{RAM: 8 << 20, Throughput: 1 << 30, DirtyRate: 32 << 20})
	defer vms.Close()
	src, dst, _ := vms.Clients(context.Background())
	defer src.Close()
	defer dst.Close()

	job, err := engine.Start(context.Background(), engine.Config{
		Source:      engine.Endpoint{Client: src}, // or Address: qmp.UnixAddress("/run/vm1-src.qmp")
		Destination: engine.Endpoint{Client: dst},
		URI:         "tcp:127.0.0.1:0",
		Bandwidth:   4 << 20, // bytes/s: too little for this guest
	})
	if err != nil {
		fmt.Println("not started:", err)
		return
	}
	events := job.Subscribe()
	for ev := range events.C {
		if ev.Kind == engine.EventStats && ev.Stats.Iteration >= 2 {
			_ = job.SetBandwidth(0) // lift the cap: unlimited
			break
		}
	}
	events.Close()
	res, err := job.Wait(context.Background())
	fmt.Println(res.Status, err, job.Progress().Limits.Bandwidth == engine.UnlimitedBandwidth)
	// Output:
	// completed <nil> true
}
