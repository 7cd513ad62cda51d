// Command init is the /init of the Linux test guest: the first and only process of a VM booted
// with Debian's cloud kernel and an initramfs built by package internal/guest/linux. It is built
// statically (CGO_ENABLED=0) and never exits (PID 1 must not).
//
// At boot it mounts /proc, /sys and /dev (devtmpfs), loads the kernel modules listed in
// /modules/order with finit_module (virtio_pci, virtio_blk and their dependencies), reads its
// workload from the qmigrate.* keys of /proc/cmdline, and runs it, printing "QMIGRATE ..." lines
// on the serial console. The keys and lines are documented in package
// internal/guest/linux/wire.
//
// Workloads:
//   - idle: READY, then TICK lines.
//   - memdirty: fills a working set of pages stamped (index, generation, checksum), then sweeps
//     it at the set rate. Before rewriting a page with the next generation it checks that the
//     page still holds the generation it last wrote (kept in a separate array), so a page that
//     arrived stale after a migration is reported (CHECK FAIL) the next time the sweep reaches
//     it, and every completed pass yields a verdict (CHECK OK / CHECK FAIL).
//   - diskwrite: writes a superblock and then records 1, 2, ... of a wrapping log (package wire)
//     with O_DIRECT at the set rate, fdatasync before each DISK line, and verifies everything
//     written so far (reading with O_DIRECT, so the guest's page cache cannot hide a stale disk)
//     every qmigrate.verify interval and whenever the line "verify" arrives on the console.
//   - diskverify: verifies the log once (qmigrate.expect sets the last record that must be
//     there), prints DISKVERIFY OK/FAIL, then idles or powers off (qmigrate.poweroff=1).
package main
