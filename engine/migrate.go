package engine

import (
	"context"
	"errors"
)

// Migrate runs one migration. See the package documentation.
func Migrate(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	err := &Error{Phase: PhasePrepare, Op: "migrate", Err: errors.New("not implemented yet")}
	return &Result{Status: StatusFailed, Err: err}, err
}
