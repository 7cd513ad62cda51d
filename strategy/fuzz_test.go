package strategy_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/strategy"
)

var statuses = []string{"active", "active", "active", "active", "setup", "pre-switchover", "device",
	"postcopy-active", "postcopy-paused", "completed", "failed", "cancelled", "cancelling", "wait-unplug", "", "colo"}

var specialFloats = []float64{math.NaN(), math.Inf(1), math.Inf(-1), -1, 0, 1e300, math.MaxFloat64, 5e-324}

// fuzzInput decodes bytes into a configuration and a trace. Preset times are
// shrunk so that timeouts happen within short traces.
type fuzzInput struct {
	cfg     strategy.Config
	storage strategy.Storage
	samples []strategy.Sample
	fail    []bool // Applied(err) for the decision at this sample
}

func decode(data []byte) fuzzInput {
	r := reader{b: data}
	pols := append(strategy.Policies(), "")
	pb := r.u8()
	c := strategy.Config{Policy: pols[int(pb)%len(pols)]}
	f := r.u8()
	c.Limits.AllowPostcopy = f&1 != 0
	c.Limits.AllowPause = f&2 != 0
	c.Limits.NoThrottle = f&4 != 0
	c.Limits.MaxDowntime = time.Duration(r.u8()) * 10 * ms
	c.Limits.Budget = time.Duration(r.u8()) * 100 * ms
	c.Limits.ProgressTimeout = time.Duration(r.u8()) * 100 * ms
	if f&8 != 0 {
		c.KubeVirt = strategy.KubeVirtConfig{ProgressTimeout: time.Duration(r.u8()+1) * 100 * ms, CompletionTimeoutPerGiB: time.Duration(r.u8()+1) * 100 * ms}
		c.Nova = strategy.NovaConfig{Steps: 3 + int(r.u8()%10), DelayPerGiB: time.Duration(r.u8()+1) * 10 * ms, CompletionTimeoutPerGiB: time.Duration(r.u8()+1) * 100 * ms}
		if f&16 != 0 {
			c.Nova.TimeoutAction = "force_complete"
		}
		c.Proxmox = strategy.ProxmoxConfig{StallPolls: int(r.u8() % 8), PollInterval: time.Duration(r.u8()) * 10 * ms}
		c.Auto = strategy.AutoConfig{SettleIterations: int(r.u8() % 4), SettleTime: time.Duration(r.u8()) * 50 * ms,
			MaxThrottle: int(r.u8() % 100), PostcopyThrottle: int(r.u8() % 100), ProgressTimeout: time.Duration(r.u8()) * 100 * ms}
	}
	c.Limits.NoWriteBlocking = f&16 != 0 && f&8 == 0
	in := fuzzInput{cfg: c, storage: strategy.Storage{Disks: f&32 != 0, CanSwitch: f&64 != 0, CanRestart: pb&128 != 0, WriteBlocking: f&128 != 0}}
	var el time.Duration
	var it uint64
	for !r.empty() && len(in.samples) < 2000 {
		op := r.u8()
		el += time.Duration(int8(r.u8())) * 50 * ms // may go backwards
		if op&1 != 0 {
			it += uint64(r.u8() % 4)
		}
		s := strategy.Sample{
			Elapsed:          el,
			Status:           statuses[int(r.u8())%len(statuses)],
			Iteration:        it,
			RemainingBytes:   uint64(r.u16()) * MiB / 64,
			TransferredBytes: uint64(r.u16()) * MiB,
			TotalBytes:       uint64(r.u8()) * 64 * MiB,
			DirtyRate:        float64(r.u16()) * MiB / 64,
			Throughput:       float64(r.u16()) * MiB / 64,
			ExpectedDowntime: time.Duration(int16(r.u16())) * ms,
			ThrottlePercent:  int(int8(r.u8())),
			DowntimeLimit:    time.Duration(int16(r.u16())) * ms,
			SourcePaused:     op&2 != 0,
			StorageRemaining: uint64(r.u8()) * MiB,
			StorageTotal:     uint64(r.u8()) * GiB,
			Mirroring:        op&128 != 0,
		}
		if op&4 != 0 {
			s.DirtyRate = specialFloats[int(r.u8())%len(specialFloats)]
		}
		if op&8 != 0 {
			s.Throughput = specialFloats[int(r.u8())%len(specialFloats)]
		}
		if op&16 != 0 {
			s.Elapsed = time.Duration(int64(binary.LittleEndian.Uint64(r.n(8))))
		}
		if op&32 != 0 {
			s.RemainingBytes = math.MaxUint64 - uint64(r.u8())
			s.TotalBytes = math.MaxUint64
		}
		in.samples = append(in.samples, s)
		in.fail = append(in.fail, op&64 != 0)
	}
	return in
}

type reader struct {
	b []byte
	i int
}

func (r *reader) empty() bool { return r.i >= len(r.b) }
func (r *reader) n(k int) []byte {
	out := make([]byte, k)
	for j := range out {
		if r.i < len(r.b) {
			out[j] = r.b[r.i]
			r.i++
		}
	}
	return out
}
func (r *reader) u8() uint8   { return r.n(1)[0] }
func (r *reader) u16() uint16 { return binary.LittleEndian.Uint16(r.n(2)) }

// checkInvariants runs the trace and returns the first violated invariant.
func checkInvariants(in fuzzInput) ([]strategy.Decision, error) {
	cfg := in.cfg
	m, err := strategy.New(cfg)
	if err != nil {
		return nil, nil // invalid configurations are rejected, fine
	}
	lim := cfg.Limits
	maxDT := lim.MaxDowntime
	if maxDT == 0 {
		maxDT = strategy.DefaultMaxDowntime
	}
	m.SetStorage(in.storage)
	su := m.Setup()
	switch {
	case su.DowntimeLimit > maxDT || su.DowntimeLimit < 0:
		return nil, fmt.Errorf("setup downtime %v above max %v", su.DowntimeLimit, maxDT)
	case su.Postcopy && !lim.AllowPostcopy:
		return nil, errors.New("setup postcopy not allowed")
	case su.AutoConverge && lim.NoThrottle:
		return nil, errors.New("setup auto-converge with NoThrottle")
	case su.Throttle != nil && !validThrottle(*su.Throttle):
		return nil, fmt.Errorf("setup throttle invalid %+v", *su.Throttle)
	}
	var out []strategy.Decision
	done := false
	finishing := false // a postcopy or pause decided and not failed, or a postcopy status seen
	var now time.Duration
	budgetDue := false
	postcopyAsked := false // a StartPostcopy applied without error
	switched := false      // a MirrorWriteBlocking was decided
	st := in.storage
	for i, s := range in.samples {
		d := m.Step(s)
		out = append(out, d)
		if s.Elapsed > now {
			now = s.Elapsed
		}
		if d.Action == "" {
			return out, fmt.Errorf("sample %d: empty action", i)
		}
		if d.Summary == "" {
			return out, fmt.Errorf("sample %d: %s without a summary in words", i, d.Action)
		}
		if (d.Remedy != nil) != (d.Action == strategy.Abort) {
			return out, fmt.Errorf("sample %d: %s with remedy %v", i, d.Action, d.Remedy)
		}
		if done && d.Action != strategy.Wait {
			return out, fmt.Errorf("sample %d: %s after done", i, d.Action)
		}
		terminal := s.Status == "completed" || s.Status == "failed" || s.Status == "cancelled"
		postcopy := len(s.Status) > 9 && s.Status[:9] == "postcopy-"
		if postcopy && !done {
			finishing = true
			if d.Action != strategy.Wait {
				return out, fmt.Errorf("sample %d: %s in %s", i, d.Action, s.Status)
			}
		}
		if s.SourcePaused && !done {
			finishing = true
		}
		if postcopyAsked && d.Action == strategy.Abort {
			return out, fmt.Errorf("sample %d: abort after postcopy was started", i)
		}
		if s.Mirroring && d.Action != strategy.Wait && d.Action != strategy.Abort && d.Action != strategy.MirrorWriteBlocking {
			return out, fmt.Errorf("sample %d: %s in the mirror phase", i, d.Action)
		}
		switch d.Action {
		case strategy.MirrorWriteBlocking:
			switch {
			case switched:
				return out, fmt.Errorf("sample %d: write-blocking decided twice", i)
			case !s.Mirroring && s.Status != "active":
				return out, fmt.Errorf("sample %d: write-blocking in status %q, neither mirroring nor migrating RAM", i, s.Status)
			case finishing:
				return out, fmt.Errorf("sample %d: write-blocking with a postcopy or pause under way", i)
			case in.cfg.Policy != "" && in.cfg.Policy != strategy.PolicyAuto:
				return out, fmt.Errorf("sample %d: write-blocking by the %s preset", i, in.cfg.Policy)
			case !st.Disks || !(st.CanSwitch || st.CanRestart) || st.WriteBlocking || lim.NoWriteBlocking:
				return out, fmt.Errorf("sample %d: write-blocking with storage %+v, NoWriteBlocking %v", i, st, lim.NoWriteBlocking)
			case !st.CanSwitch && !s.Mirroring:
				return out, fmt.Errorf("sample %d: write-blocking restart after READY (status %q)", i, s.Status)
			}
			switched = true
		case strategy.SetDowntime:
			if d.DowntimeLimit > maxDT || d.DowntimeLimit < 0 {
				return out, fmt.Errorf("sample %d: downtime %v above max %v", i, d.DowntimeLimit, maxDT)
			}
		case strategy.SetThrottle:
			if lim.NoThrottle {
				return out, fmt.Errorf("sample %d: throttle with NoThrottle", i)
			}
			if !validThrottle(d.Throttle) {
				return out, fmt.Errorf("sample %d: invalid throttle %+v", i, d.Throttle)
			}
		case strategy.StartPostcopy:
			if !lim.AllowPostcopy {
				return out, fmt.Errorf("sample %d: postcopy not allowed", i)
			}
		case strategy.PauseSource:
			if !lim.AllowPause {
				return out, fmt.Errorf("sample %d: pause not allowed", i)
			}
		}
		// Budget: at the first sample with Elapsed ≥ Budget (monotonic), a
		// finishing decision unless already finishing or done.
		if lim.Budget > 0 && now >= lim.Budget && !budgetDue && !done && !terminal && !finishing {
			budgetDue = true
			if d.Action != strategy.Abort && d.Action != strategy.StartPostcopy && d.Action != strategy.PauseSource {
				return out, fmt.Errorf("sample %d: budget %v reached at %v but %s", i, lim.Budget, now, d.Action)
			}
		}
		if terminal || d.Action == strategy.Abort {
			done = true
		}
		if m.Done() != done {
			return out, fmt.Errorf("sample %d: Done() = %v, want %v", i, m.Done(), done)
		}
		if d.Action != strategy.Wait {
			var err error
			if in.fail[i] {
				err = errors.New("refused")
			}
			m.Applied(d, err)
			if d.Action == strategy.StartPostcopy && err == nil {
				postcopyAsked = true
			}
			switch {
			case (d.Action == strategy.StartPostcopy || d.Action == strategy.PauseSource) && err == nil:
				finishing = true
			case (d.Action == strategy.StartPostcopy || d.Action == strategy.PauseSource) && err != nil && !postcopy && !s.SourcePaused:
				// A failed finishing lever lets the budget act again.
				finishing, budgetDue = false, false
			}
		}
	}
	return out, nil
}

func validThrottle(t strategy.Throttle) bool {
	return t.Initial >= 1 && t.Initial <= 99 && t.Increment >= 1 && t.Increment <= 99 &&
		t.Max >= t.Initial && t.Max <= 99 && t.TriggerThreshold >= 0 && t.TriggerThreshold <= 100
}

func seeds() [][]byte {
	rng := rand.New(rand.NewPCG(1, 2))
	var out [][]byte
	out = append(out, nil, []byte{0}, []byte{1, 0xff, 0, 10, 10})
	for n := 0; n < 64; n++ {
		b := make([]byte, 16+rng.IntN(600))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		// Mostly forward time and "active" to reach deep states.
		out = append(out, b)
	}
	return out
}

func FuzzInvariants(f *testing.F) {
	for _, s := range seeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		in := decode(data)
		a, err := checkInvariants(in)
		if err != nil {
			t.Fatalf("%v\nconfig %+v", err, in.cfg)
		}
		b, _ := checkInvariants(in)
		require.Equal(t, fmt.Sprint(a), fmt.Sprint(b), "same inputs, same decisions")
	})
}

// TestInvariantsRealistic drives every policy and limit combination through
// random but plausible traces (time forward, saw-tooth remaining, varying
// rates), which reach deeper states than raw fuzz bytes.
func TestInvariantsRealistic(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	ramSwitches := 0
	for n := 0; n < 3000; n++ {
		pols := strategy.Policies()
		cfg := strategy.Config{Policy: pols[rng.IntN(len(pols))]}
		cfg.Limits = strategy.Limits{
			AllowPostcopy: rng.IntN(2) == 0, AllowPause: rng.IntN(2) == 0, NoThrottle: rng.IntN(3) == 0,
			MaxDowntime: time.Duration(rng.IntN(2000)) * ms, Budget: time.Duration(rng.IntN(60)) * sec,
		}
		cfg.KubeVirt = strategy.KubeVirtConfig{ProgressTimeout: time.Duration(1+rng.IntN(20)) * sec, CompletionTimeoutPerGiB: time.Duration(1+rng.IntN(20)) * sec}
		cfg.Nova = strategy.NovaConfig{DelayPerGiB: time.Duration(1+rng.IntN(5)) * sec, CompletionTimeoutPerGiB: time.Duration(1+rng.IntN(30)) * sec}
		var in fuzzInput
		in.cfg = cfg
		cfg.Limits.NoWriteBlocking = rng.IntN(4) == 0
		in.cfg = cfg
		in.storage = strategy.Storage{Disks: rng.IntN(3) > 0, CanSwitch: rng.IntN(2) == 0, CanRestart: rng.IntN(2) == 0, WriteBlocking: rng.IntN(4) == 0}
		// A mirror phase first: remaining shrinking, flat or growing.
		disk := float64(1+rng.IntN(20)) * GiB
		done, grow := 0.0, float64(rng.IntN(3)-1)*50*MiB
		mirrorN := 0
		if in.storage.Disks {
			mirrorN = rng.IntN(200)
		}
		for i := 0; i < mirrorN; i++ {
			done += 40 * MiB * rng.Float64()
			disk += math.Max(0, 40*MiB+grow) * rng.Float64()
			in.samples = append(in.samples, strategy.Sample{Elapsed: time.Duration(i) * 200 * ms, Mirroring: true,
				StorageTotal: uint64(disk), StorageRemaining: uint64(math.Max(0, disk-done))})
			in.fail = append(in.fail, rng.IntN(3) == 0)
		}
		base := time.Duration(mirrorN) * 200 * ms
		ram := uint64(1+rng.IntN(8)) * GiB
		bw := float64(50+rng.IntN(500)) * MiB
		dirty := bw * rng.Float64() * 3
		it := uint64(1)
		rem := ram
		// After READY: a backlog that stays small, grows, or saturates.
		backlog, copied := 0.0, disk
		wr, cp := float64(rng.IntN(64))*MiB, float64(1+rng.IntN(64))*MiB
		for i := 0; i < 600; i++ {
			backlog = math.Min(math.Max(0, backlog+(wr-cp)*0.2*rng.Float64()*2), 4*GiB)
			copied += math.Min(cp, wr) * 0.2
			el := base + time.Duration(i)*200*ms
			if rng.IntN(3) == 0 {
				it++
				rem = uint64(float64(rem)*0.3 + dirty*rng.Float64())
			} else {
				rem -= min(rem, uint64(bw*0.2))
			}
			st := "active"
			switch k := rng.IntN(400); {
			case k == 0:
				st = "completed"
			case k == 1:
				st = "postcopy-active"
			case k == 2:
				st = "setup"
			}
			in.samples = append(in.samples, strategy.Sample{Elapsed: el, Status: st, Iteration: it, RemainingBytes: rem,
				TransferredBytes: uint64(i) * uint64(bw*0.2), TotalBytes: ram, DirtyRate: dirty * (0.5 + rng.Float64()),
				Throughput: bw * (0.8 + 0.4*rng.Float64()), ThrottlePercent: rng.IntN(100)})
			if in.storage.Disks {
				s := &in.samples[len(in.samples)-1]
				s.StorageRemaining, s.StorageTotal = uint64(backlog), uint64(copied+backlog)
			}
			in.fail = append(in.fail, rng.IntN(5) == 0)
		}
		ds, err := checkInvariants(in)
		require.NoError(t, err, "config %+v", cfg)
		for i, d := range ds {
			if d.Action == strategy.MirrorWriteBlocking && !in.samples[i].Mirroring {
				ramSwitches++
			}
		}
	}
	assert.Positive(t, ramSwitches, "some traces switch to write-blocking in the RAM phase")
	t.Logf("%d traces switched to write-blocking in the RAM phase", ramSwitches)
}
