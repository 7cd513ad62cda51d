// Package qemulab is the repository's one QEMU launcher: a lab of real QEMU
// processes for the integration tests, "qmigrate demo", cmd/qmbench and
// qmp/internal/capture (not only for tests, hence not "testbed"). It resolves the QEMU binary from the environment,
// launches source and destination QEMUs (QMP on a private unix socket, serial
// to a file, TCG by default), builds two-host networks from network
// namespaces joined by a shaped veth link, drives a plain migration through
// package qmp for self-tests, and checks guests from outside after a
// migration (CheckSweep for the boot-sector sweep guest).
//
// A self-test in outline (see integration/testbed_test.go):
//
//	q := qemulab.RequireQEMU(t)
//	g := qemulab.NewSweepGuest(100e6) // ~100 MB/s of dirtied pages under TCG
//	src := qemulab.StartT(t, q, qemulab.Config{Name: "src", Guest: g})
//	dst := qemulab.StartT(t, q, qemulab.Config{Name: "dst", Guest: g, Incoming: true})
//	info, err := qemulab.Migrate(ctx, src, dst, qemulab.MigrateOptions{})
//	rep, err := qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
//
// Config covers what the repository's tests and tools pass to QEMU: the
// guest, RAM size (RAMSize), machine, accelerator and CPU, a memory backend
// of the guest's size (MemBackend), disk images on -blockdev nodes (Drive),
// more QMP sockets, -S, -incoming defer, a network namespace, and Args for
// anything else. FindQEMU resolves the QEMU of the environment, NewQEMU a
// chosen binary, FindQEMUs every QEMU installed here (one per version).
//
// Source and destination must be given equal guests. The sweep guest boots
// from a virtio-blk disk on q35 (SeaBIOS 1.16.2 hangs on AHCI under QEMU
// 10.0); the Linux guest (LinuxGuest, CheckLinux) from -kernel/-initrd.
// Everything runs under TCG with -cpu max unless ProbeAccel proved another
// accelerator for the guest in question (KVM does not boot either guest on
// the project's machines).
//
// The core does not import package testing. tb.go adds thin helpers over the
// TB interface (satisfied by *testing.T) that skip when QEMU or network
// namespaces are unavailable and the CI environment variable is unset, fail
// when it is set, and register every clean-up with TB.Cleanup.
//
// Environment:
//
//	QMIGRATE_QEMU           path of qemu-system-x86_64 (default: on PATH)
//	QMIGRATE_QEMU_FIRMWARE  firmware folder; when set, QEMU gets
//	                        -L $QMIGRATE_QEMU_FIRMWARE -L /usr/share/seabios
//	QMIGRATE_QEMU_IMG       path of qemu-img (default: on PATH)
//	QMIGRATE_CACHE          scripts/setup.sh's folder, whose qemu-*.env files
//	                        FindQEMUs reads when QMIGRATE_QEMU is unset
//	CI                      when set, missing prerequisites fail instead of skip
package qemulab
