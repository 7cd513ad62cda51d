package qmp

import (
	"errors"
	"fmt"
)

// Sentinel errors. Match them with errors.Is.
var (
	// ErrClosed: the connection is gone (closed locally or by QEMU). Errors of
	// calls that failed because of it wrap ErrClosed and the cause.
	ErrClosed = errors.New("qmp: connection closed")
	// ErrOOBUnavailable: exec-oob asked of a QEMU that did not offer oob.
	ErrOOBUnavailable = errors.New("out-of-band execution not negotiated")
	// ErrNoFDPassing: fd passing needs a unix socket connection.
	ErrNoFDPassing = errors.New("fd passing needs a unix socket connection")
	// ErrUnsupportedNetwork: Dial accepts "unix" and "tcp" only.
	ErrUnsupportedNetwork = errors.New("unsupported network (want unix or tcp)")
	// ErrBadAddress: an address string is not unix:/path or tcp:host:port.
	ErrBadAddress = errors.New("bad QMP address")
)

// Error is an error reply from QEMU. It keeps QMP's error class (GenericError,
// CommandNotFound, DeviceNotFound, DeviceNotActive, KVMMissingCap, ...) and
// QEMU's own description.
type Error struct {
	Command string // the command that failed
	Class   string // QMP error class
	Desc    string // QEMU's description, verbatim
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// Is makes errors.Is(err, &Error{Class: "CommandNotFound"}) match on class.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok {
		return false
	}
	return (t.Class == "" || t.Class == e.Class) && (t.Command == "" || t.Command == e.Command) && (t.Desc == "" || t.Desc == e.Desc)
}

// IsCommandNotFound reports whether err is QEMU's CommandNotFound reply.
func IsCommandNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Class == "CommandNotFound"
}

// IsUnexpectedArgument reports whether err is QEMU refusing an argument its
// schema does not declare for the command: GenericError "Parameter 'NAME'
// is unexpected", the text of QEMU's QAPI input visitor (the same from 7.2
// to 10.x). The command did not run: QEMU checks the arguments before it
// calls the command, so nothing changed.
func IsUnexpectedArgument(err error, name string) bool {
	return isArgumentError(err, "Parameter '"+name+"' is unexpected")
}

// IsMissingArgument reports whether err is QEMU refusing a command that
// lacks an argument its schema declares mandatory: GenericError "Parameter
// 'NAME' is missing" (QAPI's input visitor, 7.2 to 10.x). The command did
// not run.
func IsMissingArgument(err error, name string) bool {
	return isArgumentError(err, "Parameter '"+name+"' is missing")
}

func isArgumentError(err error, desc string) bool {
	var e *Error
	return errors.As(err, &e) && e.Class == "GenericError" && e.Desc == desc
}

// CommandError is a failure to run a command that is not a QEMU error reply:
// the context ended, the connection died, the reply could not be decoded.
type CommandError struct {
	Command string
	Err     error
}

func (e *CommandError) Error() string { return fmt.Sprintf("qmp: %s: %v", e.Command, e.Err) }
func (e *CommandError) Unwrap() error { return e.Err }

// ProtocolError is a message QEMU sent that does not follow QMP.
type ProtocolError struct {
	Msg  string
	Line string // the offending text, truncated
	Err  error
}

func (e *ProtocolError) Error() string {
	s := "qmp protocol error: " + e.Msg
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	if e.Line != "" {
		s += fmt.Sprintf(" (in %q)", e.Line)
	}
	return s
}
func (e *ProtocolError) Unwrap() error { return e.Err }

func isClosed(err error) bool { return errors.Is(err, ErrClosed) }
