// Package linux provides the Linux test guest to the integration tests: Debian's cloud kernel
// plus an initramfs whose /init is this repository's Go program (internal/guest/linux/init),
// with the workload chosen on the kernel command line.
//
// Typical use in a test helper:
//
//	kernel, initrd, err := linux.Assets(ctx) // once per test binary; builds and caches the initramfs
//	w := linux.Workload{Mode: linux.ModeMemDirty, MemBytes: 256 << 20, RateBytes: 50 << 20}
//	args := append(qemuArgs, linux.BootArgs(kernel, initrd, w)...)
//	// start QEMU with -serial file:PATH, then:
//	s := linux.NewSerial(path)
//	ready, err := s.WaitFor(ctx, linux.Kind(linux.KindReady))
//
// QEMU needs -M q35 (or pc) -accel tcg -cpu max -m at least MemBytes+128M, -serial (ttyS0), and
// for the disk modes a virtio disk: -drive file=disk.raw,format=raw,if=virtio (it is /dev/vda).
//
// Assets finds the kernel through QMIGRATE_KERNEL and QMIGRATE_KMOD_DIR, or the kernel.env file
// that scripts/setup.sh writes into the cache folder (QMIGRATE_CACHE, default
// ~/.cache/qmigrate); it builds /init with the go command (CGO_ENABLED=0) and writes the
// initramfs into the cache under a name derived from its content, so repeated calls reuse it.
//
// Measured on the project's 2-core machines (TCG, -cpu max, 512 MiB): READY 2.5-3.5 s after QEMU
// starts on an idle host, under both 7.2 and 10.0; up to ~15 s when other TCG guests load the
// cores. A known hazard: under QEMU 7.2 a memdirty guest dirtying 64 MiB/s arrived with a crashed
// kernel (oops in the timer interrupt, i.e. stale kernel memory) after about 1 in 3 "completed"
// pre-copy migrations; at 4 MiB/s, idle, and under QEMU 10.0 none did. Serial reports such a
// crash as a failed line of kind KindKernel, so tests fail fast instead of timing out.
//
// The command-line keys, the serial line format and the disk log format are in package
// internal/guest/linux/wire; this package re-exports what tests need.
package linux
