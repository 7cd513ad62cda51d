package qmp_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// goldenRoot holds replies captured from real QEMU by qmp/internal/capture.
const goldenRoot = "../testdata/qmp"

var goldenVersions = []string{"7.2", "10.0"}

// goldenFiles returns the contents of every golden file under dir (relative
// to a version folder), across versions.
func goldenFiles(tb testing.TB, dir string) [][]byte {
	tb.Helper()
	var out [][]byte
	for _, v := range goldenVersions {
		for _, p := range goldenPaths(tb, v, dir) {
			out = append(out, readGolden(tb, p))
		}
	}
	return out
}

func goldenPaths(tb testing.TB, version, dir string) []string {
	tb.Helper()
	paths, err := filepath.Glob(filepath.Join(goldenRoot, version, dir, "*.json"))
	if err != nil {
		tb.Fatal(err)
	}
	return paths
}

func readGolden(tb testing.TB, path string) []byte {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func compact(tb testing.TB, b []byte) []byte {
	tb.Helper()
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		tb.Fatal(err)
	}
	return out.Bytes()
}

// goldenName is "src-active" for ".../query-migrate/src-active.json".
func goldenName(path string) string {
	return strings.TrimSuffix(filepath.Base(path), ".json")
}

func TestGoldenQueryMigrate(t *testing.T) {
	for _, v := range goldenVersions {
		paths := goldenPaths(t, v, "query-migrate")
		require.GreaterOrEqual(t, len(paths), 18, "captures for %s", v)
		for _, p := range paths {
			name := goldenName(p)
			t.Run(v+"/"+name, func(t *testing.T) {
				raw := readGolden(t, p)
				var info qmp.MigrationInfo
				require.NoError(t, json.Unmarshal(raw, &info))
				want := strings.SplitN(name, "-", 2)[1]
				switch {
				case want == "postcopy-completed":
					want = "completed"
				case v == "7.2" && name == "dst-setup":
					// 7.2 emits MIGRATION {setup} on a listening destination
					// but query-migrate then has no status at all.
					want = "none"
				}
				assert.Equal(t, qmp.MigrationStatus(want), info.Status)
				assert.JSONEq(t, string(raw), string(info.Raw))
				src := strings.HasPrefix(name, "src-")

				switch info.Status {
				case qmp.StatusActive, qmp.StatusPostcopyActive, qmp.StatusPostcopyPaused, qmp.StatusPostcopyRecover,
					qmp.StatusPreSwitchover, qmp.StatusCompleted, qmp.StatusCancelling:
					if !src {
						break
					}
					require.NotNil(t, info.RAM, "ram stats")
					assert.Equal(t, uint64(4096), info.RAM.PageSize)
					assert.Greater(t, info.RAM.Total, uint64(60<<20), "64 MiB guest")
					assert.Positive(t, info.RAM.Transferred)
					assert.Positive(t, info.RAM.DirtySyncCount)
					assert.Positive(t, info.TotalTime)
					assert.Equal(t, time.Duration(0), info.TotalTime%time.Millisecond, "milliseconds converted")
				case qmp.StatusNone, qmp.StatusSetup, qmp.StatusCancelled:
					assert.Nil(t, info.RAM)
				case qmp.StatusFailed:
					if src {
						assert.Contains(t, info.ErrorDesc, "Failed to connect")
					} else {
						assert.Contains(t, info.ErrorDesc, "load of migration failed")
					}
				}
				if info.Status == qmp.StatusCompleted && src {
					assert.Zero(t, info.RAM.Remaining)
					assert.Positive(t, info.Downtime)
					assert.Positive(t, info.RAM.Throughput())
				}
				if name == "src-active" {
					assert.Positive(t, info.ExpectedDowntime)
					assert.Positive(t, info.RAM.Remaining)
					assert.Positive(t, info.RAM.NormalBytes)
				}
				if name == "dst-setup" {
					require.Len(t, info.SocketAddress, 1)
					assert.Equal(t, "unix", info.SocketAddress[0].Type)
					assert.True(t, strings.HasSuffix(info.SocketAddress[0].Path, "mig.sock"))
				}
				assert.Equal(t, strings.HasPrefix(string(info.Status), "postcopy-"), info.Status.Postcopy())
				assert.Equal(t, info.Status == qmp.StatusCompleted || info.Status == qmp.StatusFailed || info.Status == qmp.StatusCancelled, info.Status.Terminal())
			})
		}
	}
}

func TestGoldenBlockJobs(t *testing.T) {
	for _, v := range goldenVersions {
		dir := filepath.Join(goldenRoot, v)
		var jobs []qmp.BlockJobInfo
		require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(dir, "query-block-jobs/none.json")), &jobs))
		assert.Empty(t, jobs)

		require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(dir, "query-block-jobs/mirror-running.json")), &jobs))
		require.Len(t, jobs, 1)
		j := jobs[0]
		assert.Equal(t, "mirror", j.Type)
		assert.Equal(t, "mirror0", j.Device)
		assert.Equal(t, "running", j.Status)
		assert.False(t, j.Ready)
		assert.Equal(t, uint64(8<<20), j.Len)
		assert.Less(t, j.Offset, j.Len)
		assert.Equal(t, uint64(512<<10), j.Speed)
		assert.True(t, j.AutoFinalize)
		assert.Equal(t, "ok", j.IOStatus)

		require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(dir, "query-block-jobs/mirror-ready.json")), &jobs))
		require.Len(t, jobs, 1)
		j = jobs[0]
		assert.Equal(t, "ready", j.Status)
		assert.True(t, j.Ready)
		assert.Equal(t, j.Len, j.Offset)
		assert.Zero(t, j.Speed)

		var gj []qmp.JobInfo
		require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(dir, "query-jobs/mirror-ready.json")), &gj))
		require.Len(t, gj, 1)
		assert.Equal(t, qmp.JobInfo{ID: "mirror0", Type: "mirror", Status: "ready", CurrentProgress: 8 << 20, TotalProgress: 8 << 20}, gj[0])
	}
}

func TestGoldenParametersAndCapabilities(t *testing.T) {
	for _, v := range goldenVersions {
		dir := filepath.Join(goldenRoot, v)
		var p qmp.MigrationParameters
		require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(dir, "query-migrate-parameters.json")), &p))
		require.NotNil(t, p.MaxBandwidth)
		assert.Equal(t, uint64(128<<20), *p.MaxBandwidth, "QEMU's default")
		assert.Equal(t, 300*time.Millisecond, p.DowntimeLimitDuration())
		require.NotNil(t, p.MultifdChannels)
		assert.Equal(t, 2, *p.MultifdChannels)
		require.NotNil(t, p.TLSCreds)
		assert.Equal(t, "", *p.TLSCreds)

		require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(dir, "query-migrate-parameters-during.json")), &p))
		assert.Equal(t, uint64(4<<20), *p.MaxBandwidth)

		var caps []qmp.MigrationCapabilityStatus
		require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(dir, "query-migrate-capabilities.json")), &caps))
		assert.GreaterOrEqual(t, len(caps), 15)
		f := schemaFeatures(t, v)
		for _, c := range caps {
			assert.False(t, c.State, c.Capability)
			assert.True(t, f.HasCapability(c.Capability), "schema knows capability %s", c.Capability)
		}
		assert.Len(t, f.MigrationCapabilities, len(caps), "schema and query list the same capabilities")
	}
}

func schemaFeatures(t *testing.T, version string) *qmp.Features {
	t.Helper()
	var schema []qmp.SchemaInfo
	require.NoError(t, json.Unmarshal(readGolden(t, filepath.Join(goldenRoot, version, "query-qmp-schema.json")), &schema))
	require.Greater(t, len(schema), 1000)
	return qmp.FeaturesFromSchema(schema)
}

func TestGoldenSchemaFeatures(t *testing.T) {
	old := schemaFeatures(t, "7.2")
	assert.False(t, old.MigrateChannels, "7.2 migrate has no channels")
	assert.False(t, old.IncomingExitOnError, "7.2 migrate-incoming has no exit-on-error")
	assert.False(t, old.BlockJobChange, "7.2 has no block-job-change")
	assert.False(t, old.MirrorTargetIsZero)
	assert.True(t, old.HasCapability("block"), "legacy block migration exists in 7.2")
	assert.False(t, old.HasCapability("switchover-ack"))
	assert.False(t, old.HasParameter("avail-switchover-bandwidth"))

	cur := schemaFeatures(t, "10.0")
	assert.True(t, cur.MigrateChannels, "10.0 migrate takes channels")
	assert.True(t, cur.IncomingExitOnError, "10.0 migrate-incoming takes exit-on-error")
	assert.True(t, cur.BlockJobChange, "10.0 has block-job-change")
	assert.False(t, cur.MirrorTargetIsZero, "target-is-zero is 10.1+")
	assert.False(t, cur.HasCapability("block"), "legacy block migration is gone")
	assert.True(t, cur.HasCapability("switchover-ack"))
	assert.True(t, cur.HasParameter("avail-switchover-bandwidth"))
	assert.True(t, cur.MigrationStatuses["postcopy-recover-setup"])

	for _, f := range []*qmp.Features{old, cur} {
		for _, c := range []string{"events", "postcopy-ram", "pause-before-switchover", "multifd", "auto-converge", "return-path", "late-block-activate", "validate-uuid"} {
			assert.True(t, f.HasCapability(c), c)
		}
		for _, p := range []string{"max-bandwidth", "downtime-limit", "multifd-channels", "max-postcopy-bandwidth", "tls-creds", "cpu-throttle-initial", "announce-initial"} {
			assert.True(t, f.HasParameter(p), p)
		}
		for _, s := range []string{"none", "setup", "active", "completed", "failed", "cancelled", "cancelling", "pre-switchover", "device", "postcopy-active", "postcopy-paused", "wait-unplug"} {
			assert.True(t, f.MigrationStatuses[s], s)
		}
		for _, c := range []string{"migrate", "migrate-incoming", "query-migrate", "blockdev-mirror", "block-job-cancel", "nbd-server-start", "block-export-add", "getfd", "closefd", "add-fd", "query-qmp-schema"} {
			assert.True(t, f.HasCommand(c), c)
		}
		assert.True(t, f.OOBCommands["migrate-recover"])
		assert.True(t, f.OOBCommands["migrate-pause"])
		assert.False(t, f.OOBCommands["migrate"])
		assert.True(t, f.Events["MIGRATION"])
		assert.True(t, f.Events["BLOCK_JOB_READY"])
		assert.True(t, f.Events["STOP"])
	}
}

// The typed helpers, fed the captured replies through the fake monitor.
func TestGoldenThroughClient(t *testing.T) {
	for _, v := range goldenVersions {
		t.Run(v, func(t *testing.T) {
			dir := filepath.Join(goldenRoot, v)
			file := func(name string) json.RawMessage { return readGolden(t, filepath.Join(dir, name)) }
			major, minor := 7, 2
			if v == "10.0" {
				major, minor = 10, 0
			}
			s, c := fake(t, qmptest.WithVersion(major, minor, 0))
			s.Handle("query-migrate", qmptest.Return(file("query-migrate/src-active.json")))
			s.Handle("query-block-jobs", qmptest.Return(file("query-block-jobs/mirror-ready.json")))
			s.Handle("query-jobs", qmptest.Return(file("query-jobs/mirror-running.json")))
			s.Handle("query-status", qmptest.Return(file("query-status/postmigrate.json")))
			s.Handle("query-version", qmptest.Return(file("query-version.json")))
			s.Handle("query-migrate-parameters", qmptest.Return(file("query-migrate-parameters.json")))
			s.Handle("query-migrate-capabilities", qmptest.Return(file("query-migrate-capabilities.json")))
			s.Handle("query-block", qmptest.Return(file("query-block.json")))
			s.Handle("query-named-block-nodes", qmptest.Return(file("query-named-block-nodes.json")))
			s.Handle("query-qmp-schema", qmptest.Return(file("query-qmp-schema.json")))
			ctx := t.Context()

			info, err := c.QueryMigrate(ctx)
			require.NoError(t, err)
			assert.Equal(t, qmp.StatusActive, info.Status)
			jobs, err := c.QueryBlockJobs(ctx)
			require.NoError(t, err)
			assert.True(t, jobs[0].Ready)
			gj, err := c.QueryJobs(ctx)
			require.NoError(t, err)
			assert.Equal(t, "running", gj[0].Status)
			st, err := c.QueryStatus(ctx)
			require.NoError(t, err)
			assert.Equal(t, qmp.StatusInfo{Status: "postmigrate"}, *st)
			ver, err := c.QueryVersion(ctx)
			require.NoError(t, err)
			assert.Equal(t, major, ver.QEMU.Major)
			assert.Equal(t, minor, ver.QEMU.Minor)
			assert.Contains(t, ver.Package, "Debian")
			p, err := c.QueryMigrateParameters(ctx)
			require.NoError(t, err)
			assert.Equal(t, uint64(128<<20), *p.MaxBandwidth)
			caps, err := c.QueryMigrateCapabilities(ctx)
			require.NoError(t, err)
			assert.Contains(t, caps, "postcopy-ram")
			blocks, err := c.QueryBlock(ctx)
			require.NoError(t, err)
			var found bool
			for _, b := range blocks {
				if b.Inserted != nil && b.Inserted.NodeName == "disk0" {
					found = true
					assert.Equal(t, "raw", b.Inserted.Driver)
					require.NotNil(t, b.Inserted.Image)
					assert.Equal(t, uint64(8<<20), b.Inserted.Image.VirtualSize)
				}
			}
			assert.True(t, found, "disk0 in query-block")
			nodes, err := c.QueryNamedBlockNodes(ctx)
			require.NoError(t, err)
			names := map[string]string{}
			for _, n := range nodes {
				names[n.NodeName] = n.Driver
			}
			assert.Equal(t, "null-co", names["target0"])
			assert.Equal(t, "file", names["disk0-file"])
			f, err := c.ProbeFeatures(ctx)
			require.NoError(t, err)
			assert.Equal(t, v == "10.0", f.MigrateChannels)
			assert.Equal(t, major, f.Version.Major)
		})
	}
}

// Real event sequences replayed through the client's reader and fan-out.
func TestGoldenEvents(t *testing.T) {
	for _, v := range goldenVersions {
		for _, p := range goldenPaths(t, v, "events") {
			t.Run(v+"/"+goldenName(p), func(t *testing.T) {
				var evs []struct {
					Event string          `json:"event"`
					Data  json.RawMessage `json:"data"`
				}
				require.NoError(t, json.Unmarshal(readGolden(t, p), &evs))
				require.NotEmpty(t, evs)
				s, c := fake(t)
				sub := c.Subscribe(qmp.EventFilter{Buffer: len(evs)})
				defer sub.Close()
				for _, e := range evs {
					line, err := json.Marshal(map[string]any{"event": e.Event, "data": e.Data,
						"timestamp": map[string]int{"seconds": 1, "microseconds": 0}})
					require.NoError(t, err)
					s.SendRaw(string(line))
				}
				for _, e := range evs {
					got := <-sub.C
					assert.Equal(t, e.Event, got.Name)
					switch got.Name {
					case "MIGRATION":
						var d struct{ Status qmp.MigrationStatus }
						require.NoError(t, got.Decode(&d))
						assert.NotEmpty(t, d.Status)
						assert.Equal(t, string(d.Status), got.Field("status"))
					case "MIGRATION_PASS":
						var d struct{ Pass int }
						require.NoError(t, got.Decode(&d))
						assert.Positive(t, d.Pass)
					case "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE":
						assert.True(t, qmp.ForDevice("mirror0")(got))
					}
				}
			})
		}
	}
}

func TestGoldenErrors(t *testing.T) {
	for _, v := range goldenVersions {
		for _, p := range goldenPaths(t, v, "errors") {
			t.Run(v+"/"+goldenName(p), func(t *testing.T) {
				var e struct{ Class, Desc string }
				require.NoError(t, json.Unmarshal(readGolden(t, p), &e))
				s, c := fake(t)
				s.Handle("cmd", qmptest.Fail(e.Class, e.Desc))
				err := c.Execute(t.Context(), "cmd", nil, nil)
				var qe *qmp.Error
				require.ErrorAs(t, err, &qe)
				assert.Equal(t, e.Class, qe.Class)
				assert.Equal(t, e.Desc, qe.Desc)
				assert.Equal(t, goldenName(p) == "command-not-found", qmp.IsCommandNotFound(err))
			})
		}
	}
}

// The argument errors QEMU gives for the forms of migrate and
// migrate-incoming it may not know, captured from real QEMU, are what
// qmptest.CheckArgs answers for that version's declared arguments (so the
// fakes refuse exactly as QEMU does), and a form with no capture was
// accepted there, as CheckArgs accepts it. The errors name the argument for
// IsUnexpectedArgument and IsMissingArgument.
func TestGoldenArgumentErrors(t *testing.T) {
	declared := map[string]map[string][]string{
		"7.2": {
			"migrate-incoming": {"uri"},
			"migrate":          {"uri", "*blk", "*inc", "*detach", "*resume"},
		},
		"10.0": {
			"migrate-incoming": {"*uri", "*channels", "*exit-on-error"},
			"migrate":          {"*uri", "*channels", "*detach", "*resume"},
		},
	}
	channels := `[{"channel-type":"main","addr":{"transport":"socket","type":"unix","path":"/tmp/mig.sock"}}]`
	requests := []struct {
		file, cmd, args string
		missing, extra  string // the argument the error names, if refused
	}{
		{"migrate-incoming-channels", "migrate-incoming", `{"channels":` + channels + `}`, "uri", ""},
		{"migrate-incoming-exit-on-error", "migrate-incoming", `{"uri":"unix:/tmp/mig.sock","exit-on-error":true}`, "", "exit-on-error"},
		{"migrate-incoming-unexpected", "migrate-incoming", `{"uri":"unix:/tmp/mig.sock","no-such-argument":true}`, "", "no-such-argument"},
		{"migrate-channels", "migrate", `{"channels":` + channels + `}`, "uri", ""},
		{"migrate-unexpected", "migrate", `{"uri":"unix:/tmp/mig.sock","no-such-argument":true}`, "", "no-such-argument"},
	}
	for _, v := range goldenVersions {
		for _, r := range requests {
			t.Run(v+"/"+r.file, func(t *testing.T) {
				got := qmptest.CheckArgs(json.RawMessage(r.args), declared[v][r.cmd]...)
				want, err := qmptest.CapturedError(filepath.Join(goldenRoot, v, "errors", r.file+".json"))
				require.NoError(t, err)
				require.NoError(t, qmptest.MatchError(got, want), "QEMU %s", v)
				if want == nil {
					return
				}
				assert.Equal(t, r.missing != "", qmp.IsMissingArgument(want, r.missing))
				assert.Equal(t, r.extra != "", qmp.IsUnexpectedArgument(want, r.extra))
				assert.False(t, qmp.IsUnexpectedArgument(want, "uri"))
			})
		}
	}
}
