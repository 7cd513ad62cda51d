// Command capture records what real QEMUs answer to the preflight checks,
// for the replay tests of package preflight. For each scenario it starts a
// source and a destination QEMU (idle, TCG, no guest; at most two at a
// time), puts a recording proxy in front of each QMP socket, runs
// preflight.Run through the proxies and writes every command, QEMU's reply
// and the report to <out>/<scenario>.json.
//
//	go run ./preflight/internal/capture -out testdata/qmp/preflight
//	go run ./preflight/internal/capture -out testdata/qmp/preflight -only upgrade-unpinned
//
// QEMU 7.2 is qemu-system-x86_64 on PATH (or -qemu72); QEMU 10.0 is read
// from $QMIGRATE_CACHE/qemu-10.0.env (or -qemu10 and -fw10).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qmp"
)

// side is one QEMU of a scenario.
type side struct {
	Version string   // "7.2" or "10.0"
	Args    []string // besides -nodefaults -nographic -accel tcg -qmp
}

type scenario struct {
	Name     string
	Src, Dst side
	Postcopy preflight.Postcopy
	Files    map[string]int64 // image files to create in the temp folder: name -> size
}

// Capture is the file written per scenario (read by the replay tests).
type Capture struct {
	Scenario string          `json:"scenario"`
	Src      Recording       `json:"src"`
	Dst      Recording       `json:"dst"`
	Postcopy int             `json:"postcopy"`
	Report   json.RawMessage `json:"report"`
	Elapsed  string          `json:"elapsed"` // how long Run took on real QEMU (a hint, not a benchmark)
}

// Recording is what one QEMU said.
type Recording struct {
	QEMU     string          `json:"qemu"`
	Args     []string        `json:"args"`
	Greeting json.RawMessage `json:"greeting"`
	// Replies maps "command {args}" (args as canonical JSON, "" without
	// arguments) to {"return": ...} or {"error": {...}}.
	Replies map[string]json.RawMessage `json:"replies"`
}

const (
	base = "-machine pc-i440fx-7.2 -cpu qemu64 -m 64"
	devs = "-device virtio-net-pci,id=net0 -device virtio-rng-pci -drive file=@DIR@/disk.raw,format=raw,if=none,id=drive0,node-name=disk0 -device virtio-blk-pci,drive=drive0,id=vblk0"
)

func args(s ...string) []string { return strings.Fields(strings.Join(s, " ")) }

var scenarios = []scenario{
	{Name: "same-7.2", Src: side{"7.2", args(base, devs, "-smp 2")}, Dst: side{"7.2", args(base, devs, "-smp 2")}, Postcopy: preflight.PostcopyAllowed},
	{Name: "same-10.0", Src: side{"10.0", args(base, devs, "-smp 2")}, Dst: side{"10.0", args(base, devs, "-smp 2")}, Postcopy: preflight.PostcopyAllowed},
	// The host-upgrade path: machine type and CPU model pinned.
	{Name: "upgrade-pinned", Src: side{"7.2", args(base, devs)}, Dst: side{"10.0", args(base, devs)}, Postcopy: preflight.PostcopyAllowed},
	{Name: "downgrade-pinned", Src: side{"10.0", args(base, devs)}, Dst: side{"7.2", args(base, devs)}},
	// Unpinned: "pc" and "max" resolve differently on 7.2 and 10.0.
	{Name: "upgrade-unpinned", Src: side{"7.2", args("-machine pc -cpu max -m 64", devs)}, Dst: side{"10.0", args("-machine pc -cpu max -m 64", devs)}},
	{Name: "cpu-flags", Src: side{"10.0", args("-machine pc-i440fx-7.2 -cpu max -m 64")}, Dst: side{"10.0", args("-machine pc-i440fx-7.2 -cpu max,-popcnt,-avx2,-sse4.1 -m 64")}},
	{Name: "devices", Src: side{"10.0", args(base, devs, "-device virtio-serial-pci,id=ser0")},
		Dst: side{"10.0", args(base, "-device virtio-net-pci,id=net0,addr=0x7 -drive file=@DIR@/disk.raw,format=raw,if=none,id=drive0,node-name=disk0 -device virtio-blk-pci,drive=drive0,id=vblk0 -device e1000,id=ser0")}},
	{Name: "smp", Src: side{"7.2", args(base, "-smp 2,maxcpus=4")}, Dst: side{"7.2", args(base, "-smp 1,maxcpus=4")}},
	{Name: "blocker", Src: side{"10.0", args(base, "-object memory-backend-ram,id=shm,size=1M -device ivshmem-plain,memdev=shm,id=iv0")},
		Dst: side{"10.0", args(base, "-object memory-backend-ram,id=shm,size=1M -device ivshmem-plain,memdev=shm,id=iv0")}},
	{Name: "disk-size", Src: side{"7.2", args(base, devs)},
		Dst: side{"7.2", args(base, "-device virtio-net-pci,id=net0 -device virtio-rng-pci -drive file=@DIR@/big.raw,format=raw,if=none,id=drive0,node-name=disk0 -device virtio-blk-pci,drive=drive0,id=vblk0")}},
	{Name: "ram", Src: side{"10.0", args(base)}, Dst: side{"10.0", args("-machine pc-i440fx-7.2 -cpu qemu64 -m 128")}},
}

func main() {
	out := flag.String("out", "testdata/qmp/preflight", "output folder")
	only := flag.String("only", "", "run only this scenario")
	q72 := flag.String("qemu72", "qemu-system-x86_64", "QEMU 7.2 binary")
	q10 := flag.String("qemu10", "", "QEMU 10.0 binary (default from $QMIGRATE_CACHE/qemu-10.0.env)")
	fw10 := flag.String("fw10", "", "QEMU 10.0 firmware folder (default from the env file)")
	flag.Parse()
	if *q10 == "" {
		env, err := readEnv()
		if err != nil {
			log.Fatal(err)
		}
		*q10, *fw10 = env["QMIGRATE_QEMU"], env["QMIGRATE_QEMU_FIRMWARE"]
	}
	bins := map[string][]string{"7.2": {*q72}, "10.0": {*q10, "-L", *fw10}}
	for _, sc := range scenarios {
		if *only != "" && sc.Name != *only {
			continue
		}
		if err := capture(sc, bins, *out); err != nil {
			log.Fatalf("%s: %v", sc.Name, err)
		}
	}
}

func readEnv() (map[string]string, error) {
	cache := os.Getenv("QMIGRATE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "qmigrate")
	}
	b, err := os.ReadFile(filepath.Join(cache, "qemu-10.0.env"))
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for line := range strings.SplitSeq(string(b), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			env[k] = v
		}
	}
	return env, nil
}

func capture(sc scenario, bins map[string][]string, out string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "pfcap-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for name, size := range map[string]int64{"disk.raw": 8 << 20, "big.raw": 16 << 20} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			return err
		}
		if err := os.Truncate(filepath.Join(dir, name), size); err != nil {
			return err
		}
	}
	src, err := start(ctx, dir, "src", bins[sc.Src.Version], sc.Src.Args, false)
	if err != nil {
		return err
	}
	defer src.stop()
	dst, err := start(ctx, dir, "dst", bins[sc.Dst.Version], sc.Dst.Args, true)
	if err != nil {
		return err
	}
	defer dst.stop()
	sc2, err := dialProxy(ctx, src)
	if err != nil {
		return err
	}
	defer sc2.Close()
	dc, err := dialProxy(ctx, dst)
	if err != nil {
		return err
	}
	defer dc.Close()
	t0 := time.Now()
	rep, err := preflight.Run(ctx, sc2, dc, preflight.Options{Postcopy: sc.Postcopy})
	elapsed := time.Since(t0)
	if err != nil {
		return err
	}
	for _, r := range rep.Results {
		fmt.Printf("%s\t%-20s %-4s %s\n", sc.Name, r.Check, r.Status, r.Detail)
	}
	fmt.Printf("%s\telapsed %v\n", sc.Name, elapsed.Round(time.Microsecond))
	raw, err := json.Marshal(rep)
	if err != nil {
		return err
	}
	capt := Capture{Scenario: sc.Name, Src: src.rec.recording(sc.Src.Version, sc.Src.Args), Dst: dst.rec.recording(sc.Dst.Version, sc.Dst.Args),
		Postcopy: int(sc.Postcopy), Report: raw, Elapsed: elapsed.Round(time.Millisecond).String()}
	b, err := encode(capt)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(out, sc.Name+".json"), b, 0o644)
}

// encode writes a capture with one reply per line (sorted), so that a
// re-capture diffs well.
func encode(c Capture) ([]byte, error) {
	var b bytes.Buffer
	field := func(name string, v any, last bool) error {
		raw, err := json.Marshal(v)
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, " %q: %s", name, raw)
		if !last {
			b.WriteByte(',')
		}
		b.WriteByte('\n')
		return nil
	}
	b.WriteString("{\n")
	for _, f := range []struct {
		name string
		v    any
	}{{"scenario", c.Scenario}, {"postcopy", c.Postcopy}, {"elapsed", c.Elapsed}, {"report", c.Report}} {
		if err := field(f.name, f.v, false); err != nil {
			return nil, err
		}
	}
	for i, r := range []struct {
		name string
		rec  Recording
	}{{"src", c.Src}, {"dst", c.Dst}} {
		args, _ := json.Marshal(r.rec.Args)
		fmt.Fprintf(&b, " %q: {\"qemu\": %q, \"args\": %s, \"greeting\": %s, \"replies\": {\n", r.name, r.rec.QEMU, args, r.rec.Greeting)
		keys := make([]string, 0, len(r.rec.Replies))
		for k := range r.rec.Replies {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for j, k := range keys {
			kb, _ := json.Marshal(k)
			var compact bytes.Buffer
			if err := json.Compact(&compact, r.rec.Replies[k]); err != nil {
				return nil, err
			}
			fmt.Fprintf(&b, "  %s: %s", kb, compact.Bytes())
			if j < len(keys)-1 {
				b.WriteByte(',')
			}
			b.WriteByte('\n')
		}
		b.WriteString(" }}")
		if i == 0 {
			b.WriteByte(',')
		}
		b.WriteByte('\n')
	}
	b.WriteString("}\n")
	var check any
	if err := json.Unmarshal(b.Bytes(), &check); err != nil {
		return nil, fmt.Errorf("encoded capture is not JSON: %w", err)
	}
	return b.Bytes(), nil
}

type vm struct {
	cmd   *exec.Cmd
	sock  string
	proxy string
	rec   *recorder
}

func start(ctx context.Context, dir, name string, bin, extra []string, incoming bool) (*vm, error) {
	sock := filepath.Join(dir, name+".qmp")
	a := append([]string{}, bin[1:]...)
	a = append(a, "-nographic", "-nodefaults", "-accel", "tcg", "-qmp", "unix:"+sock+",server=on,wait=off")
	for _, x := range extra {
		a = append(a, strings.ReplaceAll(x, "@DIR@", dir))
	}
	if incoming {
		a = append(a, "-incoming", "defer")
	}
	cmd := exec.Command(bin[0], a...)
	var logb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logb, &logb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	v := &vm{cmd: cmd, sock: sock, proxy: filepath.Join(dir, name+"-proxy.qmp"), rec: &recorder{replies: map[string]json.RawMessage{}}}
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			v.stop()
			return nil, fmt.Errorf("%s: no QMP socket: %s", name, logb.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return v, nil
}

func (v *vm) stop() {
	_ = syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
	_ = v.cmd.Wait()
}

// dialProxy starts the recording proxy in front of v's socket and connects
// a qmp.Client through it.
func dialProxy(ctx context.Context, v *vm) (*qmp.Client, error) {
	var up net.Conn
	var err error
	for range 100 {
		if up, err = net.Dial("unix", v.sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	client, server := net.Pipe()
	go v.rec.relay(server, up)
	return qmp.NewClient(ctx, client)
}

// recorder keeps the requests in flight by id and QEMU's reply to each.
type recorder struct {
	mu       sync.Mutex
	pending  map[string]string // id -> key
	replies  map[string]json.RawMessage
	greeting json.RawMessage
}

func (r *recorder) recording(version string, args []string) Recording {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Recording{QEMU: version, Args: args, Greeting: r.greeting, Replies: r.replies}
}

// Key is how a request is filed: "command" or "command {canonical args}".
func Key(command string, args json.RawMessage) string {
	if len(args) == 0 || string(args) == "null" {
		return command
	}
	var v any
	if err := json.Unmarshal(args, &v); err != nil {
		return command + " " + string(args)
	}
	b, _ := json.Marshal(v) // maps marshal with sorted keys
	return command + " " + string(b)
}

func (r *recorder) relay(client, up net.Conn) {
	r.pending = map[string]string{}
	defer client.Close()
	defer up.Close()
	go func() {
		sc := bufio.NewScanner(client)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			line := sc.Bytes()
			var req struct {
				Execute   string          `json:"execute"`
				ExecOOB   string          `json:"exec-oob"`
				Arguments json.RawMessage `json:"arguments"`
				ID        json.RawMessage `json:"id"`
			}
			if json.Unmarshal(line, &req) == nil && len(req.ID) > 0 {
				cmd := req.Execute + req.ExecOOB
				r.mu.Lock()
				r.pending[string(req.ID)] = Key(cmd, req.Arguments)
				r.mu.Unlock()
			}
			if _, err := up.Write(append(append([]byte{}, line...), '\n')); err != nil {
				return
			}
		}
		up.Close()
	}()
	sc := bufio.NewScanner(up)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var m struct {
			QMP    json.RawMessage `json:"QMP"`
			ID     json.RawMessage `json:"id"`
			Return json.RawMessage `json:"return"`
			Error  json.RawMessage `json:"error"`
		}
		if json.Unmarshal(line, &m) == nil {
			r.mu.Lock()
			switch {
			case m.QMP != nil:
				r.greeting = append(json.RawMessage{}, line...)
			case len(m.ID) > 0:
				if key, ok := r.pending[string(m.ID)]; ok && !strings.HasPrefix(key, "qmp_capabilities") {
					var rep []byte
					if m.Error != nil {
						rep, _ = json.Marshal(map[string]json.RawMessage{"error": m.Error})
					} else {
						rep, _ = json.Marshal(map[string]json.RawMessage{"return": m.Return})
					}
					r.replies[key] = rep
				}
				delete(r.pending, string(m.ID))
			}
			r.mu.Unlock()
		}
		if _, err := client.Write(append(append([]byte{}, line...), '\n')); err != nil && !errors.Is(err, net.ErrClosed) {
			return
		}
	}
}
