package preflight

import (
	"fmt"
	"sort"
	"strings"
)

func (c *comparison) devices() (Status, string) {
	for _, op := range []string{"qom-list /machine/peripheral", "qom-list /machine/peripheral-anon"} {
		for _, f := range []*facts{c.src, c.dst} {
			if f.err(op) != nil {
				return Warn, unread(f, op)
			}
		}
	}
	var problems []string
	sp, dp := c.src.peripheral, c.dst.peripheral
	for _, id := range sortedKeys(sp) {
		dt, ok := dp[id]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("device %s (%s) is missing on the destination", id, sp[id]))
		case dt != sp[id]:
			problems = append(problems, fmt.Sprintf("device %s is %s on the source, %s on the destination", id, sp[id], dt))
		}
	}
	for _, id := range sortedKeys(dp) {
		if _, ok := sp[id]; !ok {
			problems = append(problems, fmt.Sprintf("device %s (%s) is only on the destination", id, dp[id]))
		}
	}
	// Devices without an id are matched by type (QEMU numbers them in the
	// order they were created, which may differ).
	onlySrc, onlyDst := multisetDiff(c.src.anon, c.dst.anon)
	if len(onlySrc) > 0 {
		problems = append(problems, "devices without id missing on the destination: "+strings.Join(onlySrc, ", "))
	}
	if len(onlyDst) > 0 {
		problems = append(problems, "devices without id only on the destination: "+strings.Join(onlyDst, ", "))
	}
	if len(problems) > 0 {
		return Fail, strings.Join(problems, "; ")
	}
	return Pass, fmt.Sprintf("%d devices with id, %d without, the same on both sides", len(sp), len(c.src.anon))
}

// multisetDiff returns the elements of a not in b and of b not in a,
// counting repeats ("virtio-rng-pci x2").
func multisetDiff(a, b []string) (onlyA, onlyB []string) {
	count := map[string]int{}
	for _, s := range a {
		count[s]++
	}
	for _, s := range b {
		count[s]--
	}
	for _, k := range sortedKeys(count) {
		n := count[k]
		name := k
		if n > 1 || n < -1 {
			name = fmt.Sprintf("%s x%d", k, max(n, -n))
		}
		switch {
		case n > 0:
			onlyA = append(onlyA, name)
		case n < 0:
			onlyB = append(onlyB, name)
		}
	}
	return onlyA, onlyB
}

func (c *comparison) pciAddresses() (Status, string) {
	for _, f := range []*facts{c.src, c.dst} {
		if f.err("query-pci") != nil {
			return Warn, unread(f, "query-pci")
		}
	}
	sa, da := map[string]pciFunc{}, map[string]pciFunc{}
	for _, p := range c.src.pci {
		sa[p.addr()] = p
	}
	for _, p := range c.dst.pci {
		da[p.addr()] = p
	}
	var problems []string
	moved := map[string]bool{} // addresses explained by a move
	for _, s := range c.src.pci {
		if s.QdevID == "" {
			continue
		}
		for _, d := range c.dst.pci {
			if d.QdevID == s.QdevID && d.addr() != s.addr() {
				problems = append(problems, fmt.Sprintf("%s sits at %s on the source, %s on the destination", s.QdevID, s.addr(), d.addr()))
				moved["s"+s.addr()], moved["d"+d.addr()] = true, true
			}
		}
	}
	var addrs []string
	for a := range sa {
		addrs = append(addrs, a)
	}
	for a := range da {
		if _, ok := sa[a]; !ok {
			addrs = append(addrs, a)
		}
	}
	sort.Strings(addrs)
	for _, a := range addrs {
		s, sok := sa[a]
		d, dok := da[a]
		sok = sok && !moved["s"+a]
		dok = dok && !moved["d"+a]
		switch {
		case sok && dok && (s.Vendor != d.Vendor || s.Device != d.Device || s.QdevID != d.QdevID):
			problems = append(problems, fmt.Sprintf("%s is %s on the source, %s on the destination", a, strings.TrimPrefix(s.String(), a+" "), strings.TrimPrefix(d.String(), a+" ")))
		case sok && !dok:
			problems = append(problems, fmt.Sprintf("%s only on the source", s))
		case dok && !sok:
			problems = append(problems, fmt.Sprintf("%s only on the destination", d))
		}
	}
	if len(problems) > 0 {
		return Fail, strings.Join(problems, "; ")
	}
	return Pass, fmt.Sprintf("%d PCI functions at the same addresses", len(c.src.pci))
}
