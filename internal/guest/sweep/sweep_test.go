package sweep

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEmbeddedImageMatchesSource(t *testing.T) {
	gcc, errGCC := exec.LookPath("gcc")
	ld, errLD := exec.LookPath("ld")
	if errGCC != nil || errLD != nil || runtime.GOARCH != "amd64" {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI set but cannot assemble sweep.S (gcc: %v, ld: %v, arch %s)", errGCC, errLD, runtime.GOARCH)
		}
		t.Skip("gcc/ld not available: cannot re-assemble sweep.S")
	}
	dir := t.TempDir()
	obj := filepath.Join(dir, "sweep.o")
	img := filepath.Join(dir, "sweep.img")
	out, err := exec.Command(gcc, "-m32", "-c", "-o", obj, "../../../testdata/guests/sweep/sweep.S").CombinedOutput()
	require.NoError(t, err, "%s", out)
	out, err = exec.Command(ld, "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", img, obj).CombinedOutput()
	require.NoError(t, err, "%s", out)
	built, err := os.ReadFile(img)
	require.NoError(t, err)
	require.Len(t, built, ImageSize)
	assert.True(t, bytes.Equal(built, []byte(image)),
		"embedded sweep.img differs from sweep.S; run testdata/guests/sweep/build.sh")
}

func TestImage(t *testing.T) {
	a := Image(0)
	require.Len(t, a, ImageSize)
	assert.Equal(t, []byte{0x55, 0xaa}, a[510:])
	assert.Equal(t, uint32(0), binary.LittleEndian.Uint32(a[SpinOffset:]))

	b := Image(0xdeadbeef)
	assert.Equal(t, uint32(0xdeadbeef), binary.LittleEndian.Uint32(b[SpinOffset:]))
	assert.Equal(t, a[:SpinOffset], b[:SpinOffset], "only the spin word changes")
	assert.Equal(t, a[SpinOffset+4:], b[SpinOffset+4:])

	b[0] ^= 0xff
	assert.NotEqual(t, b[0], Image(0)[0], "Image returns a copy")
}

func TestWriteDisk(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, WriteDisk(p, 1234))
	d, err := os.ReadFile(p)
	require.NoError(t, err)
	require.Len(t, d, DiskSize)
	assert.Equal(t, Image(1234), d[:ImageSize])
	assert.Equal(t, make([]byte, DiskSize-ImageSize), d[ImageSize:])
	args := DriveArgs(p, "sweep0")
	assert.Contains(t, args[1], p)
	assert.Contains(t, args[3], "virtio-blk-pci,drive=sweep0")
}

// mem builds a dump whose page first-bytes are firsts (other bytes are noise
// the check must ignore), reusing buf when given.
func mem(firsts func(i int) byte, buf ...[]byte) []byte {
	var m []byte
	if len(buf) > 0 {
		m = buf[0]
	} else {
		m = make([]byte, RangeSize)
	}
	for i := 0; i < Pages; i++ {
		m[i*PageSize] = firsts(i)
		m[i*PageSize+1] = byte(i * 7)
		m[i*PageSize+PageSize-1] = 0xff
	}
	return m
}

func TestCheck(t *testing.T) {
	cases := []struct {
		name    string
		firsts  func(i int) byte
		bad     int
		badPage int
	}{
		{"uniform", func(int) byte { return 7 }, 0, 0},
		{"uniform zero", func(int) byte { return 0 }, 0, 0},
		{"edge in the middle", func(i int) byte {
			if i < 1000 {
				return 8
			}
			return 7
		}, 0, 0},
		{"edge wraps 0 to 255", func(i int) byte {
			if i < 5 {
				return 0
			}
			return 255
		}, 0, 0},
		{"edge at last page", func(i int) byte {
			if i < Pages-1 {
				return 3
			}
			return 2
		}, 0, 0},
		{"step up is bad", func(i int) byte {
			if i < 1000 {
				return 7
			}
			return 8
		}, 1, 1000},
		{"step of two is bad", func(i int) byte {
			if i < 1000 {
				return 9
			}
			return 7
		}, 1, 1000},
		{"one stale page in the old run", func(i int) byte {
			switch {
			case i < 100:
				return 8
			case i == 5000:
				return 6
			default:
				return 7
			}
		}, 2, 5000},
		{"one stale page in the new run", func(i int) byte {
			switch {
			case i == 40:
				return 7 // looks like the edge ...
			case i < 100:
				return 8 // ... so the run continuing is bad
			default:
				return 7
			}
		}, 2, 41},
		{"two edges", func(i int) byte {
			switch {
			case i < 100:
				return 9
			case i < 200:
				return 8
			default:
				return 7
			}
		}, 1, 200},
		{"lost page (zero)", func(i int) byte {
			if i == 25000 {
				return 0
			}
			return 42
		}, 2, 25000},
	}
	buf := make([]byte, RangeSize)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bad, err := Check(mem(tc.firsts, buf))
			assert.Equal(t, tc.bad, bad)
			if tc.bad == 0 {
				assert.NoError(t, err)
				return
			}
			var be *BadPagesError
			require.ErrorAs(t, err, &be)
			assert.Equal(t, tc.bad, be.Bad)
			assert.Equal(t, tc.badPage, be.Page)
			assert.Equal(t, uint64(RangeStart+tc.badPage*PageSize), be.Addr)
			assert.Contains(t, err.Error(), "first at page")
		})
	}
}

func TestCheckShort(t *testing.T) {
	_, err := Check(make([]byte, RangeSize/2))
	require.ErrorIs(t, err, ErrShortDump)
	// The last page only needs its first byte.
	bad, err := Check(make([]byte, (Pages-1)*PageSize+1))
	require.NoError(t, err)
	assert.Zero(t, bad)
}

func TestFirstBytes(t *testing.T) {
	m := mem(func(i int) byte { return byte(i) })
	fb := FirstBytes(m)
	require.Len(t, fb, Pages)
	assert.Equal(t, byte(0), fb[0])
	assert.Equal(t, byte((Pages-1)%256), fb[Pages-1])
}

func TestSpinCalibration(t *testing.T) {
	assert.Equal(t, uint32(0), SpinForRate(UnthrottledRate*2))
	for _, rate := range []float64{1e6, 20e6, 1e9} {
		got := RateForSpin(SpinForRate(rate))
		assert.InEpsilon(t, rate, got, 0.01, "rate %g", rate)
	}
	assert.Greater(t, RateForSpin(0), RateForSpin(1000))
}
