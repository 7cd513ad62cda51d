package engine

import (
	"context"
	"fmt"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// resolvePort returns the channel the source connects to: for a tcp port 0
// the port the destination reports in query-migrate after migrate-incoming
// (transport.Channel.WithPort), otherwise ch unchanged, without asking.
func resolvePort(ctx context.Context, dst *qmp.Client, ch transport.Channel) (transport.Channel, error) {
	if !ch.NeedsPort() {
		return ch, nil
	}
	info, err := dst.QueryMigrate(ctx)
	if err != nil {
		return ch, fmt.Errorf("reading destination port: %w", err)
	}
	return ch.WithPort(info)
}
