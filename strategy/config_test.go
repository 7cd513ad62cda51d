package strategy_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/strategy"
)

func TestValidateNamesTheField(t *testing.T) {
	tests := []struct {
		cfg   strategy.Config
		field string
	}{
		{strategy.Config{Policy: "libvirt"}, "auto, qemu, kubevirt, nova, proxmox"},
		{strategy.Config{Limits: strategy.Limits{MaxDowntime: -1}}, "Limits.MaxDowntime"},
		{strategy.Config{Limits: strategy.Limits{MaxDowntime: 2001 * time.Second}}, "Limits.MaxDowntime"},
		{strategy.Config{Limits: strategy.Limits{Budget: -1}}, "Limits.Budget"},
		{strategy.Config{Limits: strategy.Limits{ProgressTimeout: -1}}, "Limits.ProgressTimeout"},
		{strategy.Config{KubeVirt: strategy.KubeVirtConfig{ProgressTimeout: -1}}, "KubeVirt.ProgressTimeout"},
		{strategy.Config{KubeVirt: strategy.KubeVirtConfig{CompletionTimeoutPerGiB: -1}}, "KubeVirt.CompletionTimeoutPerGiB"},
		{strategy.Config{Nova: strategy.NovaConfig{Downtime: 50 * time.Millisecond}}, "Nova.Downtime"},
		{strategy.Config{Nova: strategy.NovaConfig{Steps: 2}}, "Nova.Steps"},
		{strategy.Config{Nova: strategy.NovaConfig{DelayPerGiB: -1}}, "Nova.DelayPerGiB"},
		{strategy.Config{Nova: strategy.NovaConfig{TimeoutAction: "pause"}}, "Nova.TimeoutAction"},
		{strategy.Config{Proxmox: strategy.ProxmoxConfig{StallPolls: -1}}, "Proxmox.StallPolls"},
		{strategy.Config{Proxmox: strategy.ProxmoxConfig{InitialDowntime: -1}}, "Proxmox.InitialDowntime"},
		{strategy.Config{Auto: strategy.AutoConfig{TargetRatio: 1.5}}, "Auto.TargetRatio"},
		{strategy.Config{Auto: strategy.AutoConfig{MaxThrottle: 100}}, "Auto.MaxThrottle"},
		{strategy.Config{Auto: strategy.AutoConfig{SaturationFactor: 0.5}}, "Auto.SaturationFactor"},
		{strategy.Config{Auto: strategy.AutoConfig{SettleTime: -1}}, "Auto.SettleTime"},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		require.Error(t, err, tt.field)
		assert.Contains(t, err.Error(), tt.field)
		_, err = strategy.New(tt.cfg)
		assert.Error(t, err)
	}
	assert.NoError(t, strategy.Config{}.Validate())
	assert.NoError(t, strategy.Config{Nova: strategy.NovaConfig{CompletionTimeoutPerGiB: -1}}.Validate(), "negative disables Nova's timeout")
	for _, p := range strategy.Policies() {
		m, err := strategy.New(strategy.Config{Policy: p})
		require.NoError(t, err)
		assert.Equal(t, p, m.Policy())
	}
	m, err := strategy.New(strategy.Config{})
	require.NoError(t, err)
	assert.Equal(t, "auto", m.Policy())
}

func TestSetup(t *testing.T) {
	qemuRamp := strategy.DefaultThrottle
	hold := &strategy.Throttle{Initial: 1, Increment: 1, Max: 1}
	tests := []struct {
		name string
		cfg  strategy.Config
		want strategy.Setup
	}{
		{"auto", strategy.Config{}, strategy.Setup{DowntimeLimit: 100 * ms, AutoConverge: true, Throttle: hold, MeasureDirtyRate: true}},
		{"auto, everything permitted", strategy.Config{Limits: strategy.Limits{AllowPostcopy: true, AllowPause: true, MaxDowntime: sec}},
			strategy.Setup{DowntimeLimit: 100 * ms, AutoConverge: true, Postcopy: true, Throttle: hold, MeasureDirtyRate: true}},
		{"auto, no throttle, low maximum", strategy.Config{Limits: strategy.Limits{NoThrottle: true, MaxDowntime: 50 * ms}},
			strategy.Setup{DowntimeLimit: 50 * ms}},
		{"qemu writes QEMU's defaults", strategy.Config{Policy: "qemu"}, strategy.Setup{DowntimeLimit: 300 * ms}},
		{"qemu under a 200 ms maximum", strategy.Config{Policy: "qemu", Limits: strategy.Limits{MaxDowntime: 200 * ms}}, strategy.Setup{DowntimeLimit: 200 * ms}},
		{"qemu takes the user's maximum", strategy.Config{Policy: "qemu", Limits: strategy.Limits{MaxDowntime: time.Second}}, strategy.Setup{DowntimeLimit: time.Second}},
		{"kubevirt", strategy.Config{Policy: "kubevirt", Limits: strategy.Limits{AllowPostcopy: true}}, strategy.Setup{DowntimeLimit: 300 * ms, Postcopy: true}},
		{"nova starts its ramp at 50 ms", strategy.Config{Policy: "nova"}, strategy.Setup{DowntimeLimit: 50 * ms}},
		{"kubevirt with allowAutoConverge", strategy.Config{Policy: "kubevirt", KubeVirt: strategy.KubeVirtConfig{AllowAutoConverge: true}},
			strategy.Setup{DowntimeLimit: 300 * ms, AutoConverge: true, Throttle: &qemuRamp}},
		{"nova auto-converge only without postcopy", strategy.Config{Policy: "nova", Nova: strategy.NovaConfig{PermitAutoConverge: true},
			Limits: strategy.Limits{AllowPostcopy: true}}, strategy.Setup{DowntimeLimit: 50 * ms, Postcopy: true}},
		{"nova auto-converge", strategy.Config{Policy: "nova", Nova: strategy.NovaConfig{PermitAutoConverge: true}},
			strategy.Setup{DowntimeLimit: 50 * ms, AutoConverge: true, Throttle: &qemuRamp}},
		{"proxmox: 100 ms, auto-converge with QEMU's ramp", strategy.Config{Policy: "proxmox"}, strategy.Setup{DowntimeLimit: 100 * ms, AutoConverge: true, Throttle: &qemuRamp}},
		{"proxmox without throttling", strategy.Config{Policy: "proxmox", Limits: strategy.Limits{NoThrottle: true}}, strategy.Setup{DowntimeLimit: 100 * ms}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := strategy.New(tt.cfg)
			require.NoError(t, err)
			assert.Equal(t, tt.want, m.Setup())
		})
	}
}

func TestTimeBackwardsAndGarbage(t *testing.T) {
	for _, p := range strategy.Policies() {
		m, err := strategy.New(strategy.Config{Policy: p, Limits: strategy.Limits{Budget: 10 * sec}})
		require.NoError(t, err)
		m.Step(strategy.Sample{Elapsed: 20 * sec, Status: "setup"})
		require.True(t, m.Done(), "%s: the budget is due at the first sample past it", p)
		d := m.Step(strategy.Sample{Elapsed: -5 * sec, Status: "active"})
		assert.Equal(t, strategy.Wait, d.Action)
		assert.Equal(t, -5*sec, d.At)

		m, _ = strategy.New(strategy.Config{Policy: p, Limits: strategy.Limits{Budget: 10 * sec}})
		m.Step(strategy.Sample{Elapsed: 5 * sec, Status: "active", Iteration: 1, RemainingBytes: GiB, TotalBytes: GiB})
		// Time going backwards does not un-reach anything, nor does it panic.
		m.Step(strategy.Sample{Elapsed: sec, Status: "active", Iteration: 1, RemainingBytes: GiB, TotalBytes: GiB})
		d = m.Step(strategy.Sample{Elapsed: 11 * sec, Status: "active", Iteration: 2})
		assert.Equal(t, strategy.Abort, d.Action, p)
	}
}
