package engine

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// ConnectError is a side the engine could not connect to (Endpoint.Address):
// the connection failed, or no QMP greeting came within the timeout, or the
// caller's context ended meanwhile. The *Error of the prepare phase wraps
// it, with ErrBadInput (or ErrCancelled); when both sides fail, Migrate's
// error joins both.
type ConnectError struct {
	Side    Side
	Address qmp.Address
	// Timeout is set when nothing answered the QMP handshake within it: a
	// socket that is not a QEMU monitor, or a monitor busy with another
	// client (it serves one at a time). 0 otherwise.
	Timeout time.Duration
	// Path says what is at a unix address's path when the connection
	// failed outright; PathUnknown otherwise.
	Path PathKind
	// Err is the cause: qmp.DialAddress's error, or the context's.
	Err error
}

func (e *ConnectError) Error() string {
	if e.Timeout > 0 {
		return fmt.Sprintf("no QMP greeting from %s within %v: %v", e.Address, e.Timeout.Round(time.Millisecond), e.Err)
	}
	return e.Err.Error()
}

// Unwrap returns the cause.
func (e *ConnectError) Unwrap() error { return e.Err }

// PathKind is what a unix socket path that could not be connected to is.
type PathKind string

// Path kinds.
const (
	PathUnknown     PathKind = ""             // nothing more to say (missing, a tcp address, ...)
	PathDirectory   PathKind = "directory"    // a directory, not a socket
	PathFile        PathKind = "file"         // a file that is not a socket
	PathStaleSocket PathKind = "stale socket" // a socket no process listens on (its QEMU exited)
)

// PathKindOf looks at what is at a unix address's path after connecting to it
// failed with err.
func PathKindOf(a qmp.Address, err error) PathKind {
	if a.Network != qmp.Unix {
		return PathUnknown
	}
	fi, serr := os.Stat(a.Path)
	switch {
	case serr != nil:
		return PathUnknown
	case fi.IsDir():
		return PathDirectory
	case fi.Mode()&os.ModeSocket == 0:
		return PathFile
	case errors.Is(err, syscall.ECONNREFUSED):
		return PathStaleSocket
	}
	return PathUnknown
}
