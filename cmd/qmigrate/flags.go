package main

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// usageError is a problem with the command line: exit status 2, message on
// stderr, and a pointer to --help.
type usageError struct {
	msg string
}

func (e *usageError) Error() string { return e.msg }

// inputError is bad input found after the command line parsed: an address
// that cannot be reached or does not speak QMP. Exit status 2.
type inputError struct {
	flag    string // "--src", "--dst"
	address string
	err     error
}

func (e *inputError) Error() string {
	return fmt.Sprintf("%s %s: %v", e.flag, e.address, e.err)
}

func (e *inputError) Unwrap() error { return e.err }

// byteSize is a flag.Value for a byte count (or a rate in bytes per second)
// with an optional unit: 256MiB, 1GiB, 500MB, 100K, 1.5G, 64MiB/s. Binary
// units (K, M, G, T, KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB,
// MB, GB, TB) powers of 1000; B or no unit means bytes. Units are
// case-insensitive and always mean bytes, never bits. A trailing "/s" is
// allowed. "0" and "unlimited" mean no limit.
type byteSize uint64

// unitMultiplier returns the bytes in one unit (lower case), as documented
// on byteSize.
func unitMultiplier(unit string) (float64, bool) {
	switch unit {
	case "", "b":
		return 1, true
	case "k", "kib":
		return 1 << 10, true
	case "kb":
		return 1e3, true
	case "m", "mib":
		return 1 << 20, true
	case "mb":
		return 1e6, true
	case "g", "gib":
		return 1 << 30, true
	case "gb":
		return 1e9, true
	case "t", "tib":
		return 1 << 40, true
	case "tb":
		return 1e12, true
	}
	return 0, false
}

// parseByteSize parses a size as documented on byteSize.
func parseByteSize(s string) (uint64, error) {
	in := strings.TrimSpace(s)
	in = strings.TrimSuffix(in, "/s")
	if strings.EqualFold(in, "unlimited") {
		return 0, nil
	}
	i := 0
	for i < len(in) && (in[i] >= '0' && in[i] <= '9' || in[i] == '.') {
		i++
	}
	num, unit := in[:i], strings.ToLower(strings.TrimSpace(in[i:]))
	if num == "" && strings.HasPrefix(in, "-") {
		return 0, fmt.Errorf("%q is negative", s)
	}
	if num == "" {
		return 0, fmt.Errorf("%q is not a size: want a number of bytes with an optional unit, such as 256MiB, 1GiB, 500MB or 100K", s)
	}
	mult, ok := unitMultiplier(unit)
	if !ok {
		return 0, fmt.Errorf("%q: unknown unit %q (want B, K, KiB, KB, M, MiB, MB, G, GiB, GB, T, TiB or TB)", s, in[i:])
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a size: %v", s, errors.Unwrap(err))
	}
	b := math.Round(v * mult)
	if b >= math.MaxUint64 {
		return 0, fmt.Errorf("%q is too large", s)
	}
	if b == 0 && v != 0 {
		// Rounded to 0, it would silently mean "unlimited".
		return 0, fmt.Errorf("%q is less than one byte (0 means unlimited)", s)
	}
	return uint64(b), nil
}

func (b *byteSize) String() string {
	if b == nil || *b == 0 {
		return "unlimited"
	}
	return formatBytes(uint64(*b))
}

// rate renders the size as a rate: "unlimited" or "256 MiB/s".
func (b byteSize) rate() string {
	if b == 0 {
		return "unlimited"
	}
	return formatBytes(uint64(b)) + "/s"
}

func (b *byteSize) Set(s string) error {
	v, err := parseByteSize(s)
	if err != nil {
		return err
	}
	*b = byteSize(v)
	return nil
}

// duration is a flag.Value for a non-negative time.Duration ("300ms", "2m").
// A bare number is refused: its unit would be a guess.
type duration time.Duration

func (d *duration) String() string {
	if d == nil {
		return "0s"
	}
	return time.Duration(*d).String()
}

func (d *duration) Set(s string) error {
	v, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		if _, nerr := strconv.ParseFloat(strings.TrimSpace(s), 64); nerr == nil && s != "0" {
			return fmt.Errorf("%q has no unit: want a duration such as 300ms, 30s or 5m", s)
		}
		return fmt.Errorf("%q is not a duration: want a duration such as 300ms, 30s or 5m", s)
	}
	if v < 0 {
		return fmt.Errorf("%q is negative", s)
	}
	*d = duration(v)
	return nil
}

// policyName is a flag.Value that accepts only the strategy's policy names.
type policyName string

func (p *policyName) String() string {
	if p == nil || *p == "" {
		return strategy.PolicyAuto
	}
	return string(*p)
}

func (p *policyName) Set(s string) error {
	name := strings.ToLower(strings.TrimSpace(s))
	if !slices.Contains(strategy.Policies(), name) {
		return fmt.Errorf("unknown policy %q (valid: %s)", s, strings.Join(strategy.Policies(), ", "))
	}
	*p = policyName(name)
	return nil
}

// stringList is a repeatable flag (--disk a --disk b); a comma-separated value
// adds several at once.
type stringList []string

func (l *stringList) String() string {
	if l == nil {
		return ""
	}
	return strings.Join(*l, ",")
}

func (l *stringList) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		v = strings.TrimSpace(v)
		if v == "" {
			return fmt.Errorf("%q: empty name", s)
		}
		if !slices.Contains(*l, v) {
			*l = append(*l, v)
		}
	}
	return nil
}

// channelCount is a flag.Value for --multifd: 1 to 255 (QEMU's limit)
// channels. Without the flag there is no multifd (a single stream); an
// explicit 0 or a negative count is refused rather than read as "off".
type channelCount int

func (c *channelCount) String() string {
	if c == nil {
		return "0"
	}
	return strconv.Itoa(int(*c))
}

func (c *channelCount) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 || n > 255 {
		return fmt.Errorf("%q: want a number of channels from 1 to 255 (leave --multifd out for a single stream)", s)
	}
	*c = channelCount(n)
	return nil
}

// checkAddress parses a QMP or NBD address flag: unix:/path or
// tcp:host:port with a port, naming the flag and what is wrong.
func checkAddress(flagName, value string) (qmp.Address, error) {
	if value == "" {
		return qmp.Address{}, fmt.Errorf("%s is required (unix:/path or tcp:host:port)", flagName)
	}
	a, err := qmp.ParseAddress(value)
	if err == nil {
		err = a.Dialable()
	}
	if err != nil {
		why := err.Error()
		var ae *qmp.AddressError
		switch {
		case errors.As(err, &ae) && ae.BadPort:
			why = fmt.Sprintf("port %q: want a number from 1 to 65535", ae.Port)
		case errors.As(err, &ae):
			why = ae.Reason
		}
		return qmp.Address{}, fmt.Errorf("%s %q: %s", flagName, value, addressProblem(value, why))
	}
	return a, nil
}

// checkURI checks the --uri flag: unix:/path or tcp:host:port (port 0 lets
// the destination pick). exec:, fd: and every other scheme are refused.
func checkURI(value string) (transport.Channel, error) {
	const flagName = "--uri"
	if value == "" {
		return transport.Channel{}, fmt.Errorf("%s is required (unix:/path or tcp:host:port)", flagName)
	}
	if !strings.HasPrefix(value, "unix:") && !strings.HasPrefix(value, "tcp:") {
		return transport.Channel{}, fmt.Errorf("%s %q: %s", flagName, value, addressProblem(value, ""))
	}
	ch, err := transport.Parse(value)
	if err != nil {
		why := err.Error()
		var ue *transport.URIError
		if errors.As(err, &ue) {
			why = ue.Reason
		}
		return transport.Channel{}, fmt.Errorf("%s %q: %s", flagName, value, addressProblem(value, why))
	}
	return ch, nil
}

// addressProblem says what is wrong with an address that failed to parse:
// a missing scheme (with the likely fix), a scheme qmigrate does not take,
// or the parser's own reason why.
func addressProblem(value, why string) string {
	const want = "want unix:/path or tcp:host:port"
	if !strings.HasPrefix(value, "unix:") && !strings.HasPrefix(value, "tcp:") {
		scheme, _, hasColon := strings.Cut(value, ":")
		switch strings.ToLower(scheme) {
		case "exec", "fd", "rdma", "file", "vsock", "unix", "tcp", "http", "https":
			if hasColon {
				return fmt.Sprintf("unsupported scheme %q: %s", scheme+":", want)
			}
		}
		if hint := schemeHint(value); hint != "" {
			return fmt.Sprintf("missing scheme: %s (did you mean %s?)", want, hint)
		}
		if hasColon && isSchemeName(scheme) && !strings.Contains(value, ":/") {
			return fmt.Sprintf("missing scheme: %s", want)
		}
		if hasColon && isSchemeName(scheme) {
			return fmt.Sprintf("unsupported scheme %q: %s", scheme+":", want)
		}
		return "missing scheme: " + want
	}
	if strings.Contains(why, "want ") {
		return why
	}
	return why + " (" + want + ")"
}

// schemeHint guesses the address a value without a scheme meant: a path is
// unix:, host:port is tcp:. "" when it does not look like either.
func schemeHint(value string) string {
	if strings.HasPrefix(value, "/") || strings.HasPrefix(value, "./") || strings.HasSuffix(value, ".sock") ||
		strings.HasSuffix(value, ".qmp") {
		return "unix:" + value
	}
	if host, port, err := net.SplitHostPort(value); err == nil && host != "" {
		if _, err := strconv.ParseUint(port, 10, 16); err == nil {
			return "tcp:" + value
		}
	}
	return ""
}

// isSchemeName reports whether s looks like a URI scheme (exec, rdma, file).
func isSchemeName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// parseFlags parses args with fs, turning the flag package's errors into a
// usageError that names the flag the way the help does (--name). flag.ErrHelp
// is returned as is.
func parseFlags(fs *flag.FlagSet, args []string) error {
	err := fs.Parse(args)
	if err == nil {
		if fs.NArg() > 0 {
			return &usageError{msg: fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
		}
		return nil
	}
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return &usageError{msg: dashDash(err.Error())}
}

// dashDash rewrites the flag package's messages to name flags as the help
// does (--name), leaving the values they quote alone: "flag provided but
// not defined: -x", "invalid value %q for flag -x: ...", "invalid boolean
// value %q for -x: ...", "flag needs an argument: -x".
func dashDash(msg string) string {
	for _, marker := range []string{"not defined: -", "for flag -", "needs an argument: -"} {
		if i := strings.Index(msg, marker); i >= 0 {
			j := i + len(marker)
			if j < len(msg) && msg[j] == '-' {
				return msg // already --name
			}
			return msg[:j] + "-" + msg[j:]
		}
	}
	if strings.HasPrefix(msg, "invalid boolean value ") {
		// The value is quoted with %q, so the first `" for -` ends it.
		if i := strings.Index(msg, `" for -`); i >= 0 {
			j := i + len(`" for -`)
			return msg[:j] + "-" + msg[j:]
		}
	}
	return msg
}

// wantsJSON reports whether args ask for --json, for the rare case where the
// flags failed to parse and the result line must still be written.
func wantsJSON(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if a == "-json" || a == "--json" {
			return true
		}
		for _, p := range []string{"-json=", "--json="} {
			if v, ok := strings.CutPrefix(a, p); ok {
				if b, err := strconv.ParseBool(v); err == nil && b {
					return true
				}
			}
		}
	}
	return false
}
