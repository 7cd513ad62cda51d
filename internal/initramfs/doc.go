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
//
// Why our own and not a library (github.com/cavaliergopher/cpio is on the module proxy): newc is a
// fixed 110-byte ASCII header and 4-byte padding, about 60 lines to write; what this package adds
// is the determinism the guest cache keys on (root owner, mtime 0, inode numbers from the order of
// entries), which a general cpio library leaves to its caller, and the Reader the tests use to check
// it. A dependency would not remove that code, only move the header writing.
package initramfs
