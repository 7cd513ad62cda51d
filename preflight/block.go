package preflight

import (
	"fmt"
	"slices"
	"strings"
)

// matches reports whether name designates the block device b (device
// name, qdev id or path, or node name), as Storage.Disks names them.
func (b blockInfo) matches(name string) bool {
	if name == "" {
		return false
	}
	if b.Device == name || b.QDev == name || strings.TrimPrefix(b.QDev, "/machine/peripheral/") == name ||
		strings.TrimSuffix(strings.TrimPrefix(b.QDev, "/machine/peripheral/"), "/virtio-backend") == name {
		return true
	}
	return b.Inserted != nil && b.Inserted.NodeName == name
}

// peer finds the destination device of a source device: the same device
// name, else the same qdev path.
func peer(b blockInfo, dst []blockInfo) int {
	if b.Device != "" {
		if i := slices.IndexFunc(dst, func(d blockInfo) bool { return d.Device == b.Device }); i >= 0 {
			return i
		}
	}
	if b.QDev != "" {
		return slices.IndexFunc(dst, func(d blockInfo) bool { return d.QDev == b.QDev })
	}
	return -1
}

func size(b blockInfo) (uint64, bool) {
	if b.Inserted == nil || b.Inserted.Image == nil {
		return 0, false
	}
	return b.Inserted.Image.VirtualSize, true
}

// copied returns which source devices a storage migration copies, and the
// names in Storage.Disks that match none.
func (c *comparison) copied() (map[int]bool, []string) {
	out := map[int]bool{}
	st := c.opts.Storage
	if st == nil {
		return out, nil
	}
	shared := func(b blockInfo) bool { return slices.ContainsFunc(st.Shared, b.matches) }
	if len(st.Disks) == 0 {
		for i, b := range c.src.blocks {
			if b.Inserted != nil && !b.Inserted.ReadOnly && !shared(b) {
				out[i] = true
			}
		}
		return out, nil
	}
	var missing []string
	for _, name := range st.Disks {
		i := slices.IndexFunc(c.src.blocks, func(b blockInfo) bool { return b.matches(name) })
		if i < 0 {
			missing = append(missing, name)
			continue
		}
		out[i] = true
	}
	return out, missing
}

func (c *comparison) blockDevices() (Status, string) {
	for _, f := range []*facts{c.src, c.dst} {
		if f.err("query-block") != nil {
			return Warn, unread(f, "query-block")
		}
	}
	copied, missing := c.copied()
	var problems, warns, disks []string
	for _, name := range missing {
		problems = append(problems, fmt.Sprintf("disk %s to copy is not on the source", name))
	}
	seen := map[int]bool{}
	for i, s := range c.src.blocks {
		name := s.label()
		j := peer(s, c.dst.blocks)
		if j < 0 {
			problems = append(problems, fmt.Sprintf("disk %s is missing on the destination", name))
			continue
		}
		seen[j] = true
		d := c.dst.blocks[j]
		if s.Inserted == nil {
			if d.Inserted != nil {
				warns = append(warns, fmt.Sprintf("drive %s is empty on the source, has %s on the destination", name, d.Inserted.File))
			}
			continue
		}
		if d.Inserted == nil {
			problems = append(problems, fmt.Sprintf("drive %s has %s on the source, no medium on the destination", name, s.Inserted.File))
			continue
		}
		ss, sok := size(s)
		ds, dok := size(d)
		switch {
		case sok && dok && ss != ds:
			problems = append(problems, fmt.Sprintf("disk %s has %s on the source, %s on the destination", name, sizeString(ss), sizeString(ds)))
			continue
		case !sok || !dok:
			warns = append(warns, fmt.Sprintf("disk %s: size not reported, not compared", name))
		}
		how := "shared"
		if copied[i] {
			how = "copied"
			if d.Inserted.ReadOnly {
				problems = append(problems, fmt.Sprintf("disk %s to copy is read-only on the destination", name))
			}
		} else {
			if s.Inserted.File != d.Inserted.File {
				warns = append(warns, fmt.Sprintf("shared disk %s is %s on the source, %s on the destination: it must be the same image (else copy it: --copy-storage/--disk)", name, s.Inserted.File, d.Inserted.File))
			}
			if !s.Inserted.ReadOnly && !d.Inserted.ReadOnly && d.Inserted.Active != nil && *d.Inserted.Active {
				problems = append(problems, fmt.Sprintf("shared disk %s is active and writable on the destination while the source writes it: start the destination with -incoming so it takes the image over at the switchover", name))
			}
		}
		disks = append(disks, fmt.Sprintf("%s (%s, %s)", name, how, sizeString(ss)))
	}
	for j, d := range c.dst.blocks {
		if !seen[j] {
			problems = append(problems, fmt.Sprintf("drive %s is only on the destination", d.label()))
		}
	}
	switch {
	case len(problems) > 0:
		return Fail, strings.Join(append(problems, warns...), "; ")
	case len(warns) > 0:
		return Warn, strings.Join(warns, "; ")
	case len(disks) == 0 && len(c.src.blocks) == 0:
		return Pass, "no block devices"
	case len(disks) == 0:
		return Pass, fmt.Sprintf("%d drives, all empty", len(c.src.blocks))
	}
	return Pass, strings.Join(disks, ", ")
}

func sizeString(n uint64) string { return bytesString(n) }
