package strategy_test

import (
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/strategy"
)

// A guest whose 128 MiB working set is re-dirtied every pass over a
// 256 MiB/s link: auto sees it at the second iteration. With postcopy not
// permitted, it raises the downtime limit to the user's maximum, then
// computes a throttle instead of ramping blindly: one that lets the next
// pass leave no more than a switchover at that maximum sends.
func ExampleMachine() {
	m, err := strategy.New(strategy.Config{}) // auto, 300 ms max downtime, throttling permitted
	if err != nil {
		panic(err)
	}
	setup := m.Setup()
	fmt.Printf("setup: downtime %v, auto-converge %v, held at %d%%\n", setup.DowntimeLimit, setup.AutoConverge, setup.Throttle.Max)

	const MiB = 1 << 20
	limit := setup.DowntimeLimit
	for i, peak := range []uint64{256 * MiB, 128 * MiB, 128 * MiB} {
		s := strategy.Sample{
			Elapsed: time.Duration(i) * 500 * time.Millisecond, Status: "active",
			Iteration: uint64(i + 1), RemainingBytes: peak, TransferredBytes: uint64(i) * 128 * MiB,
			TotalBytes: 256 * MiB, Throughput: 256 * MiB, DowntimeLimit: limit,
		}
		if i > 0 {
			s.DirtyRate = 256 * MiB // QEMU measures it from the second sync on
		}
		d := m.Step(s)
		switch d.Action {
		case strategy.SetDowntime:
			fmt.Println(d.At, d.Action, d.DowntimeLimit)
			limit = d.DowntimeLimit
		case strategy.SetThrottle:
			fmt.Printf("%v %s %d%%\n", d.At, d.Action, d.Throttle.Max)
		default:
			fmt.Println(d.At, d.Action)
		}
		if d.Action != strategy.Wait {
			m.Applied(d, nil) // after applying it with migrate-set-parameters
		}
	}
	// Output:
	// setup: downtime 100ms, auto-converge true, held at 1%
	// 0s wait
	// 500ms set-downtime 300ms
	// 1s set-throttle 76%
}

// The Nova preset ramps the downtime limit; its times scale with the
// configuration so it can be shown in seconds instead of an hour.
func ExampleConfig_nova() {
	m, _ := strategy.New(strategy.Config{
		Policy: "nova",
		Nova:   strategy.NovaConfig{Steps: 3, DelayPerGiB: time.Second},
		Limits: strategy.Limits{MaxDowntime: time.Second},
	})
	fmt.Println("setup:", m.Setup().DowntimeLimit)
	for t := time.Second; t <= 8*time.Second; t += time.Second {
		d := m.Step(strategy.Sample{Elapsed: t, Status: "active", TotalBytes: 1 << 30, RemainingBytes: 1 << 29})
		if d.Action != strategy.Wait {
			fmt.Println(d.At, d.Action, d.DowntimeLimit)
		}
	}
	// Output:
	// setup: 166ms
	// 3s set-downtime 277ms
	// 5s set-downtime 388ms
	// 7s set-downtime 500ms
}

func ExampleConfig_Validate() {
	fmt.Println(strategy.Config{Policy: "libvirt"}.Validate())
	fmt.Println(strategy.Config{Limits: strategy.Limits{MaxDowntime: -time.Second}}.Validate())
	// Output:
	// strategy: Config.Policy "libvirt" is unknown; valid: auto, qemu, kubevirt, nova, proxmox
	// strategy: Limits.MaxDowntime -1s must not be negative
}
