package wire

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Mode is the workload the guest runs.
type Mode string

// Workload modes.
const (
	ModeIdle       Mode = "idle"       // print READY, then a TICK line per report interval
	ModeMemDirty   Mode = "memdirty"   // dirty a working set and self-check it for staleness
	ModeDiskWrite  Mode = "diskwrite"  // append a checksummed, sequence-numbered log to a disk
	ModeDiskVerify Mode = "diskverify" // verify that log once and print the verdict
)

// Defaults the guest applies to zero values.
const (
	DefaultMem         = 64 << 20
	DefaultDiskRate    = 1 << 20
	DefaultDisk        = "/dev/vda"
	DefaultLogSize     = 16 << 20
	DefaultVerifyEvery = 10 * time.Second
	DefaultReport      = time.Second
)

// Workload says what the guest program does; it travels on the kernel command line.
// Zero values mean the defaults above (see the package documentation for the keys).
type Workload struct {
	Mode Mode
	// MemBytes is the memdirty working set.
	MemBytes uint64
	// RateBytes is bytes per second dirtied (memdirty) or written (diskwrite); 0 means as fast as
	// possible for memdirty and DefaultDiskRate for diskwrite.
	RateBytes uint64
	// Disk is the block device of diskwrite/diskverify.
	Disk string
	// LogBytes is how much of Disk the log uses (it wraps around).
	LogBytes uint64
	// VerifyEvery is how often diskwrite verifies what it wrote; negative disables it.
	VerifyEvery time.Duration
	// Expect makes diskverify fail unless records up to this sequence number are present.
	Expect uint64
	// Report is the interval of progress lines.
	Report time.Duration
	// PowerOff powers the VM off once diskverify has printed its verdict.
	PowerOff bool
}

// Args renders w as kernel command-line words (only the keys that differ from the zero value).
func (w Workload) Args() []string {
	mode := w.Mode
	if mode == "" {
		mode = ModeIdle
	}
	args := []string{"qmigrate.mode=" + string(mode)}
	add := func(k, v string) { args = append(args, "qmigrate."+k+"="+v) }
	if w.MemBytes != 0 {
		add("mem", strconv.FormatUint(w.MemBytes, 10))
	}
	if w.RateBytes != 0 {
		add("rate", strconv.FormatUint(w.RateBytes, 10))
	}
	if w.Disk != "" {
		add("disk", w.Disk)
	}
	if w.LogBytes != 0 {
		add("logsize", strconv.FormatUint(w.LogBytes, 10))
	}
	if w.VerifyEvery < 0 {
		add("verify", "0")
	} else if w.VerifyEvery > 0 {
		add("verify", w.VerifyEvery.String())
	}
	if w.Expect != 0 {
		add("expect", strconv.FormatUint(w.Expect, 10))
	}
	if w.Report != 0 {
		add("report", w.Report.String())
	}
	if w.PowerOff {
		add("poweroff", "1")
	}
	return args
}

// ParseArgs reads the qmigrate.* keys of a kernel command line (other words are ignored) and
// fills in the defaults.
func ParseArgs(cmdline string) (Workload, error) {
	var w Workload
	for _, word := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(word, "=")
		if !ok || !strings.HasPrefix(k, "qmigrate.") {
			continue
		}
		var err error
		switch strings.TrimPrefix(k, "qmigrate.") {
		case "mode":
			w.Mode = Mode(v)
			switch w.Mode {
			case ModeIdle, ModeMemDirty, ModeDiskWrite, ModeDiskVerify:
			default:
				err = fmt.Errorf("unknown mode %q", v)
			}
		case "mem":
			w.MemBytes, err = ParseSize(v)
		case "rate":
			w.RateBytes, err = ParseSize(v)
		case "disk":
			w.Disk = v
		case "logsize":
			w.LogBytes, err = ParseSize(v)
		case "verify":
			w.VerifyEvery, err = parseDuration(v)
			if err == nil && w.VerifyEvery == 0 {
				w.VerifyEvery = -1
			}
		case "expect":
			w.Expect, err = strconv.ParseUint(v, 10, 64)
		case "report":
			w.Report, err = parseDuration(v)
		case "poweroff":
			w.PowerOff, err = strconv.ParseBool(v)
		default:
			err = fmt.Errorf("unknown key")
		}
		if err != nil {
			return w, fmt.Errorf("wire: %s: %w", word, err)
		}
	}
	return w.WithDefaults(), nil
}

// WithDefaults returns w with zero values replaced by the defaults the guest uses.
func (w Workload) WithDefaults() Workload {
	if w.Mode == "" {
		w.Mode = ModeIdle
	}
	if w.MemBytes == 0 {
		w.MemBytes = DefaultMem
	}
	if w.RateBytes == 0 && w.Mode == ModeDiskWrite {
		w.RateBytes = DefaultDiskRate
	}
	if w.Disk == "" {
		w.Disk = DefaultDisk
	}
	if w.LogBytes == 0 {
		w.LogBytes = DefaultLogSize
	}
	if w.VerifyEvery == 0 {
		w.VerifyEvery = DefaultVerifyEvery
	}
	if w.Report <= 0 {
		w.Report = DefaultReport
	}
	return w
}

// ParseSize reads a byte count with an optional K, M, G or T suffix (powers of 1024).
func ParseSize(s string) (uint64, error) {
	mult := uint64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult != 1 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, err
	}
	if v > ^uint64(0)/mult {
		return 0, fmt.Errorf("size %s overflows", s)
	}
	return v * mult, nil
}

func parseDuration(s string) (time.Duration, error) {
	if s == "0" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err == nil && d < 0 {
		err = fmt.Errorf("negative duration")
	}
	return d, err
}

// KernelArgs are the kernel options Cmdline puts before the workload's keys: the serial console
// (the kernel's messages are kept quiet so that QMIGRATE lines are not interleaved), no reboot
// loop on a panic (the VM halts and the panic stays on the console), and no_timer_check, without
// which a slow TCG vCPU on a loaded host fails the boot-time timer check ("IO-APIC + timer
// doesn't work!").
const KernelArgs = "console=ttyS0 quiet loglevel=1 panic=0 no_timer_check mitigations=off"

// Cmdline returns the whole kernel command line (QEMU's -append) for w.
func (w Workload) Cmdline() string {
	return KernelArgs + " " + strings.Join(w.Args(), " ")
}
