package initramfs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strconv"
	"strings"
)

// Mode bits of the cpio header (the st_mode of the entry).
const (
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
	modeType    = 0o170000
)

const (
	magic      = "070701"
	headerSize = 110
	trailer    = "TRAILER!!!"
)

// Type is the kind of an archive entry.
type Type int

// Entry kinds.
const (
	TypeFile Type = iota
	TypeDir
	TypeSymlink
	TypeCharDev
)

func (t Type) String() string {
	switch t {
	case TypeFile:
		return "file"
	case TypeDir:
		return "dir"
	case TypeSymlink:
		return "symlink"
	case TypeCharDev:
		return "chardev"
	}
	return "Type(" + strconv.Itoa(int(t)) + ")"
}

// Entry is one member of an archive as Reader returns it.
type Entry struct {
	Name string      // path without a leading "/", e.g. "dev/console"
	Type Type        // kind of entry
	Perm fs.FileMode // permission bits (0o777 plus setuid/setgid/sticky as 0o7000)
	Data []byte      // file contents, or the target of a symlink
	// RdevMajor and RdevMinor are the device numbers of a device node.
	RdevMajor, RdevMinor uint32
}

// Writer writes a newc archive. It is not safe for concurrent use.
type Writer struct {
	w      io.Writer
	ino    uint32
	closed bool
	err    error
}

// NewWriter returns a Writer that writes the archive to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: w, ino: 1}
}

// Dir adds a directory.
func (w *Writer) Dir(name string, perm fs.FileMode) error {
	return w.entry(name, modeDir|uint32(perm.Perm()), 0, 0, nil, 2)
}

// File adds a regular file with the given contents.
func (w *Writer) File(name string, perm fs.FileMode, data []byte) error {
	return w.entry(name, modeFile|uint32(perm.Perm()), 0, 0, data, 1)
}

// Symlink adds a symbolic link name pointing at target.
func (w *Writer) Symlink(name, target string) error {
	return w.entry(name, modeSymlink|0o777, 0, 0, []byte(target), 1)
}

// CharDev adds a character device node (e.g. "dev/console", 5, 1).
func (w *Writer) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return w.entry(name, modeCharDev|uint32(perm.Perm()), major, minor, nil, 1)
}

// Close writes the trailer. It does not close the underlying writer.
func (w *Writer) Close() error {
	if w.closed {
		return w.err
	}
	err := w.write(trailer, 0, 0, 0, 0, nil, 1)
	w.closed = true
	if w.err == nil {
		w.err = err
	}
	return err
}

func (w *Writer) entry(name string, mode, major, minor uint32, data []byte, nlink uint32) error {
	if w.closed {
		return errors.New("initramfs: write after Close")
	}
	if w.err != nil {
		return w.err
	}
	name = strings.TrimPrefix(name, "/")
	if name == "" || name == trailer || strings.ContainsRune(name, 0) {
		return fmt.Errorf("initramfs: invalid entry name %q", name)
	}
	w.ino++
	if err := w.write(name, w.ino, mode, major, minor, data, nlink); err != nil {
		w.err = err
		return err
	}
	return nil
}

func (w *Writer) write(name string, ino, mode, rmajor, rminor uint32, data []byte, nlink uint32) error {
	namesize := len(name) + 1
	hdr := make([]byte, 0, headerSize+namesize+3)
	hdr = append(hdr, magic...)
	for _, v := range []uint32{
		ino, mode, 0 /* uid */, 0 /* gid */, nlink, 0, /* mtime */
		uint32(len(data)), 0, 0 /* devmajor/minor of the containing fs */, rmajor, rminor,
		uint32(namesize), 0, /* check */
	} {
		hdr = fmt.Appendf(hdr, "%08x", v)
	}
	hdr = append(hdr, name...)
	hdr = append(hdr, 0)
	hdr = append(hdr, make([]byte, pad4(len(hdr)))...)
	if _, err := w.w.Write(hdr); err != nil {
		return fmt.Errorf("initramfs: write %s: %w", name, err)
	}
	if len(data) > 0 {
		if _, err := w.w.Write(data); err != nil {
			return fmt.Errorf("initramfs: write %s: %w", name, err)
		}
		if p := pad4(len(data)); p > 0 {
			if _, err := w.w.Write(make([]byte, p)); err != nil {
				return fmt.Errorf("initramfs: write %s: %w", name, err)
			}
		}
	}
	return nil
}

func pad4(n int) int { return (4 - n%4) % 4 }

// Reader reads a newc archive entry by entry.
type Reader struct {
	r    *bufio.Reader
	done bool
}

// NewReader returns a Reader of the archive in r.
func NewReader(r io.Reader) *Reader {
	return &Reader{r: bufio.NewReader(r)}
}

// Next returns the next entry, or io.EOF after the trailer.
func (r *Reader) Next() (Entry, error) {
	if r.done {
		return Entry{}, io.EOF
	}
	var hdr [headerSize]byte
	if _, err := io.ReadFull(r.r, hdr[:]); err != nil {
		return Entry{}, fmt.Errorf("initramfs: read header: %w", noEOF(err))
	}
	if string(hdr[:6]) != magic {
		return Entry{}, fmt.Errorf("initramfs: bad magic %q", hdr[:6])
	}
	var f [13]uint32
	for i := range f {
		v, err := strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
		if err != nil {
			return Entry{}, fmt.Errorf("initramfs: bad header field %d: %w", i, err)
		}
		f[i] = uint32(v)
	}
	mode, size, rmajor, rminor, namesize := f[1], f[6], f[9], f[10], f[11]
	if namesize == 0 || namesize > 1<<16 {
		return Entry{}, fmt.Errorf("initramfs: bad name size %d", namesize)
	}
	name := make([]byte, int(namesize)+pad4(headerSize+int(namesize)))
	if _, err := io.ReadFull(r.r, name); err != nil {
		return Entry{}, fmt.Errorf("initramfs: read name: %w", noEOF(err))
	}
	if name[namesize-1] != 0 {
		return Entry{}, errors.New("initramfs: name is not NUL-terminated")
	}
	e := Entry{Name: string(name[:namesize-1]), Perm: fs.FileMode(mode & 0o7777), RdevMajor: rmajor, RdevMinor: rminor}
	if e.Name == trailer {
		r.done = true
		return Entry{}, io.EOF
	}
	data := make([]byte, int(size)+pad4(int(size)))
	if _, err := io.ReadFull(r.r, data); err != nil {
		return Entry{}, fmt.Errorf("initramfs: read %s: %w", e.Name, noEOF(err))
	}
	if size > 0 {
		e.Data = data[:size]
	}
	switch mode & modeType {
	case modeFile:
		e.Type = TypeFile
	case modeDir:
		e.Type = TypeDir
	case modeSymlink:
		e.Type = TypeSymlink
	case modeCharDev:
		e.Type = TypeCharDev
	default:
		return Entry{}, fmt.Errorf("initramfs: %s: unsupported mode %o", e.Name, mode)
	}
	return e, nil
}

// ReadAll reads every entry up to the trailer.
func ReadAll(r io.Reader) ([]Entry, error) {
	cr := NewReader(r)
	var out []Entry
	for {
		e, err := cr.Next()
		if errors.Is(err, io.EOF) && cr.done {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, e)
	}
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
