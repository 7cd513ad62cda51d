package fleet_test

import (
	"context"
	"fmt"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
	"github.com/qmigrate/qmigrate/qemutest"
)

// Drain host "a": three guests, at most two at once, sharing 64 MiB/s of
// a's bandwidth. Fake QEMUs (qemutest) stand in for real ones; with real
// QEMUs set Endpoint.Address to their QMP sockets instead.
func Example() {
	ctx := context.Background()
	var plan fleet.Plan
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		vms := qemutest.New(qemutest.Options{RAM: 16 << 20})
		defer vms.Close()
		src, dst, err := vms.Clients(ctx)
		if err != nil {
			fmt.Println(err)
			return
		}
		defer src.Close()
		defer dst.Close()
		plan.Migrations = append(plan.Migrations, fleet.Migration{
			Name: name, SourceHost: "a", DestinationHost: "b",
			Config: engine.Config{
				Source:      engine.Endpoint{Client: src},
				Destination: engine.Endpoint{Client: dst},
				URI:         "tcp:127.0.0.1:0",
			},
		})
	}
	plan.Limits = fleet.Limits{MaxParallel: 2, HostBandwidth: map[string]uint64{"a": 64 << 20}}
	rep, err := fleet.Run(ctx, plan)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, r := range rep.Results {
		fmt.Println(r.Name, r.Outcome)
	}
	fmt.Println("completed", rep.Summary.Completed, "of", len(rep.Results))
	// Output:
	// vm1 completed
	// vm2 completed
	// vm3 completed
	// completed 3 of 3
}
