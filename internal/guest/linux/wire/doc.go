// Package wire is the contract between the Linux test guest's /init program (package
// internal/guest/linux/init, which runs inside the VM) and the host side (package
// internal/guest/linux): the kernel command-line keys, the "QMIGRATE ..." serial lines, the
// memory page format of the dirtier, and the on-disk log format of the disk writer with its
// verifier. It has no I/O of its own beyond io.ReaderAt and is pure, so both sides and the unit
// tests share one implementation.
//
// # Kernel command line
//
// Workload.Args renders, and ParseArgs reads, these keys (sizes accept a K/M/G suffix, powers of
// 1024; durations use Go syntax such as "10s"):
//
//	qmigrate.mode=idle|memdirty|diskwrite|diskverify   what the guest does (default idle)
//	qmigrate.mem=SIZE      memdirty: working set (default 64M)
//	qmigrate.rate=SIZE     memdirty and diskwrite: bytes per second; 0 = as fast as possible
//	                       (default 0 for memdirty, 1M for diskwrite). memdirty counts whole
//	                       pages: dirtying a page writes its 32-byte stamp, so unthrottled it
//	                       dirties about 8 GB/s of pages under TCG on this project's machines
//	qmigrate.disk=PATH     diskwrite/diskverify: block device (default /dev/vda)
//	qmigrate.logsize=SIZE  diskwrite: bytes of the device the log uses, superblock included
//	                       (default 16M; the log wraps around)
//	qmigrate.verify=DUR    diskwrite: verify everything written so far this often (default 10s, 0 = never)
//	qmigrate.expect=N      diskverify: fail unless the log holds records up to sequence N
//	qmigrate.report=DUR    interval of PROGRESS / DISK / TICK lines (default 1s)
//	qmigrate.poweroff=1    diskverify: power the VM off after printing the verdict
//
// # Serial lines
//
// Every line the guest program prints starts with "QMIGRATE ", then a kind, an optional status
// word, then key=value fields (no spaces in values):
//
//	QMIGRATE READY mode=memdirty mem=268435456 pages=65536 rate=52428800 uptime=7.91
//	QMIGRATE PROGRESS pass=12 pages=786432 rate=52401203 uptime=20.02
//	QMIGRATE CHECK OK pass=12 failed_passes=0
//	QMIGRATE CHECK FAIL pass=13 page=4711 want=13 got=12 state=stale
//	QMIGRATE CHECK FAIL pass=13 bad=3 failed_passes=1
//	QMIGRATE DISK seq=4096 synced=4090 rate=1048576 uptime=12.00
//	QMIGRATE DISKVERIFY OK records=4096 last=4096
//	QMIGRATE DISKVERIFY FAIL seq=17 slot=16 reason=stale got=1
//	QMIGRATE TICK n=5 uptime=12.00
//	QMIGRATE ERROR msg=open_/dev/vda:_no_such_file
//
// The memory dirtier verifies each page against the generation it last wrote before writing
// it again, so a page that arrived stale on the destination is reported in the pass in which the
// writer next reaches it; "CHECK OK pass=N" means every page was found intact during pass N.
// failed_passes counts passes with at least one bad page since boot.
//
// The disk writer also verifies on demand when the line "verify" arrives on the serial console
// (the guest's stdin).
package wire
