// Package qmp is qmigrate's own client for the QEMU Machine Protocol.
package qmp
