package qemutest_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/strategy"
)

// Test what a manager does when a destination dies mid-migration, without
// QEMU: the fake pair's faults (KillDst, Freeze, SetThroughput, ...) are
// what a real host throws at a migration. (engine's Example shows a
// migration that completes.)
func Example() {
	vms := qemutest.New(qemutest.Options{Throughput: 64 << 20, DirtyRate: 128 << 20})
	defer vms.Close()
	src, dst, err := vms.Clients(context.Background())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer src.Close()
	defer dst.Close()

	time.AfterFunc(time.Second, vms.KillDst) // the destination host goes down
	_, err = engine.Migrate(context.Background(), engine.Config{
		Source:      engine.Endpoint{Client: src},
		Destination: engine.Endpoint{Client: dst},
		URI:         "tcp:127.0.0.1:0",
		Strategy:    strategy.Config{Policy: strategy.PolicyQEMU},
	})
	fmt.Println("destination gone:", errors.Is(err, engine.ErrDestinationGone))
	fmt.Println("the guest runs on the source:", vms.SrcRunState())
	// Output:
	// destination gone: true
	// the guest runs on the source: running
}
