package engine

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// Defaults for the zero values of Config.
const (
	DefaultPollInterval   = 200 * time.Millisecond
	DefaultConnectTimeout = 10 * time.Second
	// DefaultUnresponsiveTimeout is Config.UnresponsiveTimeout's default.
	DefaultUnresponsiveTimeout = 30 * time.Second
	// UnlimitedBandwidth is the max-bandwidth set when Config.Bandwidth is 0:
	// 64 GiB/s, far above any link, accepted by QEMU 7.2 to 10.x.
	UnlimitedBandwidth uint64 = 64 << 30
	// DefaultRecoveryTimeout is Config.RecoveryTimeout's default.
	DefaultRecoveryTimeout = 5 * time.Minute
	// DefaultPostcopyStallTimeout is Config.PostcopyStallTimeout's default.
	DefaultPostcopyStallTimeout = 5 * time.Second
	// MaxMultifdChannels is QEMU's limit for multifd-channels.
	MaxMultifdChannels = 255
	// undoTimeout bounds the whole rollback (it runs with a context of its
	// own: the caller's may have ended, and a cancel arriving meanwhile
	// must not cut it short).
	undoTimeout = 30 * time.Second
	// undoStepTimeout bounds one undo step, undoCallTimeout one QMP command
	// of the rollback, undoProbeTimeout one to a side that already let a
	// command go unanswered.
	undoStepTimeout  = 15 * time.Second
	undoCallTimeout  = 5 * time.Second
	undoProbeTimeout = 2 * time.Second
)

// Validate checks the config without touching any QEMU. Errors wrap
// ErrInvalidConfig (and so ErrBadInput) and name the field.
func (c Config) Validate() error {
	bad := func(field, format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrInvalidConfig, field, fmt.Sprintf(format, args...))
	}
	for _, e := range []struct {
		name string
		ep   Endpoint
	}{{"Source", c.Source}, {"Destination", c.Destination}} {
		if e.ep.Client != nil {
			continue
		}
		if e.ep.Address.IsZero() {
			return bad(e.name, "neither Address nor Client set")
		}
		if err := e.ep.Address.Dialable(); err != nil {
			return bad(e.name+".Address", "%v", err)
		}
		if e.ep.TLS == nil && !e.ep.InsecureTCP && !e.ep.Address.Loopback() {
			return bad(e.name+".Address", "plain tcp QMP to %s, which is not this host: whoever reaches the port controls the VM; set %s.TLS (QEMU's monitor with tls-creds), or %s.InsecureTCP to accept that",
				e.ep.Address, e.name, e.name)
		}
	}
	if c.Source.Client == nil && c.Destination.Client == nil && qmp.SameSocket(c.Source.Address, c.Destination.Address) {
		return bad("Destination.Address", "same QMP socket as the source (%s)", c.Source.Address)
	}
	if c.Source.Client != nil && c.Source.Client == c.Destination.Client {
		return bad("Destination.Client", "same client as the source")
	}
	if c.URI == "" {
		return bad("URI", "empty (want unix:/path or tcp:host:port)")
	}
	ch, err := transport.Parse(c.URI)
	if err != nil {
		return bad("URI", "%v", err)
	}
	if ch.Scheme == transport.FD && c.MultifdChannels > 0 {
		return bad("MultifdChannels", "multifd needs a unix or tcp channel, not fd:")
	}
	if c.MultifdChannels < 0 || c.MultifdChannels > MaxMultifdChannels {
		return bad("MultifdChannels", "%d out of range 0..%d", c.MultifdChannels, MaxMultifdChannels)
	}
	if c.TLS != nil {
		if err := c.TLS.Validate(ch); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidConfig, err) // it names the field
		}
		if c.Storage != nil && c.TLS.Kind != transport.TLSPSK && c.TLS.Hostname == "" && c.Storage.NBDAddress.Network == qmp.Unix {
			return fmt.Errorf("%w: TLS.Hostname: the NBD server %s is a unix socket, with no host name to check the destination's certificate against: %w",
				ErrInvalidConfig, c.Storage.NBDAddress, transport.ErrBadTLS)
		}
	}
	if c.Listen != "" {
		lc, err := transport.Parse(c.Listen)
		if err != nil {
			return bad("Listen", "%v", err)
		}
		if lc.Scheme != ch.Scheme || lc.Scheme == transport.FD {
			return bad("Listen", "%s: want the same scheme as URI %s (unix or tcp)", c.Listen, c.URI)
		}
	}
	if c.PostcopyStallTimeout < 0 {
		return bad("PostcopyStallTimeout", "negative (%v)", c.PostcopyStallTimeout)
	}
	if c.PollInterval < 0 {
		return bad("PollInterval", "negative (%v)", c.PollInterval)
	}
	if c.ConnectTimeout < 0 {
		return bad("ConnectTimeout", "negative (%v)", c.ConnectTimeout)
	}
	if c.UnresponsiveTimeout < 0 {
		return bad("UnresponsiveTimeout", "negative (%v)", c.UnresponsiveTimeout)
	}
	if err := c.Strategy.Validate(); err != nil {
		return bad("Strategy", "%v", err)
	}
	if c.Storage != nil {
		if err := c.Storage.Validate(); err != nil {
			return bad("Storage", "%v", err)
		}
		if c.Storage.WriteBlocking && c.Strategy.Limits.NoWriteBlocking {
			return bad("Storage.WriteBlocking", "write-blocking mirrors asked for, but refused by Strategy.Limits.NoWriteBlocking")
		}
		if c.Storage.ReconnectDelay > maxStorageReconnect {
			return bad("Storage.ReconnectDelay", "%v is more than %v: a destination that dies holds the source's main loop (and monitor) for the delay while QEMU drains the mirror's NBD node, past the rollback's %v per command",
				c.Storage.ReconnectDelay, maxStorageReconnect, undoCallTimeout)
		}
	}
	return nil
}

// maxStorageReconnect bounds Storage.ReconnectDelay: measured on 7.2 with
// 5 s, a destination killed at the pre-switchover window held the source's
// monitor past the rollback's bound (its guest left paused); 1 s (the
// default) did not. Longer was not measured, and a source the rollback
// already suspects gets undoProbeTimeout (2 s) per command.
const maxStorageReconnect = time.Second

func (c Config) pollInterval() time.Duration { return orDefault(c.PollInterval, DefaultPollInterval) }

func (c Config) connectTimeout() time.Duration {
	return orDefault(c.ConnectTimeout, DefaultConnectTimeout)
}

func (c Config) unresponsiveTimeout() time.Duration {
	return orDefault(c.UnresponsiveTimeout, DefaultUnresponsiveTimeout)
}

func (c Config) recoveryTimeout() time.Duration {
	return orDefault(c.RecoveryTimeout, DefaultRecoveryTimeout)
}

func (c Config) postcopyStall() time.Duration {
	return orDefault(c.PostcopyStallTimeout, DefaultPostcopyStallTimeout)
}

func (c Config) bandwidth() uint64 {
	if c.Bandwidth == 0 {
		return UnlimitedBandwidth
	}
	return c.Bandwidth
}

func (c Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

// orDefault is v, or d when v is the zero value (a Config field left
// unset).
func orDefault[T comparable](v, d T) T {
	var zero T
	if v == zero {
		return d
	}
	return v
}
