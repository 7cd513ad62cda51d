package qemutest_test

import (
	"context"
	"encoding/json"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
)

// Options.DstDeviceLoad: a link reset while the destination loads the
// device state in postcopy holds its in-band commands; exec-oob
// migrate-recover and the MIGRATION events still go through, and once the
// recovery brings the link back the load ends, the held command is
// answered and the guest runs there. 7.2 and 10.0 alike (10.0 adds
// postcopy-recover-setup).
func TestDstDeviceLoadHoldsInBand(t *testing.T) {
	for _, v := range [][3]int{{7, 2, 22}, {10, 0, 2}} {
		t.Run(qmp.Version{Major: v[0], Minor: v[1], Micro: v[2]}.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p := qemutest.New(qemutest.Options{Version: v, Throughput: 100 << 20, PostcopyRate: 10 << 20, DstDeviceLoad: 2 * time.Second})
				defer p.Close()
				src, dst, err := p.Clients(t.Context())
				require.NoError(t, err)
				defer src.Close()
				defer dst.Close()
				ctx := t.Context()
				caps := map[string]bool{"events": true, "postcopy-ram": true}
				require.NoError(t, src.MigrateSetCapabilities(ctx, caps))
				require.NoError(t, dst.MigrateSetCapabilities(ctx, caps))
				sub := dst.SubscribeNames("MIGRATION")
				defer sub.Close()
				require.NoError(t, dst.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: "tcp:127.0.0.1:4444"}))
				require.NoError(t, src.Migrate(ctx, qmp.MigrateArgs{URI: "tcp:127.0.0.1:4444"}))
				require.NoError(t, src.MigrateStartPostcopy(ctx))
				for p.Status() != qmp.StatusPostcopyActive {
					time.Sleep(10 * time.Millisecond)
				}
				assert.True(t, p.DstLoading())
				assert.Equal(t, "inmigrate", p.DstRunState(), "the guest runs once the device state is loaded")
				time.Sleep(500 * time.Millisecond)
				p.LinkReset()
				for p.DstStatus() != qmp.StatusPostcopyPaused {
					time.Sleep(10 * time.Millisecond)
				}

				held := make(chan *qmp.MigrationInfo, 1)
				go func() {
					info, err := dst.QueryMigrate(context.WithoutCancel(ctx))
					assert.NoError(t, err)
					held <- info
				}()
				time.Sleep(5 * time.Second)
				synctest.Wait()
				assert.Empty(t, held, "in-band commands wait while the load waits for the link")
				assert.Equal(t, qmp.StatusPostcopyPaused, lastStatus(sub), "events still sent")

				require.NoError(t, dst.MigrateRecover(ctx, "tcp:127.0.0.1:4444"))
				assert.True(t, p.Dst.CallsOf("migrate-recover")[0].OOB)
				require.NoError(t, src.Migrate(ctx, qmp.MigrateArgs{URI: "tcp:127.0.0.1:4444", Resume: true}))
				for p.Recoveries() == 0 {
					time.Sleep(10 * time.Millisecond)
				}
				synctest.Wait() // the events sent reach sub
				assert.Equal(t, qmp.StatusPostcopyActive, lastStatus(sub))
				assert.True(t, p.DstLoading(), "1.5 s of the load left")
				info := <-held
				assert.Equal(t, qmp.StatusPostcopyActive, info.Status, "answered once loaded, with the status then")
				assert.False(t, p.DstLoading())
				assert.Equal(t, "running", p.DstRunState())
			})
		})
	}
}

// lastStatus drains sub and returns the last MIGRATION status it carried.
func lastStatus(sub *qmp.Subscription) qmp.MigrationStatus {
	var st qmp.MigrationStatus
	for {
		select {
		case ev := <-sub.C:
			var d struct {
				Status qmp.MigrationStatus `json:"status"`
			}
			_ = json.Unmarshal(ev.Data, &d)
			st = d.Status
		default:
			return st
		}
	}
}
