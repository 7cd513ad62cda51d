package wire

import (
	"strconv"
	"strings"
)

// Prefix starts every line the guest program prints on the serial console.
const Prefix = "QMIGRATE "

// Line kinds.
const (
	KindReady      = "READY"
	KindProgress   = "PROGRESS"
	KindCheck      = "CHECK"
	KindDisk       = "DISK"
	KindDiskVerify = "DISKVERIFY"
	KindTick       = "TICK"
	KindError      = "ERROR"
)

// Status words of CHECK and DISKVERIFY lines.
const (
	StatusOK   = "OK"
	StatusFail = "FAIL"
)

// Line is one parsed "QMIGRATE ..." serial line.
type Line struct {
	Kind   string            // READY, PROGRESS, CHECK, DISK, DISKVERIFY, TICK, ERROR
	Status string            // OK or FAIL for CHECK and DISKVERIFY; empty otherwise
	Fields map[string]string // key=value pairs
	Raw    string            // the line from "QMIGRATE" on, without the line ending
}

// OK reports whether the line is a verdict that passed.
func (l Line) OK() bool { return l.Status == StatusOK }

// Failed reports whether the line is a verdict that failed, or an ERROR line.
func (l Line) Failed() bool { return l.Status == StatusFail || l.Kind == KindError }

// Uint returns the field k as a number, and false when it is absent or not a number.
func (l Line) Uint(k string) (uint64, bool) {
	v, err := strconv.ParseUint(l.Fields[k], 10, 64)
	return v, err == nil
}

// ParseLine parses a serial console line. It accepts text before the prefix (the kernel may
// print on the same console) and a trailing "\r" or "\n". It returns false for lines without the
// prefix or without a kind.
func ParseLine(s string) (Line, bool) {
	i := strings.Index(s, Prefix)
	if i < 0 {
		return Line{}, false
	}
	raw := strings.TrimRight(s[i:], "\r\n")
	words := strings.Fields(raw[len(Prefix):])
	if len(words) == 0 || strings.Contains(words[0], "=") {
		return Line{}, false
	}
	l := Line{Kind: words[0], Fields: map[string]string{}, Raw: raw}
	for j, w := range words[1:] {
		k, v, ok := strings.Cut(w, "=")
		if !ok {
			if j == 0 {
				l.Status = w
			}
			continue
		}
		l.Fields[k] = v
	}
	return l, true
}

// FormatLine renders a line: kind, optional status, then key/value pairs in the given order.
// Spaces in values are replaced by "_" so that the line stays parseable.
func FormatLine(kind, status string, kv ...string) string {
	var b strings.Builder
	b.WriteString(Prefix)
	b.WriteString(kind)
	if status != "" {
		b.WriteByte(' ')
		b.WriteString(status)
	}
	for i := 0; i+1 < len(kv); i += 2 {
		b.WriteByte(' ')
		b.WriteString(kv[i])
		b.WriteByte('=')
		b.WriteString(strings.Join(strings.Fields(kv[i+1]), "_"))
	}
	b.WriteByte('\n')
	return b.String()
}
