package blockmirror

import (
	"context"
	"fmt"

	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
)

// The storage part of a migration, against a fake QEMU pair. The real engine runs
// migrate-incoming/migrate after WaitReady and calls Finish when the source
// reaches pre-switchover.
func Example() {
	vms := qemutest.New(qemutest.Options{
		Disks:      []qmp.BlockInfo{blk("disk0", "/var/lib/vm/a.qcow2", 1<<30, false)},
		DstDisks:   []qmp.BlockInfo{blk("disk0", "/var/lib/vm/a.qcow2", 1<<30, false)},
		MirrorRate: qemutest.MirrorManual,
	})
	defer vms.Close()
	ctx := context.Background()
	src, dst, err := vms.Clients(ctx)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer src.Close()
	defer dst.Close()
	f := &qmp.Features{}

	s, err := Start(ctx, Config{}, Env{
		Source:      QEMU{Client: src, Features: f},
		Destination: QEMU{Client: dst, Features: f},
		Migration:   qmp.TCPAddress("198.18.0.2", "4444"),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	vms.Src.SetMirrorProgress(1<<30, true) // the fake copies everything at once
	err = s.WaitReady(ctx, func(p []Progress) {
		fmt.Printf("%s: %d/%d ready=%v\n", p[0].Node, p[0].Done, p[0].Total, p[0].Ready)
	})
	fmt.Println("ready:", err)
	// ... migrate, wait for pre-switchover ...
	fmt.Println("finish:", s.Finish(ctx))
	// ... migrate-continue, wait for completed ...
	fmt.Println("cleanup:", s.Cleanup(ctx))
	fmt.Println((&fakeQEMU{QEMU: vms.Dst}).commands())
	// Output:
	// disk0: 1073741824/1073741824 ready=true
	// ready: <nil>
	// finish: <nil>
	// cleanup: <nil>
	// [nbd-server-start block-export-add block-export-del nbd-server-stop]
}
