package etcdlimit_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
	"github.com/qmigrate/qmigrate/fleet/etcdlimit"
	"github.com/qmigrate/qmigrate/qemutest"
)

// The helper processes: this test binary run again with ETCDLIMIT_HELPER
// set to "fleet" (run a fleet of fake migrations under the shared limits)
// or "hold" (take the slots and wait to be killed).
func TestMain(m *testing.M) {
	switch os.Getenv("ETCDLIMIT_HELPER") {
	case "fleet":
		os.Exit(helperFleet())
	case "hold":
		os.Exit(helperHold())
	}
	os.Exit(m.Run())
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startEtcd starts a one-member etcd on loopback for the test and returns
// its client URL.
func startEtcd(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("etcd is not installed: scripts/setup.sh installs Debian's etcd-server")
		}
		t.Skip("etcd is not installed (scripts/setup.sh installs Debian's etcd-server)")
	}
	client := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cmd := exec.Command(bin, "--name", "t", "--data-dir", t.TempDir(),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "t="+peer, "--logger", "zap", "--log-level", "error")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	c := connect(t, client)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for {
		_, err := c.Get(ctx, "ready")
		if err == nil {
			return client
		}
		require.NoError(t, ctx.Err(), "etcd did not answer: %v", err)
	}
}

func connect(t *testing.T, url string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 10 * time.Second})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

const prefix = "/qmigrate/test/"

// Two fleets in two processes share one limit (2 in flight) through etcd:
// each runs four migrations; at no revision of etcd do more than two run
// in all, counted from the fleets' own start and result events, which
// each process records in etcd.
func TestTwoProcessesShareTheLimit(t *testing.T) {
	url := startEtcd(t)
	c := connect(t, url)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	wch := c.Watch(ctx, "/check/", clientv3.WithPrefix())

	var wg sync.WaitGroup
	outs := make([][]byte, 2)
	errs := make([]error, 2)
	for i := range 2 {
		wg.Go(func() {
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "ETCDLIMIT_HELPER=fleet", "ETCD_URL="+url, fmt.Sprintf("HELPER_ID=p%d", i))
			outs[i], errs[i] = cmd.CombinedOutput()
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()

	inFlight := map[string]bool{}
	maxIn, ends := 0, 0
	for ends < 8 {
		select {
		case wr := <-wch:
			require.NoError(t, wr.Err())
			for _, ev := range wr.Events {
				k := string(ev.Kv.Key)
				if ev.Type == clientv3.EventTypePut {
					inFlight[k] = true
				} else {
					delete(inFlight, k)
					ends++
				}
				maxIn = max(maxIn, len(inFlight))
				require.LessOrEqual(t, len(inFlight), 2, "in flight across both processes at revision %d: %v", ev.Kv.ModRevision, inFlight)
			}
		case <-done:
			if ends < 8 {
				for i := range 2 {
					require.NoError(t, errs[i], "helper %d: %s", i, outs[i])
				}
				t.Fatalf("helpers ended after %d of 8 migrations", ends)
			}
		}
	}
	<-done
	for i := range 2 {
		require.NoError(t, errs[i], "helper %d: %s", i, outs[i])
		assert.Contains(t, string(outs[i]), "completed 4", "helper %d", i)
	}
	assert.Equal(t, 2, maxIn, "the two fleets together ran as many as the limit allowed")
	resp, err := c.Get(ctx, prefix+"slots/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	require.NoError(t, err)
	assert.Zero(t, resp.Count, "every slot given back")
}

// A process killed with its slots taken: they come back once its lease
// expires, and another process's fleet gets them.
func TestKilledProcessSlotsFreed(t *testing.T) {
	url := startEtcd(t)
	c := connect(t, url)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "ETCDLIMIT_HELPER=hold", "ETCD_URL="+url)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "held 2\n", line)

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	l, err := etcdlimit.New(ctx, etcdlimit.Config{Client: c, Prefix: prefix, Limits: fleet.Limits{MaxParallel: 2}, TTL: 2 * time.Second})
	require.NoError(t, err)
	defer l.Close()
	rel, err := l.TryAcquire(ctx, fleet.Slot{Name: "x", Source: "a", Destination: "b"})
	require.NoError(t, err)
	require.Nil(t, rel, "the other process holds both slots")

	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	_ = cmd.Wait()
	killed := time.Now()
	for rel == nil {
		freed := l.Freed()
		rel, err = l.TryAcquire(ctx, fleet.Slot{Name: "x", Source: "a", Destination: "b"})
		require.NoError(t, err)
		if rel != nil {
			break
		}
		select {
		case <-freed:
		case <-ctx.Done():
			t.Fatal("the killed process's slots never came back")
		}
	}
	waited := time.Since(killed)
	t.Logf("slots back %v after the kill (lease TTL 2s)", waited.Round(time.Millisecond))
	assert.Less(t, waited, 10*time.Second)
	rel2, err := l.TryAcquire(ctx, fleet.Slot{Name: "y", Source: "a", Destination: "b"})
	require.NoError(t, err)
	assert.NotNil(t, rel2, "both slots back")
	rel()
	rel2()
}

// Within one process: the limits per host hold, release frees, Close
// gives back everything at once.
func TestLimiterCounts(t *testing.T) {
	url := startEtcd(t)
	c := connect(t, url)
	ctx := t.Context()
	cfg := etcdlimit.Config{Client: c, Prefix: "/counts/", Limits: fleet.Limits{MaxParallel: 3, MaxPerSource: 2, MaxPerDestination: 2}}
	a, err := etcdlimit.New(ctx, cfg)
	require.NoError(t, err)
	b, err := etcdlimit.New(ctx, cfg)
	require.NoError(t, err)
	defer b.Close()
	r1, _ := a.TryAcquire(ctx, fleet.Slot{Name: "1", Source: "h", Destination: "x"})
	require.NotNil(t, r1)
	r2, _ := b.TryAcquire(ctx, fleet.Slot{Name: "2", Source: "h", Destination: "y"})
	require.NotNil(t, r2)
	r3, _ := b.TryAcquire(ctx, fleet.Slot{Name: "3", Source: "h", Destination: "z"})
	assert.Nil(t, r3, "source h full across both")
	r4, _ := b.TryAcquire(ctx, fleet.Slot{Name: "4", Source: "g", Destination: "x"})
	require.NotNil(t, r4)
	r5, _ := a.TryAcquire(ctx, fleet.Slot{Name: "5", Source: "k", Destination: "z"})
	assert.Nil(t, r5, "3 in flight across both")
	freed := b.Freed()
	r1()
	select {
	case <-freed:
	case <-time.After(10 * time.Second):
		t.Fatal("the other limiter did not see the slot freed")
	}
	r5, _ = a.TryAcquire(ctx, fleet.Slot{Name: "5", Source: "k", Destination: "z"})
	require.NotNil(t, r5)
	require.NoError(t, a.Close())
	r6, _ := b.TryAcquire(ctx, fleet.Slot{Name: "6", Source: "k", Destination: "z"})
	assert.NotNil(t, r6, "a's slot went with its lease")
	_, err = etcdlimit.New(ctx, etcdlimit.Config{Client: c, Prefix: "no-slash"})
	assert.ErrorIs(t, err, etcdlimit.ErrConfig)
	r2()
	r4()
	r6()
}

// helperFleet runs four fake migrations under the shared limit, recording
// each in flight under /check/ from the fleet's events.
func helperFleet() int {
	ctx := context.Background()
	id := os.Getenv("HELPER_ID")
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{os.Getenv("ETCD_URL")}, DialTimeout: 10 * time.Second})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer c.Close()
	lim, err := etcdlimit.New(ctx, etcdlimit.Config{Client: c, Prefix: prefix, Limits: fleet.Limits{MaxParallel: 2}, TTL: 5 * time.Second})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer lim.Close()
	var plan fleet.Plan
	for i := range 4 {
		p := qemutest.New(qemutest.Options{RAM: 16 << 20, Throughput: 64 << 20})
		defer p.Close()
		src, dst, err := p.Clients(ctx)
		if err != nil {
			fmt.Println(err)
			return 1
		}
		plan.Migrations = append(plan.Migrations, fleet.Migration{Name: fmt.Sprintf("%s-vm%d", id, i), SourceHost: id, DestinationHost: "d",
			Config: engine.Config{Source: engine.Endpoint{Client: src}, Destination: engine.Endpoint{Client: dst}, URI: "tcp:127.0.0.1:0"}})
	}
	plan.Limiter = lim
	var failed error
	var mu sync.Mutex
	plan.Observer = func(ev fleet.Event) {
		var err error
		switch {
		case ev.Kind == fleet.EventStart:
			_, err = c.Put(ctx, "/check/"+ev.Name, "")
		case ev.Kind == fleet.EventEngine && ev.Engine.Kind == engine.EventResult:
			_, err = c.Delete(ctx, "/check/"+ev.Name)
		}
		if err != nil {
			mu.Lock()
			failed = err
			mu.Unlock()
		}
	}
	rep, err := fleet.Run(ctx, plan)
	if err != nil || failed != nil {
		fmt.Println(err, failed)
		return 1
	}
	fmt.Printf("completed %d\n", rep.Summary.Completed)
	for _, r := range rep.Results {
		if r.Err != nil {
			fmt.Println(r.Name, r.Err)
		}
	}
	return 0
}

// helperHold takes both slots, says so, and waits to be killed.
func helperHold() int {
	ctx := context.Background()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{os.Getenv("ETCD_URL")}, DialTimeout: 10 * time.Second})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	lim, err := etcdlimit.New(ctx, etcdlimit.Config{Client: c, Prefix: prefix, Limits: fleet.Limits{MaxParallel: 2}, TTL: 2 * time.Second})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	n := 0
	for i := range 2 {
		if rel, err := lim.TryAcquire(ctx, fleet.Slot{Name: fmt.Sprint(i), Source: "h", Destination: "d"}); err == nil && rel != nil {
			n++
		}
	}
	fmt.Println("held", n)
	select {}
}
