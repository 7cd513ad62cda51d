// Package qemutest is a fake pair of QEMUs, a migration source and its
// destination, for testing code that migrates VMs over QMP without
// starting QEMU: qmigrate's own engine and block-mirror tests, and a
// hypervisor manager's integration with qmigrate.
//
// # What it models
//
// Each side is a qmp/qmptest server whose handlers share one model:
//
//   - run states and their events (query-status, stop, cont; STOP, RESUME),
//     the machine type, UUID and RAM size, and a query-qmp-schema with the
//     commands and arguments of the simulated QEMU version (runstate.go);
//   - migration capabilities and parameters (config.go);
//   - objects, TLS credentials among them, and whether the TLS handshake
//     between the sides can work (objects.go);
//   - the migration itself: migrate and migrate-incoming with the
//     arguments of each version's schema (7.2, 8.2, 9.1, 10.0 differ) and
//     QEMU's own refusals, query-migrate, cancel, pause-before-switchover,
//     postcopy, yank, and the MIGRATION events (migration.go);
//   - the RAM migration against a link of given throughput and a guest of
//     given dirty rate: bitmap syncs as QEMU does them (at the
//     downtime-limit threshold, every 5 s with auto-converge), the dirty
//     rate measured over 1 s periods, auto-converge throttling,
//     max-bandwidth, postcopy, and calc-dirty-rate (ram.go, on the model
//     qmigrate's strategy tests use too);
//   - with disks, the block layer: named nodes, NBD server and exports,
//     mirror jobs that copy against a guest write rate, blockdev-create
//     jobs (block.go); without, an empty query-block;
//   - the guest-visible machine that package preflight compares
//     (machine.go): the machine type and query-machines with the "pc" and
//     "q35" aliases of each version, the vCPUs (query-cpus-fast,
//     query-hotpluggable-cpus, qom-get /machine smp) and their CPU objects
//     (qom-list, the model properties, feature-words and one boolean
//     property per named feature, as real QEMU 7.2 and 10.0 gave them for
//     qemu64 and max), the devices (qom-list /machine/peripheral and
//     peripheral-anon, query-pci) and migration blockers
//     (blocked-reasons). A default pair, and a pair of two versions with
//     the default machine, passes every preflight check.
//
// It models what a migration manager relies on, not QEMU: no guest runs,
// no byte crosses a socket, the migration address is only compared with
// the one the destination listens on, and commands outside the list above
// get CommandNotFound. Figures come from the model (Options), not from a
// measurement.
//
// # Lifecycle
//
// New starts both servers; connect with Pair.Clients (net.Pipe, works
// inside testing/synctest bubbles) or Pair.ListenUnix (real sockets for
// code that dials an address), and Close the pair when done. From migrate
// on, a goroutine steps the RAM model every Options.Tick on the clock (the
// virtual one under synctest) until the migration ends. Inspect the state
// with the Pair's and each QEMU's getters (RunState, Caps, Param, Status,
// BlockLeft, ...) and the commands received with the embedded server's
// Calls and CallsOf.
//
// # Faults
//
// Options choose the versions and the machine each side presents (Machine,
// CPU with feature flags, VCPUs, MaxVCPUs, Devices, Blockers, and their Dst
// counterparts: different CPU features, vCPU count, a missing or moved
// device, a blocker, an alias resolved differently), a failure at setup
// (FailWith), how a late
// cancel ends (LateCancel), a destination that fails loading
// (DstFailsLoad), one whose in-band monitor is held while it loads the
// device state in postcopy (DstDeviceLoad), refused objects (RefuseObject). At run time: KillDst (the
// destination exits), Freeze and Thaw (a QEMU stopped by SIGSTOP),
// SetThroughput and SetDirtyRate, SetDiskWriteRate, and for the block
// layer RefuseMirror, FailMirror, FailCreate and SetMirrorProgress. Any
// command can be replaced with QEMU.Handle (the embedded qmptest server's),
// wrapping QEMU.Handler to defer to the model; such handlers are not held
// by Freeze.
//
// All methods are safe for concurrent use.
package qemutest
