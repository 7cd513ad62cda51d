package qemulab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// SerialPoll is how often WaitSerial re-reads the serial file.
const SerialPoll = 20 * time.Millisecond

// ErrSerialTimeout wraps the context error when a serial wait ends unmatched.
var ErrSerialTimeout = errors.New("qemulab: serial output did not match")

// Serial returns everything the guest has written to COM1 so far.
func (i *Instance) Serial() ([]byte, error) {
	b, err := os.ReadFile(i.SerialPath())
	if err != nil {
		return nil, fmt.Errorf("qemulab: %s serial: %w", i.Name, err)
	}
	return b, nil
}

// WaitSerial polls the serial file until match, given everything written so
// far, reports done or an error, or until ctx ends or QEMU exits. It returns
// the serial contents it matched on.
func (i *Instance) WaitSerial(ctx context.Context, match func(serial []byte) (done bool, err error)) ([]byte, error) {
	var buf []byte
	var off int64
	t := time.NewTicker(SerialPoll)
	defer t.Stop()
	for {
		var err error
		buf, off, err = appendFrom(i.SerialPath(), buf, off)
		if err != nil {
			return buf, fmt.Errorf("qemulab: %s serial: %w", i.Name, err)
		}
		done, err := match(buf)
		if err != nil {
			return buf, err
		}
		if done {
			return buf, nil
		}
		select {
		case <-ctx.Done():
			return buf, fmt.Errorf("%w on %s (%d bytes, tail %q): %w", ErrSerialTimeout, i.Name, len(buf), tail(buf, 200), ctx.Err())
		case <-i.done:
			// One last read: the guest may have written just before exiting.
			buf, _, _ = appendFrom(i.SerialPath(), buf, off)
			if done, err := match(buf); done || err != nil {
				return buf, err
			}
			return buf, i.exitError()
		case <-t.C:
		}
	}
}

// WaitSerialLine waits for a complete serial line (without its line ending)
// for which match reports done or an error. Lines already present count.
func (i *Instance) WaitSerialLine(ctx context.Context, match func(line string) (done bool, err error)) (string, error) {
	var found string
	scanned := 0
	_, err := i.WaitSerial(ctx, func(b []byte) (bool, error) {
		for {
			nl := bytes.IndexByte(b[scanned:], '\n')
			if nl < 0 {
				return false, nil
			}
			line := string(bytes.TrimRight(b[scanned:scanned+nl], "\r"))
			scanned += nl + 1
			done, err := match(line)
			if err != nil {
				return false, err
			}
			if done {
				found = line
				return true, nil
			}
		}
	})
	return found, err
}

// CountSerial waits until the serial output holds at least n bytes equal to c
// after the first occurrence of after (or from the start when after is 0) and
// returns the count seen.
func (i *Instance) CountSerial(ctx context.Context, after, c byte, n int) (int, error) {
	count := 0
	_, err := i.WaitSerial(ctx, func(b []byte) (bool, error) {
		count = CountAfter(b, after, c)
		return count >= n, nil
	})
	return count, err
}

// CountAfter counts the bytes equal to c in b after the first byte equal to
// after (the whole of b when after is 0; zero when after does not occur).
func CountAfter(b []byte, after, c byte) int {
	if after != 0 {
		k := bytes.IndexByte(b, after)
		if k < 0 {
			return 0
		}
		b = b[k+1:]
	}
	return bytes.Count(b, []byte{c})
}

func appendFrom(path string, buf []byte, off int64) ([]byte, int64, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return buf, off, nil
	}
	if err != nil {
		return buf, off, err
	}
	defer f.Close()
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return buf, off, err
	}
	b, err := io.ReadAll(f)
	buf = append(buf, b...)
	return buf, off + int64(len(b)), err
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
