package integration

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// TestPostcopyFaults breaks postcopy's link on real QEMUs, through a TCP
// proxy the test controls between the source (which connects to the
// proxy, --uri) and the destination (which listens elsewhere, --listen):
// a reset, a black hole, two losses, a loss during the recovery handshake
// each recover and complete with the guest intact; a QEMU killed in
// postcopy ends with the typed error that names what is lost, within
// seconds, the other QEMU left alive.
func TestPostcopyFaults(t *testing.T) {
	q, v := tbQEMU(t)
	t.Run("LinkReset", func(t *testing.T) { testPostcopyLinkFault(t, q, v, "reset", 1) })
	t.Run("LinkBlackHole", func(t *testing.T) { testPostcopyLinkFault(t, q, v, "blackhole", 1) })
	t.Run("LostTwice", func(t *testing.T) { testPostcopyLinkFault(t, q, v, "reset", 2) })
	t.Run("LostDuringHandshake", func(t *testing.T) { testPostcopyLinkFault(t, q, v, "handshake", 1) })
	t.Run("DestinationKilled", func(t *testing.T) { testPostcopyKilled(t, q, engine.SideDestination) })
	t.Run("SourceKilled", func(t *testing.T) { testPostcopyKilled(t, q, engine.SideSource) })
	t.Run("DestinationKilledAtStart", func(t *testing.T) { testPostcopyKilledAtStart(t, q) })
	t.Run("SourceKilledAtStart", func(t *testing.T) { testPostcopySourceKilledAtStart(t, q) })
	t.Run("CLIGuestLost", func(t *testing.T) { testPostcopyCLIGuestLost(t, q) })
	t.Run("PostcopyBandwidth", func(t *testing.T) { testPostcopyBandwidth(t, q) })
	t.Run("LinkResetOverTLS", func(t *testing.T) { testPostcopyTLSReset(t, q) })
}

// Postcopy over TLS (x509, the certificate for 127.0.0.1), the link reset
// once a quarter of postcopy moved: the recovery's channel is TLS too (the
// destination's migrate-recover under the TLS parameters still in force,
// the source's resume handshaking through the proxy: a plain channel
// against a TLS one fails), and the migration completes, the guest intact.
func testPostcopyTLSReset(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	p := newLinkProxy(t)
	cfg := postcopyConfig(t, src, dst, p)
	cfg.TLS = &transport.TLS{Kind: transport.TLSX509, Dir: x509Dir(t, "127.0.0.1")}
	var quarter postcopyQuarter
	reset := false
	var steps []string
	var creds string
	cfg.Observer = func(e engine.Event) {
		switch {
		case !reset && quarter.reached(e):
			reset = true
			if pr, err := dst.QMP.QueryMigrateParameters(t.Context()); err == nil && pr.TLSCreds != nil {
				creds = *pr.TLSCreds
			}
			go p.Reset()
		case e.Kind == engine.EventRecovery:
			steps = append(steps, string(e.Recovery.Step))
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.True(t, reset, "reset in postcopy (Migrate: %v)", err)
	require.NoError(t, err, "steps %v", steps)
	t.Logf("QEMU %s: completed over TLS (destination tls-creds %q at the reset): %d recoveries, stall %v, steps %v",
		q.Name(), creds, res.Recoveries, res.PostcopyStall, steps)
	assert.NotEmpty(t, creds, "TLS in force on the destination at the reset")
	assert.GreaterOrEqual(t, res.Recoveries, 1, "the loss recovered")
	completed(t, src, dst)
}

// The user's bandwidth limit holds in postcopy: with a guest that touches
// little memory (few page requests), the postcopy phase's bytes/s stay
// at the limit.
func testPostcopyBandwidth(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 1e6, true, "")
	cfg := engineConfig(t, src, dst, "tcp:127.0.0.1:0")
	cfg.Bandwidth = postcopyBandwidth
	cfg.Strategy.Limits.AllowPostcopy = true
	var mu sync.Mutex
	var first, last *engine.Event
	cfg.Observer = func(e engine.Event) {
		if e.Kind != engine.EventStats || e.Stats.Status != string(qmp.StatusPostcopyActive) {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		ev := e
		if first == nil {
			first = &ev
		}
		last = &ev
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	j, err := engine.Start(ctx, cfg)
	require.NoError(t, err)
	require.NoError(t, j.StartPostcopy())
	res, err := j.Wait(ctx)
	require.NoError(t, err)
	mu.Lock()
	defer mu.Unlock()
	require.NotNil(t, first, "postcopy seen")
	require.NotSame(t, first, last)
	// The rate over the whole phase (~99 MiB at 8 MiB/s: ~12 s), at least
	// 2 s of it: a short span would read a burst (socket buffers, a late
	// poll) as the rate. The margin, 1.5x, is for those at its ends and a
	// machine of another speed (measured 1.08x here).
	span := last.Elapsed - first.Elapsed
	require.GreaterOrEqual(t, span, 2*time.Second, "postcopy samples at least 2 s apart")
	rate := float64(last.Stats.TransferredBytes-first.Stats.TransferredBytes) / span.Seconds()
	t.Logf("postcopy phase: %.2f MiB/s over %v with --bandwidth %d MiB/s; total %v", rate/(1<<20), span, postcopyBandwidth>>20, res.Total)
	assert.Less(t, rate, 1.5*postcopyBandwidth, "the limit holds in postcopy")
	assert.Greater(t, rate, 0.5*postcopyBandwidth)
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
}

// postcopyBandwidth keeps postcopy going for several seconds (the sweep
// guest's 150 MiB at 8 MiB/s), long enough to break its link.
const postcopyBandwidth = 8 << 20

// postcopyConfig is a migration that goes to postcopy after 2s (it cannot
// converge: the guest dirties far faster than the link), through proxy.
func postcopyConfig(t *testing.T, src, dst *qemulab.Instance, p *linkProxy) engine.Config {
	cfg := engineConfig(t, src, dst, "tcp:"+p.Addr())
	cfg.Listen = "tcp:" + p.target
	cfg.Bandwidth = postcopyBandwidth
	cfg.Strategy.Policy = strategy.PolicyAuto
	cfg.Strategy.Limits.NoThrottle = true
	cfg.Strategy.Limits.AllowPostcopy = true
	cfg.Strategy.Limits.Budget = 2 * time.Second
	cfg.PostcopyStallTimeout = 3 * time.Second
	cfg.RecoveryTimeout = 60 * time.Second
	if !src.QMP.Version().AtLeast(8, 0) {
		// 7.2 can stick in postcopy-recover for good (it cannot
		// migrate-pause there): the test accepts that typed ending, and
		// waits less for it (recoveries that work take well under 5 s).
		cfg.RecoveryTimeout = 20 * time.Second
	}
	return cfg
}

// QEMU 7.2 cannot always recover (measured, qemu-protocol.md): a resume
// whose connection fails may leave its source in postcopy-recover for good
// (7.2's migrate-pause works only in postcopy-active), and a handshake cut
// half-way may crash its destination. There the test accepts the typed
// ending that says so, both QEMUs left as they were.
func testPostcopyLinkFault(t *testing.T, q *qemulab.QEMU, v qmp.Version, fault string, losses int) {
	src, dst := enginePair(t, q, 500e6, true, "")
	p := newLinkProxy(t)
	cfg := postcopyConfig(t, src, dst, p)
	var mu sync.Mutex
	var steps []string
	var pcFirst, pcLast *engine.Event
	// A loss is injected once postcopy moved a share of the RAM that
	// remained as it started or last recovered (1/(n+1) with n losses to
	// come: the losses spread evenly over it): by progress, not by time,
	// so that every loss comes while postcopy still runs whatever the
	// machine's speed (it lasts ~5 s on 10.0 here, less on a faster one).
	var from uint64 // RemainingBytes as postcopy (re)started; 0 until seen
	armed := true   // the link runs: the next loss may be injected
	injected, lost := 0, 0
	breakLink := func() {
		switch fault {
		case "blackhole":
			p.BlackHole(true)
			time.AfterFunc(8*time.Second, func() { p.BlackHole(false) })
		default:
			p.Reset()
		}
	}
	var handshakeBroken bool
	cfg.Observer = func(e engine.Event) {
		mu.Lock()
		defer mu.Unlock()
		switch e.Kind {
		case engine.EventStats:
			if e.Stats.Status != string(qmp.StatusPostcopyActive) {
				return
			}
			ev := e
			if pcFirst == nil {
				pcFirst = &ev
			}
			if injected == 0 {
				pcLast = &ev // the postcopy rate before any fault
			}
			if !armed || injected == losses {
				return
			}
			left := e.Stats.RemainingBytes
			if from == 0 {
				from = max(left, 1)
			}
			if n := uint64(losses - injected); left <= from/(n+1)*n {
				injected++
				t.Logf("loss %d injected with %d of %d bytes left", injected, left, from)
				armed, from = false, 0 // re-armed on recovery
				go breakLink()
			}
		case engine.EventRecovery:
			steps = append(steps, string(e.Recovery.Step))
			if e.Recovery.Step == engine.RecoveryLinkLost {
				lost = e.Recovery.Loss
			}
			t.Logf("recovery: %s loss %d attempt %d stalled %v %s", e.Recovery.Step, e.Recovery.Loss, e.Recovery.Attempt, e.Recovery.Stalled, e.Recovery.Detail)
			switch {
			case fault == "handshake" && e.Recovery.Step == engine.RecoveryAttempt && !handshakeBroken:
				// The link drops again as the source reconnects: armed
				// here, before the observer returns and the engine resumes
				// the source (ResetNextConnection only takes the proxy's
				// lock).
				handshakeBroken = true
				p.ResetNextConnection()
			case e.Recovery.Step == engine.RecoveryRecovered:
				armed = true
				if injected > 0 && injected < losses {
					// The next loss at once: after a recovery 10.0 may move
					// the rest faster than the stats show it (the CI
					// rehearsal's LostTwice completed before a second
					// threshold was seen), and a loss right after a recovery
					// is a loss all the same.
					injected++
					t.Logf("loss %d injected right after the recovery", injected)
					armed, from = false, 0
					go breakLink()
				}
			}
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	mu.Lock()
	defer mu.Unlock()
	// A destination QEMU that dies during a recovery (nothing here kills
	// it) is QEMU's fault: 7.2's when a handshake is cut; 10.0's was seen
	// once in a CI rehearsal (2026-12-07, LostTwice: the destination died
	// during the attempt after the second loss). The engine's typed ending
	// is checked then: the guest lost, the source left alive in postcopy.
	dstDied := false
	if errors.Is(err, engine.ErrGuestLost) {
		// Its process may be reaped a moment after its monitor closed.
		for deadline := time.Now().Add(5 * time.Second); !dst.Exited() && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
		}
		dstDied = dst.Exited()
	}
	if err != nil && (dstDied || !v.AtLeast(8, 0) && errors.Is(err, engine.ErrRecoveryFailed)) {
		t.Logf("QEMU %s could not recover (%s, %d attempts, steps %v): %v", v, res.Lost, res.RecoveryAttempts, steps, err)
		if dstDied {
			t.Logf("the destination QEMU died on its own: %v; its log: %s", dst.ExitErr(), dst.LogTail())
			assert.Equal(t, engine.GuestLost, res.Lost)
		}
		info, qerr := src.QMP.QueryMigrate(ctx)
		require.NoError(t, qerr, "the source is left alive")
		assert.True(t, info.Status.Postcopy(), "the source is left in postcopy (%s)", info.Status)
		st, qerr := src.QMP.QueryStatus(ctx)
		require.NoError(t, qerr)
		assert.False(t, st.Running, "the source is never resumed")
		return
	}
	require.NoError(t, err)
	caps, err := src.QMP.QueryMigrateCapabilities(ctx)
	require.NoError(t, err)
	assert.Equal(t, v.AtLeast(8, 0), caps["postcopy-preempt"], "postcopy-preempt from 8.0 on")
	t.Logf("completed in %v: %d recoveries in %d attempts, guest stalled %v; steps %v", res.Total, res.Recoveries, res.RecoveryAttempts, res.PostcopyStall, steps)
	require.Equal(t, losses, injected, "every loss injected while postcopy ran")
	assert.Equal(t, injected, lost, "the engine saw every loss injected")
	assert.Equal(t, injected, res.Recoveries, "every loss recovered")
	if fault == "handshake" {
		assert.Greater(t, res.RecoveryAttempts, 1, "the first attempt was cut")
		assert.Contains(t, steps, string(engine.RecoveryFailed))
	}
	assert.Positive(t, res.PostcopyStall)
	if pcFirst != nil && pcLast != nil && pcLast != pcFirst {
		rate := float64(pcLast.Stats.TransferredBytes-pcFirst.Stats.TransferredBytes) / (pcLast.Elapsed - pcFirst.Elapsed).Seconds()
		// The running guest's page requests (it sweeps 500 MB/s) come on
		// top of the rate-limited background stream: see PostcopyBandwidth.
		t.Logf("postcopy phase: %.1f MiB/s with max-postcopy-bandwidth %d MiB/s", rate/(1<<20), postcopyBandwidth>>20)
	}
	st, err := dst.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status)
	si, err := src.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.NotEqual(t, "running", si.Status, "the source never resumed")
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
}

func testPostcopyKilled(t *testing.T, q *qemulab.QEMU, side engine.Side) {
	src, dst := enginePair(t, q, 500e6, true, "")
	p := newLinkProxy(t)
	cfg := postcopyConfig(t, src, dst, p)
	// The kill comes once a quarter of what postcopy had to move has
	// moved (the destination runs the guest: on 7.2 a source killed at
	// the first pages, before the destination loaded the device state,
	// took the destination down too, CI rehearsal) and while a quarter is
	// still to move (a kill then cannot miss postcopy, whatever the
	// machine's speed).
	killed := make(chan time.Time, 1)
	var quarter postcopyQuarter
	done := false
	cfg.Observer = func(e engine.Event) {
		if done || !quarter.reached(e) {
			return
		}
		done = true
		t.Logf("killing the %s with %d of %d bytes left", side, e.Stats.RemainingBytes, quarter.start)
		killed <- time.Now()
		if side == engine.SideDestination {
			go dst.Kill()
		} else {
			go src.Kill()
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	var killedAt time.Time
	select {
	case killedAt = <-killed:
	default:
		require.FailNow(t, "no kill: no postcopy sample with pages moved and a quarter left", "Migrate: %v", err)
	}
	require.Error(t, err)
	took := time.Since(killedAt)
	t.Logf("ended %v after the kill: %v (lost %q)", took, err, res.Lost)
	assert.Less(t, took, 5*time.Second, "within seconds")
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, side, ee.Side)
	assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
	other := src
	if side == engine.SideDestination {
		assert.ErrorIs(t, err, engine.ErrGuestLost)
		assert.Equal(t, engine.GuestLost, res.Lost)
	} else {
		assert.ErrorIs(t, err, engine.ErrPagesLost)
		assert.Equal(t, engine.PagesLost, res.Lost)
		other = dst
	}
	// The other QEMU is alive and left as it is.
	assert.False(t, other.Exited(), "qmigrate kills nothing")
	info, err := other.QMP.QueryMigrate(ctx)
	require.NoError(t, err)
	t.Logf("the surviving %s: migration %s", map[bool]string{true: "source", false: "destination"}[other == src], info.Status)
	assert.True(t, info.Status.Postcopy(), "left in postcopy (%s)", info.Status)
	if other == src {
		st, err := src.QMP.QueryStatus(ctx)
		require.NoError(t, err)
		assert.NotEqual(t, "running", st.Status, "the source is never resumed")
	}
}

// The destination killed at postcopy's first sample, perhaps before it ran
// the guest. QEMU pauses the source (postcopy had taken over) or fails its
// migration (postcopy's start failed: 7.2 left the source's guest stopped
// in 3 of 4 runs): both are a guest lost, the source never resumed. Were
// the source's guest running again, the engine would roll back. Whichever
// happened, the engine's report matches the source QEMU's state.
func testPostcopyKilledAtStart(t *testing.T, q *qemulab.QEMU) {
	ctx, src, _, res, err := killAtPostcopyStart(t, q, engine.SideDestination)
	t.Logf("undone %q", res.Undone)
	assert.False(t, res.StateUnknown)
	info, qerr := src.QMP.QueryMigrate(ctx)
	require.NoError(t, qerr, "the source is left alive")
	st, qerr := src.QMP.QueryStatus(ctx)
	require.NoError(t, qerr)
	if errors.Is(err, engine.ErrPostcopyFailed) {
		// Postcopy had taken over (the source paused), or its start
		// failed with the source's guest left stopped (7.2): lost, the
		// source never resumed.
		t.Logf("guest lost: the source %s, migration %s", st.Status, info.Status)
		assert.ErrorIs(t, err, engine.ErrGuestLost)
		assert.Equal(t, engine.GuestLost, res.Lost)
		assert.True(t, info.Status.Postcopy() || info.Status == qmp.StatusFailed, "the source left in postcopy, or failed (%s)", info.Status)
		assert.False(t, st.Running, "the source never resumed")
		return
	}
	t.Logf("postcopy's start failed: the source %s, migration %s", st.Status, info.Status)
	assert.ErrorIs(t, err, engine.ErrMigrationFailed)
	assert.ErrorIs(t, err, engine.ErrDestinationGone)
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.Empty(t, res.Lost)
	assert.Equal(t, qmp.StatusFailed, info.Status)
	assert.True(t, st.Running, "the guest runs on the source")
	_, err = qemulab.CheckSweep(ctx, nil, src.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "the guest intact on the source")
}

// killAtPostcopyStart migrates a busy sweep guest that goes to postcopy
// and kills side's QEMU at the first postcopy-active sample; it returns
// the migration's end (an error is required) and the test's context.
func killAtPostcopyStart(t *testing.T, q *qemulab.QEMU, side engine.Side) (context.Context, *qemulab.Instance, *qemulab.Instance, *engine.Result, error) {
	src, dst := enginePair(t, q, 500e6, true, "")
	p := newLinkProxy(t)
	cfg := postcopyConfig(t, src, dst, p)
	victim := map[engine.Side]*qemulab.Instance{engine.SideSource: src, engine.SideDestination: dst}[side]
	killed := false
	cfg.Observer = func(e engine.Event) {
		if !killed && e.Kind == engine.EventStats && e.Stats.Status == string(qmp.StatusPostcopyActive) {
			killed = true
			t.Logf("killing the %s at the first postcopy sample, %d bytes left", side, e.Stats.RemainingBytes)
			victim.Kill()
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	t.Cleanup(cancel)
	res, err := engine.Migrate(ctx, cfg)
	require.True(t, killed, "postcopy seen")
	require.Error(t, err)
	t.Logf("ended: %v (lost %q)", err, res.Lost)
	return ctx, src, dst, res, err
}

// The source killed at postcopy's first sample: the destination holds the
// guest, stalled on the pages it lacks (pages lost); or, still loading the
// device state, it goes down with the source (7.2, a CI rehearsal), or
// stays in pre-copy's active, never having switched (10.0): the guest lost.
// The report matches the destination QEMU's state.
func testPostcopySourceKilledAtStart(t *testing.T, q *qemulab.QEMU) {
	ctx, _, dst, res, err := killAtPostcopyStart(t, q, engine.SideSource)
	assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
	assert.ErrorIs(t, err, engine.ErrSourceGone)
	// The destination's end may lag its monitor's close by a moment.
	gone := dst.Exited()
	for deadline := time.Now().Add(2 * time.Second); !gone && time.Now().Before(deadline); gone = dst.Exited() {
		time.Sleep(50 * time.Millisecond)
	}
	if errors.Is(err, engine.ErrPagesLost) {
		assert.Equal(t, engine.PagesLost, res.Lost)
		assert.False(t, gone, "pages lost: the destination holds the guest")
		info, qerr := dst.QMP.QueryMigrate(ctx)
		require.NoError(t, qerr, "the destination answers")
		t.Logf("the destination: migration %s", info.Status)
		assert.True(t, info.Status.Postcopy(), "left in postcopy (%s)", info.Status)
		return
	}
	assert.ErrorIs(t, err, engine.ErrGuestLost)
	assert.Equal(t, engine.GuestLost, res.Lost)
	if gone {
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		return
	}
	// The destination outlived it without taking the guest over.
	info, qerr := dst.QMP.QueryMigrate(ctx)
	require.NoError(t, qerr, "the destination answers")
	t.Logf("the destination: migration %s", info.Status)
	assert.False(t, info.Status.Postcopy(), "guest lost: the destination never switched to postcopy (%s)", info.Status)
}

// The CLI: a destination killed in postcopy is exit 1 with
// "state":"guest_lost" in the result line.
func testPostcopyCLIGuestLost(t *testing.T, q *qemulab.QEMU) {
	bin := buildCLI(t)
	src, dst, srcSock, dstSock := cliPair(t, q, 500e6, true)
	p := newLinkProxy(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst", "unix:"+dstSock,
		"--uri", "tcp:"+p.Addr(), "--listen", "tcp:"+p.target, "--bandwidth", "8MiB",
		"--allow-postcopy", "--no-auto-converge", "--timeout", "2s")
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	var last map[string]any
	var killedAt time.Time
	// The kill comes once a quarter of what postcopy had to move has moved,
	// as in testPostcopyKilled: at postcopy's first sample (the CI's 7.2
	// run) the source's migration failed instead (postcopy had not taken
	// over yet) and the result named no lost state.
	var start float64 // remaining_bytes at the first postcopy line
	dec := json.NewDecoder(out)
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			require.ErrorIs(t, err, io.EOF)
			break
		}
		if m["type"] == "stats" && m["status"] == "postcopy-active" && killedAt.IsZero() {
			left, _ := m["remaining_bytes"].(float64)
			switch {
			case start == 0:
				start = max(left, 1)
			case left <= start*3/4:
				t.Logf("killing the destination with %.0f of %.0f bytes left", left, start)
				killedAt = time.Now()
				dst.Kill()
			}
		}
		last = m
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	require.True(t, errors.As(err, &ee), "exit status: %v", err)
	assert.Equal(t, 1, ee.ExitCode())
	require.False(t, killedAt.IsZero(), "postcopy seen")
	assert.Less(t, time.Since(killedAt), 10*time.Second)
	require.NotNil(t, last)
	assert.Equal(t, "result", last["type"])
	assert.Equal(t, "guest_lost", last["state"])
	assert.Contains(t, last["error"], "guest lost")
	assert.False(t, src.Exited(), "qmigrate kills nothing")
}

// postcopyQuarter sees, in postcopy's stats samples, when a quarter of
// what postcopy had to move has moved while a quarter is still to move: a
// fault injected then comes with the guest running on the destination and
// cannot miss postcopy, whatever the machine's speed.
type postcopyQuarter struct {
	start uint64 // RemainingBytes at the first postcopy sample; 0 before it
}

func (q *postcopyQuarter) reached(e engine.Event) bool {
	if e.Kind != engine.EventStats || e.Stats.Status != string(qmp.StatusPostcopyActive) {
		return false
	}
	left := e.Stats.RemainingBytes
	if q.start == 0 {
		q.start = max(left, 1)
		return false
	}
	return left <= q.start*3/4 && left >= q.start/4
}

// linkProxy is a TCP proxy between the source and the destination's
// listener that the test breaks: Reset (both QEMUs see a connection reset),
// BlackHole (nothing passes, no error: connections stall, new ones hang).
type linkProxy struct {
	ln     net.Listener
	target string // host:port the destination listens on

	mu         sync.Mutex
	conns      map[net.Conn]bool
	hole       chan struct{} // non-nil while black-holed; closed when it ends
	resetNext  bool
	refuseNext bool
}

func newLinkProxy(t *testing.T) *linkProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	// A free port for the destination to listen on (bound by QEMU later:
	// freePort never hands it out twice).
	target := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	p := &linkProxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.BlackHole(false)
		p.Reset()
	})
	return p
}

func (p *linkProxy) Addr() string { return p.ln.Addr().String() }

func (p *linkProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.handle(c)
	}
}

func (p *linkProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns[c] = true
	p.mu.Unlock()
}

func (p *linkProxy) handle(c net.Conn) {
	p.track(c)
	p.gate()
	p.mu.Lock()
	reset, refuse := p.resetNext, p.refuseNext
	p.resetNext, p.refuseNext = false, false
	p.mu.Unlock()
	if refuse {
		// The link drops before the destination saw the connection.
		abort(c)
		return
	}
	if reset {
		// The link drops again during the recovery handshake: once the
		// first bytes crossed.
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			abort(c)
			return
		}
		p.track(up)
		buf := make([]byte, 64)
		if n, err := c.Read(buf); err == nil {
			_, _ = up.Write(buf[:n])
		}
		abort(c)
		abort(up)
		return
	}
	// A connection held by a black hole whose client gave up meanwhile
	// (a source paused by migrate-pause shuts its socket down) would never
	// have reached the destination on a real link (its SYN was dropped):
	// drop it instead of connecting it late.
	// What such a client left in the buffers drains in a few ms; a live
	// one keeps sending (a migration that waited at its setup): connect
	// it after at most 300 ms.
	var early []byte
	buf := make([]byte, 64<<10)
	for until := time.Now().Add(300 * time.Millisecond); time.Now().Before(until); {
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		n, err := c.Read(buf)
		early = append(early, buf[:n]...)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			break
		}
		if err != nil {
			abort(c)
			return
		}
	}
	_ = c.SetReadDeadline(time.Time{})
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		abort(c)
		return
	}
	p.track(up)
	if len(early) > 0 {
		if _, err := up.Write(early); err != nil {
			abort(c)
			abort(up)
			return
		}
	}
	go p.pipe(up, c)
	p.pipe(c, up)
}

// pipe copies from a to b, holding the bytes while the link is a black
// hole; an end or an error closes both.
func (p *linkProxy) pipe(a, b net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := a.Read(buf)
		if n > 0 {
			p.gate()
			if _, werr := b.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	a.Close()
	b.Close()
}

// gate waits while the link is a black hole.
func (p *linkProxy) gate() {
	p.mu.Lock()
	h := p.hole
	p.mu.Unlock()
	if h != nil {
		<-h
	}
}

// Reset resets every connection through the proxy (RST to both ends).
func (p *linkProxy) Reset() {
	p.mu.Lock()
	conns := p.conns
	p.conns = map[net.Conn]bool{}
	p.mu.Unlock()
	for c := range conns {
		abort(c)
	}
}

// ResetNextConnection resets the next connection once it carried its
// first bytes (a recovery's handshake).
func (p *linkProxy) ResetNextConnection() {
	p.mu.Lock()
	p.resetNext = true
	p.mu.Unlock()
}

// RefuseNextConnection resets the next connection before it reaches the
// destination.
func (p *linkProxy) RefuseNextConnection() {
	p.mu.Lock()
	p.refuseNext = true
	p.mu.Unlock()
}

// BlackHole stops (on) or restarts every byte through the proxy.
func (p *linkProxy) BlackHole(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case on && p.hole == nil:
		p.hole = make(chan struct{})
	case !on && p.hole != nil:
		close(p.hole)
		p.hole = nil
	}
}

// abort closes c with a reset (SO_LINGER 0).
func abort(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}
