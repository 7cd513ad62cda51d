package linux_test

import (
	"fmt"

	"github.com/qmigrate/qmigrate/internal/guest/linux"
)

func ExampleWorkload_Cmdline() {
	w := linux.Workload{Mode: linux.ModeMemDirty, MemBytes: 256 << 20, RateBytes: 50 << 20}
	fmt.Println(w.Cmdline())
	// Output: console=ttyS0 quiet loglevel=1 panic=0 no_timer_check mitigations=off qmigrate.mode=memdirty qmigrate.mem=268435456 qmigrate.rate=52428800
}

func ExampleParseLine() {
	l, ok := linux.ParseLine("QMIGRATE CHECK FAIL pass=13 page=4711 want=13 got=12 state=stale\r")
	fmt.Println(ok, l.Kind, l.Status, l.Fields["page"], l.Failed())
	// Output: true CHECK FAIL 4711 true
}
