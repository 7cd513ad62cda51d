package blockmirror

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/qmigrate/qmigrate/qmp"
)

// disk is one mirrored disk and what was done for it.
type disk struct {
	// plan (filled by preflight)
	node     string // source root node (what the device uses)
	name     string // how the caller or QEMU names it (for messages)
	size     uint64 // virtual size
	format   string // source format driver
	srcFile  string // source image filename
	dstNode  string // destination node to export
	sync     string // full | top
	create   bool   // destination image to be created
	job      string // mirror job id
	nbdNode  string // source NBD client node
	exportID string
	export   string // NBD export name (unguessable)
	copyMode string

	// what exists now (cleared as it is undone)
	createdNodes []string // destination nodes added by CreateTargets, in order
	exported     bool
	nbdAdded     bool
	mirroring    bool // job started and not known to be gone

	// job state (from events and query-block-jobs)
	ready    bool
	ended    bool  // the job is gone
	endErr   error // why, when it was not the soft cancel of Finish
	finished bool  // ended with BLOCK_JOB_COMPLETED after Finish's cancel
	done     uint64
	total    uint64
	rateAt   int64 // unix nanos of the last sample
	rate     float64
}

// matches reports whether name designates the block device b.
func matches(b qmp.BlockInfo, name string) bool {
	if name == "" {
		return false
	}
	if b.Device == name || b.QDev == name {
		return true
	}
	return b.Inserted != nil && b.Inserted.NodeName == name
}

func label(b qmp.BlockInfo) string {
	switch {
	case b.Inserted != nil && b.Inserted.NodeName != "":
		return b.Inserted.NodeName
	case b.Device != "":
		return b.Device
	}
	return b.QDev
}

// selectDisks picks the source devices to mirror.
func selectDisks(cfg Config, blocks []qmp.BlockInfo) ([]qmp.BlockInfo, error) {
	shared := func(b qmp.BlockInfo) bool {
		return slices.ContainsFunc(cfg.Shared, func(n string) bool { return matches(b, n) })
	}
	var out []qmp.BlockInfo
	if len(cfg.Disks) == 0 {
		for _, b := range blocks {
			if b.Inserted == nil || b.Inserted.ReadOnly || shared(b) {
				continue
			}
			out = append(out, b)
		}
		return out, nil
	}
	for _, name := range cfg.Disks {
		i := slices.IndexFunc(blocks, func(b qmp.BlockInfo) bool { return matches(b, name) })
		if i < 0 {
			return nil, fmt.Errorf("%w: disk %q not found on the source", ErrPreflight, name)
		}
		b := blocks[i]
		if b.Inserted == nil {
			return nil, fmt.Errorf("%w: disk %q has no medium", ErrPreflight, name)
		}
		if b.Inserted.ReadOnly {
			return nil, fmt.Errorf("%w: disk %q is read-only; read-only disks are never mirrored", ErrPreflight, name)
		}
		if shared(b) {
			return nil, fmt.Errorf("%w: disk %q is both selected and shared", ErrPreflight, name)
		}
		if slices.ContainsFunc(out, func(o qmp.BlockInfo) bool { return o.Inserted.NodeName == b.Inserted.NodeName }) {
			return nil, fmt.Errorf("%w: disk %q selected twice", ErrPreflight, name)
		}
		out = append(out, b)
	}
	return out, nil
}

// findTarget finds the destination node for a source device: the device with
// the same qdev or device name, else a named node with the same node name.
func findTarget(b qmp.BlockInfo, dstBlocks []qmp.BlockInfo, dstNodes []qmp.BlockDeviceInfo) *qmp.BlockDeviceInfo {
	for _, d := range dstBlocks {
		if d.Inserted == nil {
			continue
		}
		if (b.QDev != "" && d.QDev == b.QDev) || (b.Device != "" && d.Device == b.Device) {
			return d.Inserted
		}
	}
	for i := range dstNodes {
		if dstNodes[i].NodeName == b.Inserted.NodeName {
			return &dstNodes[i]
		}
	}
	return nil
}

func virtualSize(n *qmp.BlockDeviceInfo) (uint64, bool) {
	if n == nil || n.Image == nil {
		return 0, false
	}
	return n.Image.VirtualSize, true
}

func backingDepth(n *qmp.BlockDeviceInfo) int {
	if n.BackingFileDepth > 0 {
		return n.BackingFileDepth
	}
	d := 0
	if n.Image != nil {
		for im := n.Image.BackingImage; im != nil; im = im.BackingImage {
			d++
		}
	}
	return d
}

// plan runs the preflight checks and fills the per-disk plan. It changes nothing.
func (s *Session) plan(ctx context.Context) error {
	srcBlocks, err := s.src.QueryBlock(ctx)
	if err != nil {
		return fmt.Errorf("%w: source query-block: %w", ErrPreflight, err)
	}
	sel, err := selectDisks(s.cfg, srcBlocks)
	if err != nil {
		return err
	}
	if len(sel) == 0 {
		return fmt.Errorf("%w: no disk to mirror (all read-only, shared or absent)", ErrPreflight)
	}
	dstBlocks, err := s.dst.QueryBlock(ctx)
	if err != nil {
		return fmt.Errorf("%w: destination query-block: %w", ErrPreflight, err)
	}
	dstNodes, err := s.dst.QueryNamedBlockNodes(ctx)
	if err != nil {
		return fmt.Errorf("%w: destination query-named-block-nodes: %w", ErrPreflight, err)
	}
	copyMode := "background"
	if s.cfg.WriteBlocking {
		copyMode = "write-blocking"
	}
	for i, b := range sel {
		in := b.Inserted
		size, ok := virtualSize(in)
		if !ok {
			return fmt.Errorf("%w: disk %q: source reports no image size", ErrPreflight, label(b))
		}
		d := &disk{
			node:     in.NodeName,
			name:     label(b),
			size:     size,
			format:   in.Driver,
			srcFile:  in.File,
			sync:     "full",
			job:      s.jobPrefix() + strconv.Itoa(i),
			nbdNode:  fmt.Sprintf("qmigrate-nbd-%s-%d", s.token, i),
			exportID: fmt.Sprintf("qmigrate-export-%s-%d", s.token, i),
			export:   "qmigrate-" + randomHex(16),
			copyMode: copyMode,
		}
		if d.node == "" {
			return fmt.Errorf("%w: disk %q has no node name", ErrPreflight, d.name)
		}
		t := findTarget(b, dstBlocks, dstNodes)
		switch {
		case t == nil && s.cfg.CreateTargets:
			if d.format != "raw" && d.format != "qcow2" {
				return fmt.Errorf("%w: disk %q: cannot create a %q image on the destination (raw and qcow2 only)", ErrPreflight, d.name, d.format)
			}
			if d.srcFile == "" && s.cfg.TargetDir == "" {
				return fmt.Errorf("%w: disk %q: no source file name to derive the destination path from; set TargetDir", ErrPreflight, d.name)
			}
			d.create = true
			d.dstNode = d.node
		case t == nil:
			return fmt.Errorf("%w: disk %q: the destination has no node %q (create it, or set CreateTargets)", ErrPreflight, d.name, d.node)
		default:
			if t.ReadOnly {
				return fmt.Errorf("%w: disk %q: destination node %q is read-only", ErrPreflight, d.name, t.NodeName)
			}
			dsize, ok := virtualSize(t)
			if !ok {
				return fmt.Errorf("%w: disk %q: destination node %q reports no image size", ErrPreflight, d.name, t.NodeName)
			}
			if dsize != size {
				return fmt.Errorf("%w: disk %q: destination node %q has %d bytes, source has %d", ErrPreflight, d.name, t.NodeName, dsize, size)
			}
			if t.File != "" && t.File == in.File {
				if local(s.addr) {
					return fmt.Errorf("%w: disk %q: source and destination use the same image file %s (declare it in Shared if the storage is shared)", ErrPreflight, d.name, in.File)
				}
				s.log.Warn("source and destination image have the same path; assuming different hosts", "disk", d.name, "file", in.File)
			}
			if n := backingDepth(in); n > 0 && backingDepth(t) == n &&
				in.BackingFile != "" && filepath.Base(t.BackingFile) == filepath.Base(in.BackingFile) {
				d.sync = "top"
			}
			d.dstNode = t.NodeName
		}
		s.disks = append(s.disks, d)
	}
	return nil
}

// targetPath is where CreateTargets puts the destination image of d.
func (s *Session) targetPath(d *disk) string {
	if s.cfg.TargetDir == "" {
		return d.srcFile
	}
	base := filepath.Base(d.srcFile)
	if d.srcFile == "" || base == "." || base == "/" {
		base = d.node + "." + d.format
	}
	return filepath.Join(s.cfg.TargetDir, base)
}
