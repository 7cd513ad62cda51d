package blockmirror

import (
	"context"
	"fmt"
	"testing"

	"github.com/qmigrate/qmigrate/qmp"
)

// The storage part of a migration, against fake QEMUs. The real engine runs
// migrate-incoming/migrate after WaitReady and calls Finish when the source
// reaches pre-switchover.
func Example() {
	t := &testing.T{}
	src := newFake(t, blk("disk0", "/var/lib/vm/a.qcow2", 1<<30, false))
	dst := newFake(t, blk("disk0", "/var/lib/vm/a.qcow2", 1<<30, false))
	defer src.s.Close()
	defer dst.s.Close()
	ctx := context.Background()
	f := &qmp.Features{}

	s, err := Start(ctx, Config{}, Env{
		Source:      QEMU{Client: src.c, Features: f},
		Destination: QEMU{Client: dst.c, Features: f},
		Migration:   qmp.TCPAddress("198.18.0.2", "4444"),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	src.progress(1<<30, true) // the fake copies everything at once
	err = s.WaitReady(ctx, func(p []Progress) {
		fmt.Printf("%s: %d/%d ready=%v\n", p[0].Node, p[0].Done, p[0].Total, p[0].Ready)
	})
	fmt.Println("ready:", err)
	// ... migrate, wait for pre-switchover ...
	fmt.Println("finish:", s.Finish(ctx))
	// ... migrate-continue, wait for completed ...
	fmt.Println("cleanup:", s.Cleanup(ctx))
	fmt.Println(dst.commands())
	// Output:
	// disk0: 1073741824/1073741824 ready=true
	// ready: <nil>
	// finish: <nil>
	// cleanup: <nil>
	// [nbd-server-start block-export-add block-export-del nbd-server-stop]
}
