// Package initramfs writes (and reads back) Linux initramfs archives in the "newc" cpio format
// (magic 070701), the format the kernel unpacks into its root filesystem at boot.
//
// A Writer emits entries in the order they are added: add parent directories before their
// contents, then call Close to write the TRAILER!!! entry. The kernel wants no compression to be
// fast under TCG, so the archive is written as is; wrap the io.Writer in a compressor if needed.
// Every entry is owned by root (uid 0, gid 0), has mtime 0 and a unique inode number, so the
// same inputs always give the same bytes (useful for content-addressed caching).
//
// Reader parses what Writer writes (and any newc archive without hard links); it exists for tests
// and for tools that inspect an initramfs.
package initramfs
