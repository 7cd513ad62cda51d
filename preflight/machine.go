package preflight

import (
	"fmt"
	"strings"

	"github.com/qmigrate/qmigrate/qmp"
)

// unread says that a side could not answer op: the detail of a warning.
func unread(f *facts, op string) string {
	return fmt.Sprintf("not compared: the %s QEMU %s refused %s: %v", f.side, f.version, op, f.err(op))
}

func (c *comparison) runState() (Status, string) {
	var problems []string
	for _, f := range []*facts{c.src, c.dst} {
		if e := f.err("query-status"); e != nil {
			problems = append(problems, fmt.Sprintf("%s: query-status: %v", f.side, e))
		}
		if e := f.err("query-migrate"); e != nil {
			problems = append(problems, fmt.Sprintf("%s: query-migrate: %v", f.side, e))
		}
	}
	if len(problems) > 0 {
		return Fail, strings.Join(problems, "; ")
	}
	switch c.src.status {
	case "running", "paused":
	default:
		problems = append(problems, fmt.Sprintf("the source is in run state %q, want \"running\" (or \"paused\")", c.src.status))
	}
	if s := c.src.mig.Status; s != qmp.StatusNone && !s.Terminal() {
		problems = append(problems, fmt.Sprintf("the source already has a migration in status %q", s))
	}
	if c.dst.status != "inmigrate" {
		problems = append(problems, fmt.Sprintf("the destination is in run state %q, not \"inmigrate\": start it with -incoming defer", c.dst.status))
	} else if c.dst.mig.Status != qmp.StatusNone || len(c.dst.mig.SocketAddress) > 0 {
		problems = append(problems, fmt.Sprintf("the destination already listens or migrates (status %q): start it with -incoming defer, not -incoming URI", c.dst.mig.Status))
	}
	if len(problems) > 0 {
		return Fail, strings.Join(problems, "; ")
	}
	return Pass, fmt.Sprintf("source %s, destination waiting for the migration", c.src.status)
}

func (c *comparison) ramSize() (Status, string) {
	for _, f := range []*facts{c.src, c.dst} {
		if f.err("query-memory-size-summary") != nil {
			return Warn, unread(f, "query-memory-size-summary")
		}
	}
	if c.src.ram != c.dst.ram {
		return Fail, fmt.Sprintf("the source has %s of RAM, the destination %s: start the destination with -m %s",
			bytesString(c.src.ram), bytesString(c.dst.ram), megs(c.src.ram))
	}
	return Pass, bytesString(c.src.ram)
}

// machineName turns a machine's QOM type into the -machine name.
func machineName(qomType string) string { return strings.TrimSuffix(qomType, "-machine") }

// machineInfo is one query-machines entry.
type machineInfo struct {
	Name      string `json:"name"`
	Alias     string `json:"alias"`
	IsDefault bool   `json:"is-default"`
}

func (c *comparison) machineType() (Status, string, error) {
	for _, f := range []*facts{c.src, c.dst} {
		if f.err("qom-get /machine type") != nil {
			return Warn, unread(f, "qom-get /machine type"), nil
		}
	}
	sm, dm := machineName(c.src.machine), machineName(c.dst.machine)
	if sm == dm {
		return Pass, sm, nil
	}
	detail := fmt.Sprintf("the source runs machine type %s, the destination %s", sm, dm)
	// The hint needs both sides' machine lists (read only now: a failure
	// costs nothing, and the list is long).
	var srcM, dstM []machineInfo
	if err := c.src.c.Execute(c.ctx, "query-machines", nil, &srcM); err != nil && !isQMPError(err) {
		return "", "", &SideError{Side: c.src.side, Op: "query-machines", Err: err}
	}
	if err := c.dst.c.Execute(c.ctx, "query-machines", nil, &dstM); err != nil && !isQMPError(err) {
		return "", "", &SideError{Side: c.dst.side, Op: "query-machines", Err: err}
	}
	return Fail, detail + machineHint(sm, dm, srcM, dstM), nil
}

// machineHint explains a machine type difference with both sides' machine
// lists: an alias resolved differently, and the -machine that fixes it.
func machineHint(sm, dm string, srcM, dstM []machineInfo) string {
	find := func(list []machineInfo, name string) *machineInfo {
		for i := range list {
			if list[i].Name == name {
				return &list[i]
			}
		}
		return nil
	}
	if dstM == nil {
		return ": start the destination with -machine " + sm
	}
	hint := ""
	if s, d := find(srcM, sm), find(dstM, dm); s != nil && d != nil && s.Alias != "" && s.Alias == d.Alias {
		hint = fmt.Sprintf(" (%q resolved to %s on the source and %s on the destination)", s.Alias, sm, dm)
	}
	if find(dstM, sm) == nil {
		return hint + fmt.Sprintf(": the destination QEMU has no machine type %s: it cannot take this guest (migrate to a QEMU that has it)", sm)
	}
	return hint + ": start the destination with -machine " + sm
}

// bytesString renders a byte count with a binary unit when it is whole.
func bytesString(n uint64) string {
	units := []string{"KiB", "MiB", "GiB", "TiB"}
	s := fmt.Sprintf("%d bytes", n)
	v := n
	for _, u := range units {
		if v == 0 || v%1024 != 0 {
			break
		}
		v /= 1024
		s = fmt.Sprintf("%d %s", v, u)
	}
	return s
}

// megs renders a RAM size as -m takes it.
func megs(n uint64) string {
	if n%(1<<20) == 0 {
		return fmt.Sprintf("%dM", n>>20)
	}
	return fmt.Sprintf("%dK", n>>10)
}
