// Package sweep is qmigrate's boot-sector test guest and its integrity check.
//
// The guest (source: testdata/guests/sweep/sweep.S, prebuilt image embedded
// here so that go build never needs an assembler) enters 32-bit protected
// mode, writes 'A' to COM1 once and then, forever, increments the first byte
// of every 4 KiB page in [1 MiB, 100 MiB) in ascending order, busy-waiting a
// patchable spin count after each page and writing 'B' to COM1 after each
// full pass of 25344 pages.
//
// With the guest stopped, the first bytes of the pages form a run of value
// v+1 followed by a run of value v (mod 256). Check verifies exactly that over
// a pmemsave dump of the range (the invariant of QEMU's migration-test,
// check_guests_ram). A page that a migration lost, sent stale or sent from an
// older pass breaks it.
//
// Boot it on machine q35 from a virtio-blk disk holding the image padded to
// DiskSize (see WriteDisk and DriveArgs): SeaBIOS 1.16.2 hangs on AHCI under
// QEMU 10.0 and refuses disks smaller than about 1 MiB.
package sweep
