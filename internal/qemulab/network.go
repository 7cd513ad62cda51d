package qemulab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Addresses of the two hosts on the veth link (198.18.0.0/15 is reserved for
// benchmark networks; nothing else is ever addressed).
const (
	AddrA   = "198.18.0.1"
	AddrB   = "198.18.0.2"
	netMask = "/24"
)

// ErrNetnsUnavailable means network namespaces cannot be created here (not
// root, no ip(8), no veth). Tests skip on it unless CI is set.
var ErrNetnsUnavailable = errors.New("qemulab: network namespaces unavailable")

// Host is one end of a Network: a namespace with one veth device.
type Host struct {
	Netns string // namespace name (pass as Config.Netns)
	Dev   string // its veth device
	Addr  string // its IPv4 address
}

// Network is two network namespaces joined by a veth pair whose both
// directions are shaped by tc tbf.
type Network struct {
	A, B Host
	rate uint64
}

// CommandError is a failed ip/tc command.
type CommandError struct {
	Args   []string
	Output string
	Err    error
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("qemulab: %s: %v: %s", strings.Join(e.Args, " "), e.Err, strings.TrimSpace(e.Output))
}

func (e *CommandError) Unwrap() error { return e.Err }

func run(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return &CommandError{Args: args, Output: string(out), Err: err}
	}
	return nil
}

// NewNetwork creates namespaces qm-<random>-a and qm-<random>-b joined by a
// veth pair (198.18.0.1/24 in A, 198.18.0.2/24 in B) shaped to rate bytes
// per second in each direction (0: unshaped). Close always deletes both.
// When the first namespace cannot be created the error wraps
// ErrNetnsUnavailable.
func NewNetwork(ctx context.Context, rate uint64) (_ *Network, err error) {
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("qemulab: network: %w", err)
	}
	id := hex.EncodeToString(rnd[:])
	n := &Network{
		A: Host{Netns: "qm-" + id + "-a", Dev: "qm" + id + "a", Addr: AddrA},
		B: Host{Netns: "qm-" + id + "-b", Dev: "qm" + id + "b", Addr: AddrB},
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNetnsUnavailable, err)
	}
	if err := run(ctx, "ip", "netns", "add", n.A.Netns); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNetnsUnavailable, err)
	}
	defer func() {
		if err != nil {
			_ = n.Close()
		}
	}()
	if err := run(ctx, "ip", "netns", "add", n.B.Netns); err != nil {
		return nil, err
	}
	if err := run(ctx, "ip", "link", "add", n.A.Dev, "netns", n.A.Netns, "type", "veth",
		"peer", "name", n.B.Dev, "netns", n.B.Netns); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNetnsUnavailable, err)
	}
	for _, h := range []Host{n.A, n.B} {
		for _, args := range [][]string{
			{"ip", "-n", h.Netns, "link", "set", "lo", "up"},
			{"ip", "-n", h.Netns, "addr", "add", h.Addr + netMask, "dev", h.Dev},
			{"ip", "-n", h.Netns, "link", "set", h.Dev, "up"},
		} {
			if err := run(ctx, args...); err != nil {
				return nil, err
			}
		}
	}
	if rate > 0 {
		if err := n.SetRate(ctx, rate); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// Rate is the current shaping rate in bytes per second (0: unshaped).
func (n *Network) Rate() uint64 { return n.rate }

// SetRate shapes both directions to rate bytes per second with tc tbf
// (rate 0 removes the shaping).
func (n *Network) SetRate(ctx context.Context, rate uint64) error {
	for _, h := range []Host{n.A, n.B} {
		if rate == 0 {
			if n.rate != 0 {
				if err := run(ctx, "tc", "-n", h.Netns, "qdisc", "del", "dev", h.Dev, "root"); err != nil {
					return err
				}
			}
			continue
		}
		// burst: at least 10 ms at rate and 64 KiB (tbf needs burst >=
		// rate/HZ plus one MTU); latency bounds the queue.
		burst := max(rate/100, 64<<10)
		if err := run(ctx, "tc", "-n", h.Netns, "qdisc", "replace", "dev", h.Dev, "root", "tbf",
			"rate", strconv.FormatUint(rate*8, 10)+"bit",
			"burst", strconv.FormatUint(burst, 10),
			"latency", "100ms"); err != nil {
			return err
		}
	}
	n.rate = rate
	return nil
}

// Cut takes the link down on both ends (traffic stops, sockets stay).
func (n *Network) Cut(ctx context.Context) error { return n.setLink(ctx, "down") }

// Restore brings the link back up.
func (n *Network) Restore(ctx context.Context) error { return n.setLink(ctx, "up") }

func (n *Network) setLink(ctx context.Context, state string) error {
	for _, h := range []Host{n.A, n.B} {
		if err := run(ctx, "ip", "-n", h.Netns, "link", "set", h.Dev, state); err != nil {
			return err
		}
	}
	return nil
}

// Close kills every process left inside the namespaces and deletes them
// (which deletes the veth pair). It always tries both namespaces.
func (n *Network) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []error
	for _, h := range []Host{n.A, n.B} {
		if !netnsExists(ctx, h.Netns) {
			continue
		}
		killNetnsPids(ctx, h.Netns)
		if err := run(ctx, "ip", "netns", "del", h.Netns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func netnsExists(ctx context.Context, name string) bool {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return true // let the delete report the problem
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == name {
			return true
		}
	}
	return false
}

// killNetnsPids SIGKILLs the processes inside a namespace this package
// created (QEMUs a test did not close) and waits briefly for them to go.
func killNetnsPids(ctx context.Context, name string) {
	for range 50 {
		out, err := exec.CommandContext(ctx, "ip", "netns", "pids", name).Output()
		if err != nil {
			return
		}
		pids := bytes.Fields(out)
		if len(pids) == 0 {
			return
		}
		for _, p := range pids {
			if pid, err := strconv.Atoi(string(p)); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}
