package preflight

import (
	"fmt"
	"strings"
)

func (c *comparison) migrationBlockers() (Status, string) {
	if c.src.err("query-migrate") != nil {
		return Warn, unread(c.src, "query-migrate")
	}
	if r := c.src.mig.BlockedReasons; len(r) > 0 {
		return Fail, "QEMU refuses to migrate this guest: " + strings.Join(r, "; ")
	}
	return Pass, "no migration blocker on the source"
}

// postcopyBlocked names why a device type cannot take postcopy, "" when it
// can. VFIO devices save their state in the stop-and-copy phase only and
// QEMU refuses postcopy with them.
func postcopyBlocked(typ string) string {
	if strings.HasPrefix(typ, "vfio-") {
		return "VFIO devices cannot migrate in postcopy"
	}
	return ""
}

// postcopyNeeds names a device type whose backend must support postcopy on
// its own (a warning, not a refusal), "" for others.
func postcopyNeeds(typ string) string {
	if strings.Contains(typ, "vhost-user") {
		return "its vhost-user backend must support postcopy (VHOST_USER_PROTOCOL_F_PAGEFAULT)"
	}
	return ""
}

// refusePostcopy records something that forbids postcopy: a warning that
// postcopy stays off when it is only permitted, a failure when demanded.
func (c *comparison) refusePostcopy(why string) (Status, string) {
	c.postcopyOK = false
	if c.opts.Postcopy == PostcopyRequired {
		return Fail, why
	}
	return Warn, why + ": the migration runs without postcopy"
}

func (c *comparison) postcopyDevices() (Status, string) {
	if c.opts.Postcopy == PostcopyOff {
		return Pass, "postcopy not permitted: not checked"
	}
	for _, op := range []string{"qom-list /machine/peripheral", "qom-list /machine/peripheral-anon"} {
		if c.src.err(op) != nil {
			return Warn, unread(c.src, op)
		}
	}
	var blocked, needs []string
	add := func(name, typ string) {
		if why := postcopyBlocked(typ); why != "" {
			blocked = append(blocked, fmt.Sprintf("%s (%s): %s", name, typ, why))
		}
		if why := postcopyNeeds(typ); why != "" {
			needs = append(needs, fmt.Sprintf("%s (%s): %s", name, typ, why))
		}
	}
	for _, id := range sortedKeys(c.src.peripheral) {
		add(id, c.src.peripheral[id])
	}
	for _, typ := range c.src.anon {
		add("a device without id", typ)
	}
	if len(blocked) > 0 {
		st, d := c.refusePostcopy("postcopy is impossible: " + strings.Join(blocked, "; "))
		if len(needs) > 0 {
			d += "; also " + strings.Join(needs, "; ")
		}
		return st, d
	}
	if len(needs) > 0 {
		return Warn, "postcopy may fail: " + strings.Join(needs, "; ")
	}
	return Pass, "no device forbids postcopy"
}

func (c *comparison) postcopyUserfaultfd() (Status, string) {
	if c.opts.Postcopy == PostcopyOff {
		return Pass, "postcopy not permitted: not checked"
	}
	var lacking []string
	for _, f := range []*facts{c.src, c.dst} {
		if f.err("query-migrate-capabilities") != nil {
			return Warn, unread(f, "query-migrate-capabilities")
		}
		if _, ok := f.caps["postcopy-ram"]; !ok {
			lacking = append(lacking, fmt.Sprintf("the %s QEMU %s has no postcopy-ram capability", f.side, f.version))
		}
	}
	if len(lacking) > 0 {
		return c.refusePostcopy(strings.Join(lacking, "; "))
	}
	if c.opts.DestinationPID <= 0 {
		return Warn, "the destination's host is not visible from here (not a local unix socket): postcopy needs userfaultfd for the destination QEMU there: " + uffdSuggestion(c.dst)
	}
	h, err := readHost(hostRoot, c.opts.DestinationPID)
	if err != nil {
		return Warn, fmt.Sprintf("cannot read the destination QEMU's process (pid %d): %v; postcopy needs userfaultfd for it: %s", c.opts.DestinationPID, err, uffdSuggestion(c.dst))
	}
	if why := h.uffdProblem(c.dst.version.AtLeast(8, 1)); why != "" {
		return c.refusePostcopy(fmt.Sprintf("the destination QEMU (pid %d, uid %d) cannot use userfaultfd: %s", c.opts.DestinationPID, h.uid, why))
	}
	return Pass, fmt.Sprintf("the destination QEMU (pid %d) can use userfaultfd (%s)", c.opts.DestinationPID, h.uffdWay(c.dst.version.AtLeast(8, 1)))
}

func uffdSuggestion(dst *facts) string {
	s := "run it as root or with CAP_SYS_PTRACE, or set the sysctl vm.unprivileged_userfaultfd=1"
	if dst.version.AtLeast(8, 1) {
		s += ", or give its user read-write access to /dev/userfaultfd"
	}
	return s
}
