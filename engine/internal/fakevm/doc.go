// Package fakevm simulates a source and a destination QEMU on top of
// qmp/qmptest, enough for the engine to migrate between them: run states,
// capabilities and parameters, migrate-incoming/migrate, a RAM model with
// passes, dirtying, bandwidth, downtime limit, auto-converge, pause-before-
// switchover, postcopy, stop/cont, cancel, and events; with Options.Disk a
// block layer (one disk per side, NBD server and exports, mirror jobs that
// copy against a guest write rate, block-job-change from 8.2) for storage
// migrations. migrate and migrate-incoming take the arguments of the
// simulated version's schema (Options.Version for the source, DstVersion
// for the destination) and refuse any other with QEMU's own error
// (qmptest.Args): 7.2 refuses "channels" ("Parameter 'uri' is missing") and
// "exit-on-error", 8.2-9.0 "exit-on-error", 9.1+ take both. Time is the
// real (or,
// under testing/synctest, the virtual) clock: a goroutine ticks the model
// while a migration runs.
//
// Lifecycle: New starts two qmptest servers (Src, Dst) with handlers that
// share one model under a mutex; tests connect with Src.Client/Dst.Client,
// inject failures by replacing handlers (Handle), KillDst, SetThroughput,
// Freeze/Thaw (a QEMU stopped as by SIGSTOP: its monitor answers nothing
// until thawed) or Options.FailWith, and Close stops the model goroutine
// and both servers. The destination answers yank of the migration instance
// by failing its incoming migration and exiting.
// It is a test double: it models what the engine relies on, not QEMU.
package fakevm
