package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/fleet"
	"github.com/qmigrate/qmigrate/qemutest"
)

// The commented example plan parses, with its defaults, overrides and
// limits as documented.
func TestEvacuateExamplePlan(t *testing.T) {
	data, err := os.ReadFile("testdata/evacuate-plan.yaml")
	require.NoError(t, err)
	pf, err := readPlan(data)
	require.NoError(t, err)
	p, err := buildPlan(pf, nil)
	require.NoError(t, err)
	assert.Equal(t, fleet.Limits{MaxParallel: 3, MaxPerSource: 2, MaxPerDestination: 2,
		HostBandwidth: map[string]uint64{"hostA": 64 << 20, "hostB": 1 << 30}}, p.Limits)
	require.Len(t, p.Migrations, 3)
	vm1, vm2, db1 := p.Migrations[0], p.Migrations[1], p.Migrations[2]
	assert.Equal(t, "unix:/run/vm1-src.qmp", vm1.Config.Source.Address.String())
	assert.Equal(t, "unix:/run/vm1.sock", vm1.Config.URI)
	assert.Equal(t, "hostA", vm1.SourceHost)
	assert.Equal(t, 300*time.Millisecond, vm1.Config.Strategy.Limits.MaxDowntime)
	assert.Equal(t, 10*time.Minute, vm1.Config.Strategy.Limits.Budget)
	assert.False(t, vm1.Config.Strategy.Limits.AllowPostcopy)
	assert.Equal(t, time.Second, vm2.Config.Strategy.Limits.MaxDowntime)
	assert.True(t, vm2.Config.Strategy.Limits.AllowPostcopy)
	assert.Equal(t, 10, vm2.Priority)
	require.NotNil(t, db1.Config.Storage)
	assert.Equal(t, []string{"disk0"}, db1.Config.Storage.Disks)
	assert.Nil(t, vm1.Config.Storage)

	// The command line's settings override the defaults; a migration's
	// own keys override both.
	p, err = buildPlan(pf, []string{"--max-downtime=500ms", "--allow-pause=true"})
	require.NoError(t, err)
	assert.Equal(t, 500*time.Millisecond, p.Migrations[0].Config.Strategy.Limits.MaxDowntime)
	assert.True(t, p.Migrations[0].Config.Strategy.Limits.AllowPause)
	assert.Equal(t, time.Second, p.Migrations[1].Config.Strategy.Limits.MaxDowntime)
}

// JSON with the same keys is the same plan.
func TestEvacuateJSONPlan(t *testing.T) {
	js := `{"limits": {"max_parallel": 2, "host_bandwidth": {"a": "32MiB"}},
	  "defaults": {"max_downtime": "400ms", "multifd": 4},
	  "migrations": [{"name": "x", "source_host": "a", "destination_host": "b",
	    "src": "unix:/s", "dst": "unix:/d", "uri": "unix:/m", "bandwidth": "16MiB"}]}`
	pf, err := readPlan([]byte(js))
	require.NoError(t, err)
	p, err := buildPlan(pf, nil)
	require.NoError(t, err)
	assert.Equal(t, 2, p.Limits.MaxParallel)
	assert.Equal(t, uint64(32<<20), p.Limits.HostBandwidth["a"])
	m := p.Migrations[0]
	assert.Equal(t, 400*time.Millisecond, m.Config.Strategy.Limits.MaxDowntime)
	assert.Equal(t, 4, m.Config.MultifdChannels)
	assert.Equal(t, uint64(16<<20), m.Config.Bandwidth)
}

// A bad plan exits 2 with a message that names the entry and the key.
func TestEvacuateBadPlanExit2(t *testing.T) {
	mig := "  - {name: vm1, source_host: a, destination_host: b, src: 'unix:/s', dst: 'unix:/d', uri: 'unix:/m'%s}\n"
	for _, tc := range []struct {
		name, plan string
		want       []string
	}{
		{"unknown top key", "limts: {}\nmigrations:\n" + fmt.Sprintf(mig, ""), []string{"plan: plan: limts", "unknown key"}},
		{"unknown migration key", "migrations:\n" + fmt.Sprintf(mig, ", dts: x"), []string{"migration vm1 (#1): dts", "unknown key"}},
		{"unknown limits key", "limits: {max_paralel: 2}\nmigrations:\n" + fmt.Sprintf(mig, ""), []string{"limits: max_paralel"}},
		{"bad duration", "migrations:\n" + fmt.Sprintf(mig, ", max_downtime: 3"), []string{"migration vm1 (#1): max_downtime", "no unit"}},
		{"bad default", "defaults: {bandwidth: fast}\nmigrations:\n" + fmt.Sprintf(mig, ""), []string{"defaults: bandwidth", "not a size"}},
		{"bad policy", "migrations:\n" + fmt.Sprintf(mig, ", policy: fastest"), []string{"migration vm1 (#1): policy", "unknown policy"}},
		{"missing src", "migrations:\n  - {name: vm1, source_host: a, destination_host: b, dst: 'unix:/d', uri: 'unix:/m'}\n", []string{"migration vm1 (#1)", "src is required"}},
		{"bad uri", "migrations:\n  - {name: vm1, source_host: a, destination_host: b, src: 'unix:/s', dst: 'unix:/d', uri: 'exec:cat'}\n", []string{"migration vm1 (#1)", "uri", "exec:"}},
		{"missing host", "migrations:\n  - {name: vm1, destination_host: b, src: 'unix:/s', dst: 'unix:/d', uri: 'unix:/m'}\n", []string{"migration vm1 (#1): source_host", "missing"}},
		{"missing name", "migrations:\n  - {source_host: a, destination_host: b, src: 'unix:/s', dst: 'unix:/d', uri: 'unix:/m'}\n", []string{"migration #1: name", "missing"}},
		{"duplicate name", "migrations:\n" + fmt.Sprintf(mig, "") + fmt.Sprintf(mig, ""), []string{"migration vm1 (#2): name", "#1"}},
		{"budget of no source", "limits: {host_bandwidth: {c: 1GiB}}\nmigrations:\n" + fmt.Sprintf(mig, ""), []string{"limits: host_bandwidth", `"c"`}},
		{"bad budget", "limits: {host_bandwidth: {a: lots}}\nmigrations:\n" + fmt.Sprintf(mig, ""), []string{"limits: host_bandwidth: a", "not a size"}},
		{"no migrations", "limits: {max_parallel: 1}\n", []string{"migrations: none"}},
		{"bad order", "order: random\nmigrations:\n" + fmt.Sprintf(mig, ""), []string{"order", "smallest-first"}},
		{"not yaml", "migrations: [\n", []string{"plan: file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "plan.yaml")
			require.NoError(t, os.WriteFile(path, []byte(tc.plan), 0o644))
			code, stdout, stderr := runCLI(t, "evacuate", "--plan", path)
			assert.Equal(t, exitUsage, code, stderr)
			assert.Empty(t, stdout)
			for _, w := range tc.want {
				assert.Contains(t, stderr, w)
			}
		})
	}
	code, _, stderr := runCLI(t, "evacuate")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "--plan is required")
	code, _, stderr = runCLI(t, "evacuate", "--plan", "/no/such/plan.yaml")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "/no/such/plan.yaml")
	code, _, stderr = runCLI(t, "evacuate", "--plan", "x", "--max-downtime", "3")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "--max-downtime")
	code, stdout, _ := runCLI(t, "evacuate", "--help")
	assert.Equal(t, exitOK, code)
	assert.Contains(t, stdout, "--max-per-destination")
	assert.Contains(t, stdout, "--allow-postcopy")
	assert.NotContains(t, stdout, "--src")
}

// fakeGuests starts n fake QEMU pairs listening on unix sockets and writes
// a plan for them; opts(i) shapes pair i.
func fakeGuests(t *testing.T, n int, limits string, opts func(i int) qemutest.Options) (string, []*qemutest.Pair) {
	t.Helper()
	dir := t.TempDir()
	var b strings.Builder
	b.WriteString(limits + "\nmigrations:\n")
	var pairs []*qemutest.Pair
	for i := range n {
		p := qemutest.New(opts(i))
		t.Cleanup(p.Close)
		d := filepath.Join(dir, fmt.Sprint(i))
		require.NoError(t, os.Mkdir(d, 0o755))
		src, dst, err := p.ListenUnix(d)
		require.NoError(t, err)
		fmt.Fprintf(&b, "  - {name: vm%d, source_host: h%d, destination_host: d, src: 'unix:%s', dst: 'unix:%s', uri: 'tcp:127.0.0.1:0'}\n",
			i, i%2, src, dst)
		pairs = append(pairs, p)
	}
	path := filepath.Join(dir, "plan.yaml")
	require.NoError(t, os.WriteFile(path, []byte(b.String()), 0o644))
	return path, pairs
}

func jsonLines(t *testing.T, stdout string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(stdout), "\n") {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m), l)
		out = append(out, m)
	}
	return out
}

// --json: every event with its migration's name, a result line per
// migration, the fleet line last; --max-parallel overrides the plan (never
// two in flight); exit 0 when all completed.
func TestEvacuateJSON(t *testing.T) {
	path, pairs := fakeGuests(t, 3, "limits: {max_parallel: 3}", func(int) qemutest.Options {
		return qemutest.Options{RAM: 16 << 20, Throughput: 1 << 30}
	})
	code, stdout, stderr := runCLI(t, "evacuate", "--plan", path, "--json", "--max-parallel", "1", "--bandwidth", "512MiB")
	require.Equal(t, exitOK, code, stderr)
	lines := jsonLines(t, stdout)
	inFlight, maxIn := map[string]bool{}, 0
	results := map[string]map[string]any{}
	for i, l := range lines[:len(lines)-1] {
		name, _ := l["name"].(string)
		require.NotEmpty(t, name, "line %d has no name: %v", i, l)
		switch l["type"] {
		case "start":
			inFlight[name] = true
			maxIn = max(maxIn, len(inFlight))
		case "phase":
			if l["phase"] == "complete" {
				delete(inFlight, name)
			}
		case "result":
			results[name] = l
		}
	}
	assert.Equal(t, 1, maxIn)
	require.Len(t, results, 3)
	for name, r := range results {
		assert.Equal(t, "completed", r["status"], name)
		assert.Equal(t, "completed", r["outcome"], name)
		assert.EqualValues(t, 1, r["attempts"], name)
	}
	last := lines[len(lines)-1]
	assert.Equal(t, "fleet", last["type"])
	assert.EqualValues(t, 3, last["completed"])
	assert.EqualValues(t, 0, last["failed"])
	assert.Equal(t, []any{}, last["unknown_names"])
	for _, p := range pairs {
		assert.Equal(t, "running", p.DstRunState())
		assert.EqualValues(t, 512<<20, p.Param(qemutest.Source, "max-bandwidth"), "--bandwidth reached each migration")
	}
}

// A migration that fails leaves its guest on its source: exit 1, the
// others complete; plain lines name each migration.
func TestEvacuateFailureExit1(t *testing.T) {
	path, pairs := fakeGuests(t, 2, "", func(i int) qemutest.Options {
		o := qemutest.Options{RAM: 16 << 20}
		if i == 1 {
			o.FailWith = "boom"
		}
		return o
	})
	code, stdout, stderr := runCLI(t, "evacuate", "--plan", path)
	assert.Equal(t, exitFailed, code, stderr)
	assert.Contains(t, stdout, "vm0: completed")
	assert.Contains(t, stdout, "vm1: failed: the guest runs on the source")
	assert.Contains(t, stdout, "fleet: 1 completed, 0 rolled back, 1 failed")
	assert.Contains(t, stderr, "qmigrate: vm1: ")
	assert.Contains(t, stderr, "boom")
	assert.Equal(t, "running", pairs[1].SrcRunState())
}

func TestFleetExitCode(t *testing.T) {
	rep := &fleet.Report{Results: []fleet.Result{{Name: "a", Outcome: fleet.Completed}}}
	code, _ := fleetExitCode(rep)
	assert.Equal(t, exitOK, code)
	rep.Results = append(rep.Results, fleet.Result{Name: "b", Outcome: fleet.RolledBack})
	code, _ = fleetExitCode(rep)
	assert.Equal(t, exitFailed, code)
	rep.Results = append(rep.Results, fleet.Result{Name: "c", Outcome: fleet.Unknown})
	code, unknown := fleetExitCode(rep)
	assert.Equal(t, exitUnknown, code)
	assert.Equal(t, []string{"c"}, unknown)
}

// cancelOn is stdout that cancels the command once a line contains want.
type cancelOn struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	want   string
	cancel context.CancelFunc
}

func (w *cancelOn) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if bytes.Contains(p, []byte(w.want)) {
		w.cancel()
	}
	return w.buf.Write(p)
}

// Cancelled (SIGINT) mid-fleet: the running migration rolls back, the
// queued ones never start, every guest is on its source; exit 1.
func TestEvacuateCancelled(t *testing.T) {
	path, pairs := fakeGuests(t, 3, "limits: {max_parallel: 1}", func(int) qemutest.Options {
		return qemutest.Options{RAM: 256 << 20, Throughput: 32 << 20}
	})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	out := &cancelOn{want: `"phase":"converge"`, cancel: cancel}
	var errb bytes.Buffer
	code := run(ctx, []string{"evacuate", "--plan", path, "--json"}, out, &errb)
	assert.Equal(t, exitFailed, code, errb.String())
	lines := jsonLines(t, out.buf.String())
	outcomes := map[string]string{}
	for _, l := range lines {
		if l["type"] == "result" {
			outcomes[l["name"].(string)] = l["outcome"].(string)
		}
	}
	assert.Equal(t, map[string]string{"vm0": "rolled-back", "vm1": "not-started", "vm2": "not-started"}, outcomes)
	last := lines[len(lines)-1]
	assert.Equal(t, "fleet", last["type"])
	assert.EqualValues(t, 1, last["rolled_back"])
	assert.EqualValues(t, 2, last["not_started"])
	for i, p := range pairs {
		assert.Equal(t, "running", p.SrcRunState(), "vm%d", i)
		assert.NotEqual(t, "running", p.DstRunState(), "vm%d", i)
	}
}

// The plan takes the QMP TLS keys like the flags: plain tcp QMP to another
// host is refused naming the entry, insecure_qmp accepts it.
func TestEvacuatePlanQMPOverTCP(t *testing.T) {
	plan := func(extra string) string {
		dir := t.TempDir()
		p := filepath.Join(dir, "plan.yaml")
		require.NoError(t, os.WriteFile(p, []byte(`migrations:
  - name: vm1
    source_host: a
    destination_host: b
    src: tcp:198.18.0.1:4444
    dst: unix:/run/vm1-dst.qmp
    uri: unix:/run/vm1.sock
`+extra), 0o600))
		return p
	}
	code, _, stderr := runCLI(t, "evacuate", "--plan", plan(""))
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, "vm1")
	assert.Contains(t, stderr, "insecure_qmp")
	data, err := os.ReadFile(plan("    insecure_qmp: true\n"))
	require.NoError(t, err)
	pf, err := readPlan(data)
	require.NoError(t, err)
	p, err := buildPlan(pf, nil)
	require.NoError(t, err)
	assert.True(t, p.Migrations[0].Config.Source.InsecureTCP)
}

// --metrics-addr serves the fleet's metrics while it runs, each migration
// labelled with its name; a bad address is bad usage naming the flag.
func TestEvacuateMetrics(t *testing.T) {
	code, _, stderr := runCLI(t, "evacuate", "--plan", "/nonexistent.yaml", "--metrics-addr", "nonsense")
	assert.Equal(t, 2, code)
	path, _ := fakeGuests(t, 2, "", func(int) qemutest.Options {
		return qemutest.Options{RAM: 16 << 20, Throughput: 1 << 30}
	})
	code, _, stderr = runCLI(t, "evacuate", "--plan", path, "--metrics-addr", "nonsense")
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, "--metrics-addr")
	code, _, stderr = runCLI(t, "evacuate", "--plan", path, "--json", "--metrics-addr", "127.0.0.1:0")
	require.Equal(t, exitOK, code, stderr)
	assert.Contains(t, stderr, "serving metrics on http://127.0.0.1:")
}

// A plan's migration may name where its destination binds (listen).
func TestEvacuatePlanListen(t *testing.T) {
	pf, err := readPlan([]byte(`migrations:
  - {name: vm1, source_host: a, destination_host: b, src: 'unix:/s', dst: 'unix:/d', uri: 'tcp:198.18.0.2:4444', listen: 'tcp:0.0.0.0:4444'}
`))
	require.NoError(t, err)
	p, err := buildPlan(pf, nil)
	require.NoError(t, err)
	assert.Equal(t, "tcp:0.0.0.0:4444", p.Migrations[0].Config.Listen)
}
