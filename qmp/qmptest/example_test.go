package qmptest_test

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// A fake QEMU that answers stop with a STOP event, and one command that fails.
func Example() {
	s := qmptest.NewServer(qmptest.WithVersion(7, 2, 22))
	defer s.Close()
	s.Handle("stop", func(json.RawMessage) (any, error) {
		s.Emit("STOP", nil)
		return nil, nil
	})
	s.Handle("migrate-continue", qmptest.Fail("GenericError", "Migration not in expected state: active"))

	ctx := context.Background()
	c, err := s.Client(ctx)
	if err != nil {
		panic(err)
	}
	defer c.Close()
	fmt.Println("QEMU", c.Version())

	sub := c.SubscribeNames("STOP")
	defer sub.Close()
	if err := c.Stop(ctx); err != nil {
		panic(err)
	}
	fmt.Println("event", (<-sub.C).Name)

	err = c.MigrateContinue(ctx, qmp.StatusPreSwitchover)
	fmt.Println(err)
	fmt.Println(len(s.Calls()), "calls")
	// Output:
	// QEMU 7.2.22
	// event STOP
	// qmp: migrate-continue: Migration not in expected state: active (GenericError)
	// 2 calls
}
