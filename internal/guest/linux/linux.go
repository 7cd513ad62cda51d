package linux

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/internal/guest/linux/wire"
	"github.com/qmigrate/qmigrate/internal/initramfs"
)

// Workload says what the guest does; its Cmdline method renders QEMU's -append string.
type Workload = wire.Workload

// Mode is the workload kind.
type Mode = wire.Mode

// Workload modes (see package wire for what each prints).
const (
	ModeIdle       = wire.ModeIdle
	ModeMemDirty   = wire.ModeMemDirty
	ModeDiskWrite  = wire.ModeDiskWrite
	ModeDiskVerify = wire.ModeDiskVerify
)

// Line is a parsed "QMIGRATE ..." serial line.
type Line = wire.Line

// Line kinds and verdicts.
const (
	KindReady      = wire.KindReady
	KindProgress   = wire.KindProgress
	KindCheck      = wire.KindCheck
	KindDisk       = wire.KindDisk
	KindDiskVerify = wire.KindDiskVerify
	KindTick       = wire.KindTick
	KindError      = wire.KindError
	StatusOK       = wire.StatusOK
	StatusFail     = wire.StatusFail
)

// ParseLine parses a serial console line; it returns false for lines that are not the guest
// program's.
func ParseLine(s string) (Line, bool) { return wire.ParseLine(s) }

// ParseConsoleLine is ParseLine that also turns the kernel's own crash reports (oops, BUG,
// general protection fault, panic) into failed lines of kind KindKernel. Use it when scanning a
// console for failures: a guest whose kernel crashed prints no QMIGRATE FAIL line.
func ParseConsoleLine(s string) (Line, bool) {
	if l, ok := wire.ParseLine(s); ok {
		return l, true
	}
	return kernelFailure(s)
}

// Modules returns the kernel modules the initramfs carries (their dependencies are added,
// resolved from each module's .modinfo).
func Modules() []string { return []string{"virtio_pci", "virtio_blk"} }

// BootArgs returns the QEMU arguments that boot the guest with workload w.
func BootArgs(kernel, initrd string, w Workload) []string {
	return []string{"-kernel", kernel, "-initrd", initrd, "-append", w.Cmdline()}
}

// CacheDir is the folder scripts/setup.sh fills: $QMIGRATE_CACHE, or ~/.cache/qmigrate.
func CacheDir() (string, error) {
	if d := os.Getenv("QMIGRATE_CACHE"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("linux guest: no cache folder (set QMIGRATE_CACHE): %w", err)
	}
	return filepath.Join(home, ".cache", "qmigrate"), nil
}

// ErrNotSetUp says the kernel is missing; the message says to run scripts/setup.sh.
var ErrNotSetUp = errors.New("the Linux guest kernel is not set up: run scripts/setup.sh (as root) first")

// Assets returns the paths of the guest kernel and of an initramfs holding the current /init
// program and the kernel modules. The initramfs is built with the go command and cached in the
// cache folder under a content hash; callers should call Assets once per test binary.
func Assets(ctx context.Context) (kernel, initrd string, err error) {
	cache, err := CacheDir()
	if err != nil {
		return "", "", err
	}
	kernel, kmods, err := kernelPaths(cache)
	if err != nil {
		return "", "", err
	}
	mods, err := resolveModules(kmods, Modules())
	if err != nil {
		return "", "", err
	}
	initBin, err := buildInit(ctx)
	if err != nil {
		return "", "", err
	}
	archive, err := buildArchive(initBin, mods)
	if err != nil {
		return "", "", err
	}
	sum := sha256.Sum256(archive)
	dir := filepath.Join(cache, "initramfs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", fmt.Errorf("linux guest: %w", err)
	}
	initrd = filepath.Join(dir, "linux-"+hex.EncodeToString(sum[:8])+".cpio")
	if _, err := os.Stat(initrd); err == nil {
		_ = os.Chtimes(initrd, time.Now(), time.Now()) // keep it from being pruned
		return kernel, initrd, nil
	}
	if err := writeAtomic(initrd, archive); err != nil {
		return "", "", err
	}
	pruneOld(dir, initrd, 24*time.Hour)
	return kernel, initrd, nil
}

// kernelPaths reads QMIGRATE_KERNEL and QMIGRATE_KMOD_DIR, falling back to cache/kernel.env.
func kernelPaths(cache string) (kernel, kmods string, err error) {
	kernel, kmods = os.Getenv("QMIGRATE_KERNEL"), os.Getenv("QMIGRATE_KMOD_DIR")
	envFile := filepath.Join(cache, "kernel.env")
	if kernel == "" || kmods == "" {
		env, err := readEnvFile(envFile)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", "", fmt.Errorf("linux guest: %w", err)
		}
		if kernel == "" {
			kernel = env["QMIGRATE_KERNEL"]
		}
		if kmods == "" {
			kmods = env["QMIGRATE_KMOD_DIR"]
		}
	}
	if kernel == "" {
		return "", "", fmt.Errorf("linux guest: QMIGRATE_KERNEL is unset and %s has none: %w", envFile, ErrNotSetUp)
	}
	if _, err := os.Stat(kernel); err != nil {
		return "", "", fmt.Errorf("linux guest: kernel %s: %w (%w)", kernel, err, ErrNotSetUp)
	}
	if kmods == "" {
		return "", "", fmt.Errorf("linux guest: QMIGRATE_KMOD_DIR is unset and %s has none: %w", envFile, ErrNotSetUp)
	}
	return kernel, kmods, nil
}

// readEnvFile reads KEY=VALUE lines (as scripts/setup.sh writes them).
func readEnvFile(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok {
			env[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(v), `"'`)
		}
	}
	return env, sc.Err()
}

type module struct {
	name string
	data []byte
}

// resolveModules returns the named modules from dir and their dependencies, dependencies first.
func resolveModules(dir string, names []string) ([]module, error) {
	var out []module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("linux guest: module dependency cycle: %s", strings.Join(append(chain, name), " -> "))
		case 2:
			return nil
		}
		state[name] = 1
		path := filepath.Join(dir, name+".ko")
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("linux guest: module %s (needed by %s): %w (%w)", name, strings.Join(chain, " <- "), err, ErrNotSetUp)
		}
		deps, err := moduleDepends(data)
		if err != nil {
			return fmt.Errorf("linux guest: %s: %w", path, err)
		}
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = 2
		out = append(out, module{name: name, data: data})
		return nil
	}
	for _, n := range names {
		if err := visit(n, nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// moduleDepends reads the "depends=" entry of a kernel module's .modinfo section.
func moduleDepends(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("not an uncompressed kernel module: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, d)
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

// buildInit compiles the /init program statically and returns its bytes.
func buildInit(ctx context.Context) ([]byte, error) {
	src, err := initSourceDir()
	if err != nil {
		return nil, err
	}
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	tmp, err := os.MkdirTemp("", "qmigrate-init-")
	if err != nil {
		return nil, fmt.Errorf("linux guest: %w", err)
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "init")
	cmd := exec.CommandContext(ctx, goCmd, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("linux guest: go build %s: %w\n%s", src, err, out)
	}
	return os.ReadFile(bin)
}

// initSourceDir finds internal/guest/linux/init: beside this file when the source path is
// known, else by walking up from the working directory to the module root.
func initSourceDir() (string, error) {
	const rel = "internal/guest/linux/init"
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		dir := filepath.Join(filepath.Dir(file), "init")
		if _, err := os.Stat(filepath.Join(dir, "main.go")); err == nil {
			return dir, nil
		}
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		mod, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && bytes.Contains(mod, []byte("module github.com/qmigrate/qmigrate\n")) {
			return filepath.Join(d, rel), nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("linux guest: cannot find %s: not inside the qmigrate module (working directory %s)", rel, wd)
		}
	}
}

// buildArchive lays out the initramfs.
func buildArchive(initBin []byte, mods []module) ([]byte, error) {
	var buf bytes.Buffer
	w := initramfs.NewWriter(&buf)
	for _, d := range []string{"dev", "proc", "sys", "tmp", "modules"} {
		if err := w.Dir(d, 0o755); err != nil {
			return nil, err
		}
	}
	// The kernel opens /dev/console as the init's stdin/stdout/stderr before /dev is mounted.
	if err := w.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return nil, err
	}
	if err := w.CharDev("dev/null", 0o666, 1, 3); err != nil {
		return nil, err
	}
	if err := w.File("init", 0o755, initBin); err != nil {
		return nil, err
	}
	var order strings.Builder
	for _, m := range mods {
		if err := w.File("modules/"+m.name+".ko", 0o644, m.data); err != nil {
			return nil, err
		}
		order.WriteString(m.name + "\n")
	}
	if err := w.File("modules/order", 0o644, []byte(order.String())); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("linux guest: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("linux guest: write %s: %w", path, err)
	}
	return nil
}

// pruneOld removes initramfs files other than keep that were not used for age.
func pruneOld(dir, keep string, age time.Duration) {
	old, _ := filepath.Glob(filepath.Join(dir, "linux-*.cpio"))
	for _, p := range old {
		if st, err := os.Stat(p); err == nil && p != keep && time.Since(st.ModTime()) > age {
			os.Remove(p)
		}
	}
}

// Serial follows a serial console file that QEMU writes (-serial file:PATH) and returns the
// guest program's lines in order. It polls the file; it is not safe for concurrent use.
type Serial struct {
	path    string
	off     int64
	partial []byte
	// Poll is how often the file is re-read when no complete line is waiting (default 20 ms).
	Poll time.Duration
}

// NewSerial follows path from its beginning (the file need not exist yet).
func NewSerial(path string) *Serial { return &Serial{path: path} }

// Next returns the next "QMIGRATE" line, waiting for it until ctx ends.
func (s *Serial) Next(ctx context.Context) (Line, error) {
	poll := s.Poll
	if poll <= 0 {
		poll = 20 * time.Millisecond
	}
	for {
		for {
			i := bytes.IndexByte(s.partial, '\n')
			if i < 0 {
				break
			}
			raw := string(s.partial[:i])
			s.partial = s.partial[i+1:]
			if l, ok := ParseConsoleLine(raw); ok {
				return l, nil
			}
		}
		n, err := s.read()
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return Line{}, err
		}
		if n > 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return Line{}, fmt.Errorf("linux guest: waiting on %s: %w", s.path, context.Cause(ctx))
		case <-time.After(poll):
		}
	}
}

// KindKernel is the kind of the lines Serial makes up for kernel oopses and panics on the
// console (their Status is StatusFail, Raw the kernel's line).
const KindKernel = "KERNEL"

// kernelFailure recognizes the kernel's own reports of a crash. They reach the console even with
// loglevel=1, because an oops raises the console log level.
func kernelFailure(raw string) (Line, bool) {
	for _, marker := range []string{"Kernel panic - not syncing", "BUG: ", "Oops: ", "general protection fault"} {
		if i := strings.Index(raw, marker); i >= 0 {
			return Line{Kind: KindKernel, Status: StatusFail, Fields: map[string]string{},
				Raw: strings.TrimRight(raw[i:], "\r")}, true
		}
	}
	return Line{}, false
}

func (s *Serial) read() (int, error) {
	f, err := os.Open(s.path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	total := 0
	for {
		n, err := f.ReadAt(buf, s.off)
		s.partial = append(s.partial, buf[:n]...)
		s.off += int64(n)
		total += n
		if err == io.EOF || n == 0 {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// WaitFor returns the first line (from where the follower is) that match accepts. A line that
// Failed (CHECK FAIL, DISKVERIFY FAIL, ERROR) ends the wait with an error unless match accepts
// it, so tests fail fast when the guest reports damage.
func (s *Serial) WaitFor(ctx context.Context, match func(Line) bool) (Line, error) {
	for {
		l, err := s.Next(ctx)
		if err != nil {
			return Line{}, err
		}
		if match(l) {
			return l, nil
		}
		if l.Failed() {
			return l, fmt.Errorf("linux guest reported a failure: %s", l.Raw)
		}
	}
}

// Latest reads the lines written so far, stopping once no new line arrives
// within idle (or ctx ends), and returns the last value of the number field key
// on lines of kind, or from when there is none. A line that Failed ends it with
// an error, as in WaitFor. Tests use it to learn how far the guest got on the
// source before checking that the destination goes further.
func (s *Serial) Latest(ctx context.Context, kind, key string, from uint64, idle time.Duration) (uint64, error) {
	last := from
	for {
		short, cancel := context.WithTimeout(ctx, idle)
		l, err := s.Next(short)
		cancel()
		if err != nil {
			return last, nil
		}
		if l.Failed() {
			return last, fmt.Errorf("linux guest reported a failure: %s", l.Raw)
		}
		if v, ok := l.Uint(key); ok && l.Kind == kind {
			last = v
		}
	}
}

// Kind matches lines of one kind.
func Kind(kind string) func(Line) bool {
	return func(l Line) bool { return l.Kind == kind }
}

// Verdict matches OK verdicts of one kind (CHECK or DISKVERIFY) whose number field key is at
// least min, e.g. Verdict(KindCheck, "pass", 3).
func Verdict(kind, key string, min uint64) func(Line) bool {
	return func(l Line) bool {
		v, ok := l.Uint(key)
		return l.Kind == kind && l.OK() && ok && v >= min
	}
}
