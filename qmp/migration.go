package qmp

import (
	"context"
	"encoding/json"
	"time"
)

// MigrationStatus is QEMU's MigrationStatus. Unknown values from a newer QEMU
// decode as they are and count as non-terminal.
type MigrationStatus string

// Migration statuses known from QEMU 7.2 to 10.2.
const (
	StatusNone                 MigrationStatus = "none"
	StatusSetup                MigrationStatus = "setup"
	StatusCancelling           MigrationStatus = "cancelling"
	StatusCancelled            MigrationStatus = "cancelled"
	StatusActive               MigrationStatus = "active"
	StatusPostcopyActive       MigrationStatus = "postcopy-active"
	StatusPostcopyPaused       MigrationStatus = "postcopy-paused"
	StatusPostcopyRecover      MigrationStatus = "postcopy-recover"
	StatusPostcopyRecoverSetup MigrationStatus = "postcopy-recover-setup"
	StatusPostcopyDevice       MigrationStatus = "postcopy-device"
	StatusCompleted            MigrationStatus = "completed"
	StatusFailed               MigrationStatus = "failed"
	StatusColo                 MigrationStatus = "colo"
	StatusPreSwitchover        MigrationStatus = "pre-switchover"
	StatusDevice               MigrationStatus = "device"
	StatusWaitUnplug           MigrationStatus = "wait-unplug"
)

// Terminal reports whether the status ends a migration (completed, failed, cancelled).
func (s MigrationStatus) Terminal() bool {
	return s == StatusCompleted || s == StatusFailed || s == StatusCancelled
}

// Postcopy reports whether the status is one of the postcopy phases, in which
// the destination already runs the guest and the migration must not be cancelled.
func (s MigrationStatus) Postcopy() bool {
	switch s {
	case StatusPostcopyActive, StatusPostcopyPaused, StatusPostcopyRecover, StatusPostcopyRecoverSetup, StatusPostcopyDevice:
		return true
	}
	return false
}

// MigrationStats is MigrationStats (the "ram" member of query-migrate), in bytes.
type MigrationStats struct {
	Transferred      uint64  `json:"transferred"`
	Remaining        uint64  `json:"remaining"`
	Total            uint64  `json:"total"`
	Duplicate        uint64  `json:"duplicate"`
	Normal           uint64  `json:"normal"`
	NormalBytes      uint64  `json:"normal-bytes"`
	DirtyPagesRate   uint64  `json:"dirty-pages-rate"` // pages per second
	Mbps             float64 `json:"mbps"`             // Mbit/s as QEMU reports it
	DirtySyncCount   uint64  `json:"dirty-sync-count"` // the pass number
	PostcopyRequests uint64  `json:"postcopy-requests"`
	PageSize         uint64  `json:"page-size"`
	MultifdBytes     uint64  `json:"multifd-bytes"`
	PagesPerSecond   uint64  `json:"pages-per-second"`
	PrecopyBytes     uint64  `json:"precopy-bytes"`
	DowntimeBytes    uint64  `json:"downtime-bytes"`
	PostcopyBytes    uint64  `json:"postcopy-bytes"`
}

// Throughput is the measured rate in bytes per second (from mbps).
func (s MigrationStats) Throughput() float64 { return s.Mbps * 1e6 / 8 }

// DirtyRate is the dirtying rate in bytes per second.
func (s MigrationStats) DirtyRate() float64 {
	ps := s.PageSize
	if ps == 0 {
		ps = 4096
	}
	return float64(s.DirtyPagesRate) * float64(ps)
}

// SocketAddress is the flat SocketAddress union (inet, unix, vsock, fd).
type SocketAddress struct {
	Type string `json:"type"`
	Host string `json:"host,omitempty"`
	Port string `json:"port,omitempty"`
	Path string `json:"path,omitempty"`
	CID  string `json:"cid,omitempty"`
	Str  string `json:"str,omitempty"`
}

// MigrationInfo is the reply of query-migrate, with times normalised to
// time.Duration. Fields a QEMU does not send stay zero; fields this type does
// not know are ignored.
type MigrationInfo struct {
	Status                MigrationStatus
	RAM                   *MigrationStats
	TotalTime             time.Duration
	ExpectedDowntime      time.Duration
	Downtime              time.Duration
	SetupTime             time.Duration
	CPUThrottlePercentage int
	ErrorDesc             string
	BlockedReasons        []string
	SocketAddress         []SocketAddress
	PostcopyBlocktime     time.Duration
	// Raw is the reply as QEMU sent it.
	Raw json.RawMessage
}

type wireMigrationInfo struct {
	Status                MigrationStatus `json:"status"`
	RAM                   *MigrationStats `json:"ram"`
	TotalTime             int64           `json:"total-time"`
	ExpectedDowntime      int64           `json:"expected-downtime"`
	Downtime              int64           `json:"downtime"`
	SetupTime             int64           `json:"setup-time"`
	CPUThrottlePercentage int             `json:"cpu-throttle-percentage"`
	ErrorDesc             string          `json:"error-desc"`
	BlockedReasons        []string        `json:"blocked-reasons"`
	SocketAddress         []SocketAddress `json:"socket-address"`
	PostcopyBlocktime     int64           `json:"postcopy-blocktime"`
}

// UnmarshalJSON decodes query-migrate's reply, converting milliseconds.
func (m *MigrationInfo) UnmarshalJSON(b []byte) error {
	var w wireMigrationInfo
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	ms := func(v int64) time.Duration { return time.Duration(v) * time.Millisecond }
	*m = MigrationInfo{
		Status:                w.Status,
		RAM:                   w.RAM,
		TotalTime:             ms(w.TotalTime),
		ExpectedDowntime:      ms(w.ExpectedDowntime),
		Downtime:              ms(w.Downtime),
		SetupTime:             ms(w.SetupTime),
		CPUThrottlePercentage: w.CPUThrottlePercentage,
		ErrorDesc:             w.ErrorDesc,
		BlockedReasons:        w.BlockedReasons,
		SocketAddress:         w.SocketAddress,
		PostcopyBlocktime:     ms(w.PostcopyBlocktime),
		Raw:                   append(json.RawMessage(nil), b...),
	}
	if m.Status == "" {
		m.Status = StatusNone
	}
	return nil
}

// QueryMigrate runs query-migrate.
func (c *Client) QueryMigrate(ctx context.Context) (*MigrationInfo, error) {
	var info MigrationInfo
	if err := c.Execute(ctx, "query-migrate", nil, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// MigrationChannel is one entry of the "channels" argument of migrate and
// migrate-incoming (QEMU 8.2+).
type MigrationChannel struct {
	ChannelType string        `json:"channel-type"` // "main" (or "cpr")
	Addr        MigrationAddr `json:"addr"`
}

// MigrationAddr is MigrationAddress: transport "socket" with a SocketAddress
// (flat), "exec", "rdma" or "file".
type MigrationAddr struct {
	Transport string `json:"transport"`
	SocketAddress
	Filename string `json:"filename,omitempty"`
	Offset   uint64 `json:"offset,omitempty"`
}

// MigrateArgs are the arguments of migrate. Exactly one of URI and Channels.
type MigrateArgs struct {
	URI      string             `json:"uri,omitempty"`
	Channels []MigrationChannel `json:"channels,omitempty"`
	Resume   bool               `json:"resume,omitempty"`
}

// Migrate runs migrate.
func (c *Client) Migrate(ctx context.Context, args MigrateArgs) error {
	return c.Execute(ctx, "migrate", args, nil)
}

// MigrateIncomingArgs are the arguments of migrate-incoming. Exactly one of
// URI and Channels. ExitOnError (9.1+) is sent only when non-nil.
type MigrateIncomingArgs struct {
	URI         string             `json:"uri,omitempty"`
	Channels    []MigrationChannel `json:"channels,omitempty"`
	ExitOnError *bool              `json:"exit-on-error,omitempty"`
}

// MigrateIncoming runs migrate-incoming (destination started with -incoming defer).
func (c *Client) MigrateIncoming(ctx context.Context, args MigrateIncomingArgs) error {
	return c.Execute(ctx, "migrate-incoming", args, nil)
}

// MigrateCancel runs migrate_cancel. Never call it in postcopy.
func (c *Client) MigrateCancel(ctx context.Context) error {
	return c.Execute(ctx, "migrate_cancel", nil, nil)
}

// MigrateContinue runs migrate-continue {state}, e.g. state "pre-switchover".
func (c *Client) MigrateContinue(ctx context.Context, state MigrationStatus) error {
	return c.Execute(ctx, "migrate-continue", map[string]any{"state": state}, nil)
}

// MigrateStartPostcopy runs migrate-start-postcopy.
func (c *Client) MigrateStartPostcopy(ctx context.Context) error {
	return c.Execute(ctx, "migrate-start-postcopy", nil, nil)
}

// MigratePause runs migrate-pause, out of band when negotiated.
func (c *Client) MigratePause(ctx context.Context) error {
	if c.oob {
		return c.ExecuteOOB(ctx, "migrate-pause", nil, nil)
	}
	return c.Execute(ctx, "migrate-pause", nil, nil)
}

// MigrateRecover runs migrate-recover {uri} on a destination in postcopy-paused,
// out of band when negotiated.
func (c *Client) MigrateRecover(ctx context.Context, uri string) error {
	args := map[string]any{"uri": uri}
	if c.oob {
		return c.ExecuteOOB(ctx, "migrate-recover", args, nil)
	}
	return c.Execute(ctx, "migrate-recover", args, nil)
}

// MigrationCapabilityStatus is one capability and its state.
type MigrationCapabilityStatus struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// MigrateSetCapabilities sets capabilities; a map keeps it short to call.
func (c *Client) MigrateSetCapabilities(ctx context.Context, caps map[string]bool) error {
	list := make([]MigrationCapabilityStatus, 0, len(caps))
	for _, name := range sortedKeys(caps) {
		list = append(list, MigrationCapabilityStatus{Capability: name, State: caps[name]})
	}
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// QueryMigrateCapabilities returns every capability this QEMU has, with its state.
func (c *Client) QueryMigrateCapabilities(ctx context.Context) (map[string]bool, error) {
	var list []MigrationCapabilityStatus
	if err := c.Execute(ctx, "query-migrate-capabilities", nil, &list); err != nil {
		return nil, err
	}
	out := make(map[string]bool, len(list))
	for _, s := range list {
		out[s.Capability] = s.State
	}
	return out, nil
}

// MigrationParameters is MigrateSetParameters / MigrationParameters. Nil fields
// are left out: on set they are not changed, on query QEMU did not report them.
// Sizes are bytes, rates bytes per second, DowntimeLimit milliseconds as QEMU has it
// (use DowntimeLimitDuration / MillisOf to convert).
type MigrationParameters struct {
	AnnounceInitial          *uint64 `json:"announce-initial,omitempty"`
	AnnounceMax              *uint64 `json:"announce-max,omitempty"`
	AnnounceRounds           *uint64 `json:"announce-rounds,omitempty"`
	AnnounceStep             *uint64 `json:"announce-step,omitempty"`
	ThrottleTriggerThreshold *int    `json:"throttle-trigger-threshold,omitempty"`
	CPUThrottleInitial       *int    `json:"cpu-throttle-initial,omitempty"`
	CPUThrottleIncrement     *int    `json:"cpu-throttle-increment,omitempty"`
	CPUThrottleTailslow      *bool   `json:"cpu-throttle-tailslow,omitempty"`
	MaxCPUThrottle           *int    `json:"max-cpu-throttle,omitempty"`
	TLSCreds                 *string `json:"tls-creds,omitempty"`
	TLSHostname              *string `json:"tls-hostname,omitempty"`
	TLSAuthz                 *string `json:"tls-authz,omitempty"`
	MaxBandwidth             *uint64 `json:"max-bandwidth,omitempty"`
	AvailSwitchoverBandwidth *uint64 `json:"avail-switchover-bandwidth,omitempty"`
	DowntimeLimit            *uint64 `json:"downtime-limit,omitempty"` // ms
	MultifdChannels          *int    `json:"multifd-channels,omitempty"`
	MultifdCompression       *string `json:"multifd-compression,omitempty"`
	XBZRLECacheSize          *uint64 `json:"xbzrle-cache-size,omitempty"`
	MaxPostcopyBandwidth     *uint64 `json:"max-postcopy-bandwidth,omitempty"`
}

// DowntimeLimitDuration returns the downtime limit as a duration (0 if unset).
func (p *MigrationParameters) DowntimeLimitDuration() time.Duration {
	if p == nil || p.DowntimeLimit == nil {
		return 0
	}
	return time.Duration(*p.DowntimeLimit) * time.Millisecond
}

// MillisOf converts a duration to QEMU milliseconds, rounding up so that a
// non-zero duration never becomes 0.
func MillisOf(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Millisecond - 1) / time.Millisecond)
}

// Ptr returns a pointer to v, for MigrationParameters fields.
func Ptr[T any](v T) *T { return &v }

// MigrateSetParameters runs migrate-set-parameters with the non-nil fields.
func (c *Client) MigrateSetParameters(ctx context.Context, p MigrationParameters) error {
	return c.Execute(ctx, "migrate-set-parameters", p, nil)
}

// QueryMigrateParameters runs query-migrate-parameters.
func (c *Client) QueryMigrateParameters(ctx context.Context) (*MigrationParameters, error) {
	var p MigrationParameters
	if err := c.Execute(ctx, "query-migrate-parameters", nil, &p); err != nil {
		return nil, err
	}
	return &p, nil
}

// CalcDirtyRateArgs are the arguments of calc-dirty-rate. Mode "" is QEMU's
// default, page-sampling: it hashes SamplePages pages per GiB of guest RAM at
// the start and the end of the period and counts those that changed, apart
// from the migration's dirty bitmap (usable while a migration runs, under
// any accelerator). CalcTimeUnit "millisecond" needs QEMU 8.2+ (older ones
// refuse the argument: IsUnexpectedArgument); without it CalcTime is seconds.
type CalcDirtyRateArgs struct {
	CalcTime     int64  `json:"calc-time"`
	CalcTimeUnit string `json:"calc-time-unit,omitempty"`
	SamplePages  int64  `json:"sample-pages,omitempty"`
	Mode         string `json:"mode,omitempty"`
}

// CalcDirtyRate starts a dirty-rate measurement (calc-dirty-rate); its result
// comes from QueryDirtyRate once its status is "measured".
func (c *Client) CalcDirtyRate(ctx context.Context, args CalcDirtyRateArgs) error {
	return c.Execute(ctx, "calc-dirty-rate", args, nil)
}

// DirtyRateInfo is query-dirty-rate's reply (the members qmigrate reads).
type DirtyRateInfo struct {
	Status string `json:"status"` // unstarted, measuring, measured
	// DirtyRateMiB is the estimate in MiB/s, present once measured.
	DirtyRateMiB *int64 `json:"dirty-rate,omitempty"`
	CalcTime     int64  `json:"calc-time"`
	// CalcTimeUnit is CalcTime's unit, "second" or "millisecond" (8.2+;
	// absent before: seconds). QEMU 10.0 reports a millisecond request
	// in whole seconds (200 ms reads 0 "second").
	CalcTimeUnit string `json:"calc-time-unit,omitempty"`
	SamplePages  int64  `json:"sample-pages"`
	Mode         string `json:"mode"`
}

// Measured reports whether the measurement is done, and its rate in bytes/s.
func (d *DirtyRateInfo) Measured() (float64, bool) {
	if d == nil || d.Status != "measured" || d.DirtyRateMiB == nil || *d.DirtyRateMiB < 0 {
		return 0, false
	}
	return float64(*d.DirtyRateMiB) * (1 << 20), true
}

// QueryDirtyRate runs query-dirty-rate.
func (c *Client) QueryDirtyRate(ctx context.Context) (*DirtyRateInfo, error) {
	var d DirtyRateInfo
	if err := c.Execute(ctx, "query-dirty-rate", nil, &d); err != nil {
		return nil, err
	}
	return &d, nil
}
