// Package blockmirror migrates non-shared disks alongside a live migration:
// an NBD export per disk on the destination, a blockdev-mirror job per disk on
// the source, and the mirrors ended in the pre-switchover window so that the
// destination images match the RAM and device state exactly.
package blockmirror
