// Package preflight decides, before anything changes on either QEMU, whether
// a live migration between two running QEMUs can work, and says every reason
// why not. It only reads: every command it sends is a query (query-*,
// qom-list, qom-get), so it can run against a guest in production at any
// time, alone (qmigrate check) or as part of the engine's prepare phase.
//
// Run compares the source and the destination:
//
//   - run-state: the source runs (or is paused) with no migration under way,
//     the destination waits for one (-incoming defer).
//   - machine-type: the same machine type; when they differ, a hint names the
//     -machine to start the destination with (an alias such as "pc" resolved
//     to pc-i440fx-7.2 on one side and pc-i440fx-10.0 on the other).
//   - ram-size: the same RAM size.
//   - cpu-model: the CPU type and what CPUID tells the guest about it
//     (vendor, family, model, stepping, model-id, levels, physical address
//     bits), read on the first vCPU: QEMU gives every vCPU the -cpu model and
//     refuses to hotplug another type (each qom-get costs QEMU a main-loop
//     turn, about 0.3 ms).
//   - cpu-features: every CPUID feature word of every vCPU (the
//     feature-words property of the CPU objects); a difference is named
//     feature by feature from the CPU objects' boolean properties
//     ("destination lacks pcommit; adds rdseed, sha-ni").
//   - vcpu-topology: the vCPU count, sockets/dies/cores/threads and the
//     hotpluggable slots (query-cpus-fast, query-hotpluggable-cpus).
//   - devices: the same devices with the same ids and types
//     (/machine/peripheral, /machine/peripheral-anon).
//   - pci-addresses: the same PCI functions at the same addresses
//     (query-pci, bridges included).
//   - block-devices: every disk of the source exists on the destination with
//     the same size; shared disks on the same image, not active read-write on
//     both sides where QEMU shows it; disks to copy writable on the
//     destination.
//   - migration-blockers: the reasons QEMU gives for refusing to migrate
//     (query-migrate's blocked-reasons), as QEMU words them.
//   - postcopy-devices: devices that cannot take postcopy (VFIO; vhost-user
//     backends need their own support), when postcopy is permitted.
//   - postcopy-userfaultfd: postcopy's prerequisites on the destination: the
//     postcopy-ram capability on both sides, and userfaultfd for the
//     destination QEMU's process when it runs on this host.
//
// Every check gives a [Result] with a [Name], a [Status] and a detail that
// names every difference. [Report.Err] is nil when the migration can run,
// otherwise an [*Error] listing every failed check; errors.Is(err,
// [ErrFailed]) matches it. A failure to talk to a QEMU at all is Run's own
// error; a query a QEMU does not answer (an older version, another target)
// makes its check a warning that says so.
//
// Library rules: standard library and golang.org/x/sys only.
package preflight
