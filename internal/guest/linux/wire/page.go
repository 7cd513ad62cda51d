package wire

import "encoding/binary"

// PageSize is the unit of the memory dirtier's working set.
const PageSize = 4096

const (
	pageMagic = 0x514d494750414745 // "QMIGPAGE"
	pageMix   = 0x9e3779b97f4a7c15
)

// FillPage stamps page p (len PageSize) with its index and generation: a header of index,
// generation and a checksum at the start, and a trailer at the end, so that a page from an older
// pass (stale), from another page, or written only in part is told apart from the right one.
func FillPage(p []byte, idx, gen uint64) {
	_ = p[PageSize-1]
	binary.LittleEndian.PutUint64(p[0:], idx)
	binary.LittleEndian.PutUint64(p[8:], gen)
	binary.LittleEndian.PutUint64(p[16:], pageSum(idx, gen))
	binary.LittleEndian.PutUint64(p[PageSize-8:], ^gen^idx*pageMix)
}

// PageState is what CheckPage found in a page.
type PageState int

// Page states.
const (
	PageOK      PageState = iota // index and generation as expected
	PageStale                    // intact page of this index, older (or newer) generation
	PageCorrupt                  // checksum or trailer wrong, or another page's index
)

func (s PageState) String() string {
	switch s {
	case PageOK:
		return "ok"
	case PageStale:
		return "stale"
	}
	return "corrupt"
}

// CheckPage reads page p and compares it with index idx and generation want. It returns the
// generation found in the page (0 when the page is corrupt).
func CheckPage(p []byte, idx, want uint64) (got uint64, st PageState) {
	_ = p[PageSize-1]
	gi := binary.LittleEndian.Uint64(p[0:])
	gen := binary.LittleEndian.Uint64(p[8:])
	sum := binary.LittleEndian.Uint64(p[16:])
	tr := binary.LittleEndian.Uint64(p[PageSize-8:])
	if gi != idx || sum != pageSum(idx, gen) || tr != ^gen^idx*pageMix {
		return 0, PageCorrupt
	}
	if gen != want {
		return gen, PageStale
	}
	return gen, PageOK
}

func pageSum(idx, gen uint64) uint64 {
	x := idx*pageMix ^ gen ^ pageMagic
	x ^= x >> 31
	x *= 0xbf58476d1ce4e5b9
	return x ^ x>>29
}
