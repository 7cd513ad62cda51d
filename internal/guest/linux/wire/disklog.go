package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
)

// The disk log: block 0 is a superblock, blocks 1..Slots hold records of BlockSize bytes.
// Record seq (1, 2, ...) lives in slot (seq-1) % Slots, so the log wraps around. Each block ends
// with a CRC-64 of the rest, and a record's payload is derived from (run, seq), so a torn write,
// a record from another run or an older lap (stale), and a missing record are all detected.
const (
	BlockSize   = 4096
	superMagic  = "QMIGLOGS"
	recordMagic = "QMIGLOGR"
	logVersion  = 1
	headerBytes = 40 // magic, run, seq, slot, version
)

var crcTable = crc64.MakeTable(crc64.ECMA)

// Super is the log's superblock.
type Super struct {
	Run   uint64 // random id of the writer's run; records of other runs are not this log's
	Slots uint64 // number of record slots after the superblock
}

// SlotsFor returns how many record slots fit in logBytes (superblock excluded).
func SlotsFor(logBytes uint64) uint64 {
	if logBytes < 2*BlockSize {
		return 0
	}
	return logBytes/BlockSize - 1
}

// EncodeSuper writes the superblock into b (len BlockSize).
func EncodeSuper(b []byte, s Super) {
	clear(b[:BlockSize])
	copy(b, superMagic)
	binary.LittleEndian.PutUint64(b[8:], s.Run)
	binary.LittleEndian.PutUint64(b[16:], s.Slots)
	binary.LittleEndian.PutUint64(b[24:], logVersion)
	seal(b)
}

// DecodeSuper reads a superblock.
func DecodeSuper(b []byte) (Super, error) {
	if string(b[:8]) != superMagic {
		return Super{}, errors.New("wire: no disk log superblock (bad magic)")
	}
	if !sealed(b) {
		return Super{}, errors.New("wire: disk log superblock checksum mismatch")
	}
	s := Super{Run: binary.LittleEndian.Uint64(b[8:]), Slots: binary.LittleEndian.Uint64(b[16:])}
	if v := binary.LittleEndian.Uint64(b[24:]); v != logVersion {
		return Super{}, fmt.Errorf("wire: disk log version %d, want %d", v, logVersion)
	}
	if s.Slots == 0 {
		return Super{}, errors.New("wire: disk log has no slots")
	}
	return s, nil
}

// SlotOf returns the slot of record seq (seq >= 1).
func (s Super) SlotOf(seq uint64) uint64 { return (seq - 1) % s.Slots }

// Offset returns the byte offset of slot on the device.
func (s Super) Offset(slot uint64) int64 { return int64(slot+1) * BlockSize }

// EncodeRecord writes record seq of run into b (len BlockSize).
func EncodeRecord(b []byte, s Super, seq uint64) {
	copy(b, recordMagic)
	binary.LittleEndian.PutUint64(b[8:], s.Run)
	binary.LittleEndian.PutUint64(b[16:], seq)
	binary.LittleEndian.PutUint64(b[24:], s.SlotOf(seq))
	binary.LittleEndian.PutUint64(b[32:], logVersion)
	x := s.Run ^ seq*pageMix
	for i := headerBytes; i < BlockSize-8; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	seal(b)
}

// RecordState classifies a slot's content.
type RecordState int

// Record states.
const (
	RecordOK       RecordState = iota // a whole record of this run
	RecordEmpty                       // all zero: never written
	RecordTorn                        // checksum mismatch: partly written or corrupted
	RecordForeign                     // intact, but of another run or format
	RecordMisplace                    // intact record of this run in the wrong slot
)

func (s RecordState) String() string {
	return [...]string{"ok", "empty", "torn", "foreign", "misplaced"}[s]
}

// DecodeRecord reads the record in b (found in slot) and returns its sequence number.
func DecodeRecord(b []byte, s Super, slot uint64) (uint64, RecordState) {
	b = b[:BlockSize]
	if !sealed(b) {
		for _, c := range b {
			if c != 0 {
				return 0, RecordTorn
			}
		}
		return 0, RecordEmpty
	}
	if string(b[:8]) != recordMagic || binary.LittleEndian.Uint64(b[8:]) != s.Run ||
		binary.LittleEndian.Uint64(b[32:]) != logVersion {
		return 0, RecordForeign
	}
	seq := binary.LittleEndian.Uint64(b[16:])
	if seq == 0 || binary.LittleEndian.Uint64(b[24:]) != slot || s.SlotOf(seq) != slot {
		return seq, RecordMisplace
	}
	// The payload is covered by the CRC, and the CRC by the writer: a record that passes the CRC
	// and names this run, slot and seq is the record the writer wrote.
	return seq, RecordOK
}

func seal(b []byte) {
	binary.LittleEndian.PutUint64(b[BlockSize-8:], crc64.Checksum(b[:BlockSize-8], crcTable))
}

func sealed(b []byte) bool {
	return binary.LittleEndian.Uint64(b[BlockSize-8:]) == crc64.Checksum(b[:BlockSize-8], crcTable)
}

// VerifyResult is what Verify found.
type VerifyResult struct {
	Super   Super
	Last    uint64 // highest sequence number in the log
	Records uint64 // records checked (the last min(Last, Slots))
}

// VerifyError says which record is wrong and how.
type VerifyError struct {
	Seq    uint64 // the record that should be there
	Slot   uint64
	Reason string // "stale", "torn", "missing", "foreign", "misplaced"
	Got    uint64 // for stale: the sequence number found instead
}

func (e *VerifyError) Error() string {
	if e.Reason == "stale" {
		return fmt.Sprintf("disk log: record %d (slot %d) is stale: found record %d", e.Seq, e.Slot, e.Got)
	}
	return fmt.Sprintf("disk log: record %d (slot %d) is %s", e.Seq, e.Slot, e.Reason)
}

// Verify reads the log on r and checks that every record from the newest one back one lap (or
// back to record 1) is present, whole, and current. With expect > 0 the log must reach at least
// record expect (so a lost tail is detected too): the writer passes the sequence number it last
// completed. Failures are *VerifyError; other errors are I/O or superblock errors.
func Verify(r io.ReaderAt, expect uint64) (VerifyResult, error) {
	var res VerifyResult
	buf := make([]byte, BlockSize)
	if _, err := r.ReadAt(buf, 0); err != nil {
		return res, fmt.Errorf("wire: read superblock: %w", err)
	}
	s, err := DecodeSuper(buf)
	if err != nil {
		return res, err
	}
	res.Super = s
	// Read all slots once, keeping their sequence numbers and states.
	seqs := make([]uint64, s.Slots)
	states := make([]RecordState, s.Slots)
	const chunk = 64
	big := make([]byte, chunk*BlockSize)
	for first := uint64(0); first < s.Slots; first += chunk {
		n := min(chunk, s.Slots-first)
		if _, err := r.ReadAt(big[:n*BlockSize], s.Offset(first)); err != nil {
			return res, fmt.Errorf("wire: read slots %d-%d: %w", first, first+n-1, err)
		}
		for i := range n {
			seqs[first+i], states[first+i] = DecodeRecord(big[i*BlockSize:(i+1)*BlockSize], s, first+i)
			if states[first+i] == RecordOK {
				res.Last = max(res.Last, seqs[first+i])
			}
		}
	}
	last := max(res.Last, expect)
	lo := uint64(1)
	if last > s.Slots {
		lo = last - s.Slots + 1
	}
	for seq := lo; seq <= last; seq++ {
		slot := s.SlotOf(seq)
		e := &VerifyError{Seq: seq, Slot: slot}
		switch states[slot] {
		case RecordOK:
			if seqs[slot] == seq {
				res.Records++
				continue
			}
			// seqs[slot] <= res.Last <= last, so a different record here is an older lap.
			e.Reason, e.Got = "stale", seqs[slot]
		case RecordEmpty:
			e.Reason = "missing"
		default:
			e.Reason = states[slot].String()
		}
		return res, e
	}
	return res, nil
}
