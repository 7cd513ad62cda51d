package preflight

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// hostRoot is where /proc, /dev and /proc/sys are read from (tests point it
// at a fake tree).
var hostRoot = "/"

// capSysPtrace is CAP_SYS_PTRACE's bit: it lets a process use userfaultfd
// whatever vm.unprivileged_userfaultfd says.
const capSysPtrace = 19

// hostInfo is what decides whether a local QEMU process may use
// userfaultfd.
type hostInfo struct {
	uid, gid   int
	groups     []int
	capEff     uint64
	sysctl     int  // vm.unprivileged_userfaultfd; -1 when the file is missing (no userfaultfd in the kernel)
	dev        bool // /dev/userfaultfd exists
	devMode    os.FileMode
	devUID     int
	devGID     int
	devNotRead error // why /dev/userfaultfd could not be examined (nil: examined or absent)
}

// readHost reads the process pid's credentials and the host's userfaultfd
// settings under root.
func readHost(root string, pid int) (hostInfo, error) {
	h := hostInfo{sysctl: -1}
	status, err := os.ReadFile(filepath.Join(root, "proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return h, err
	}
	fields := map[string][]string{}
	for line := range strings.SplitSeq(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			fields[k] = strings.Fields(v)
		}
	}
	num := func(key string, i int) (int, error) {
		f := fields[key]
		if len(f) <= i {
			return 0, fmt.Errorf("no %s in /proc/%d/status", key, pid)
		}
		return strconv.Atoi(f[i])
	}
	// Uid: real effective saved fs; the effective ones count.
	if h.uid, err = num("Uid", 1); err != nil {
		return h, err
	}
	if h.gid, err = num("Gid", 1); err != nil {
		return h, err
	}
	for _, g := range fields["Groups"] {
		if n, err := strconv.Atoi(g); err == nil {
			h.groups = append(h.groups, n)
		}
	}
	if f := fields["CapEff"]; len(f) > 0 {
		if h.capEff, err = strconv.ParseUint(f[0], 16, 64); err != nil {
			return h, fmt.Errorf("CapEff %q in /proc/%d/status: %w", f[0], pid, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(root, "proc", "sys", "vm", "unprivileged_userfaultfd")); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			h.sysctl = n
		}
	}
	fi, err := os.Stat(filepath.Join(root, "dev", "userfaultfd"))
	switch {
	case err == nil:
		h.dev, h.devMode = true, fi.Mode()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			h.devUID, h.devGID = int(st.Uid), int(st.Gid)
		}
	case !errors.Is(err, os.ErrNotExist):
		h.devNotRead = err
	}
	return h, nil
}

func (h hostInfo) privileged() bool { return h.uid == 0 || h.capEff&(1<<capSysPtrace) != 0 }

// devAccess reports whether the process may open /dev/userfaultfd
// read-write.
func (h hostInfo) devAccess() bool {
	if !h.dev {
		return false
	}
	if h.uid == 0 {
		return true
	}
	perm := h.devMode.Perm()
	switch {
	case h.uid == h.devUID:
		return perm&0o600 == 0o600
	case h.gid == h.devGID || containsInt(h.groups, h.devGID):
		return perm&0o060 == 0o060
	}
	return perm&0o006 == 0o006
}

func containsInt(list []int, v int) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

// uffdWay says how the process gets userfaultfd, "" when it cannot.
// devFirst: the QEMU tries /dev/userfaultfd (8.1 and later).
func (h hostInfo) uffdWay(devFirst bool) string {
	kernel := h.sysctl >= 0 || h.dev
	switch {
	case !kernel:
		return ""
	case devFirst && h.devAccess():
		return "/dev/userfaultfd"
	case h.sysctl < 0:
		return "" // the device only, and not for this QEMU
	case h.privileged() && h.uid == 0:
		return "runs as root"
	case h.privileged():
		return "has CAP_SYS_PTRACE"
	case h.sysctl == 1:
		return "vm.unprivileged_userfaultfd=1"
	}
	return ""
}

// uffdProblem says why the process cannot use userfaultfd with a
// suggestion, "" when it can.
func (h hostInfo) uffdProblem(devFirst bool) string {
	if h.uffdWay(devFirst) != "" {
		return ""
	}
	if h.sysctl < 0 && !h.dev {
		return "the kernel has no userfaultfd (neither /proc/sys/vm/unprivileged_userfaultfd nor /dev/userfaultfd exists): use a kernel built with CONFIG_USERFAULTFD"
	}
	s := fmt.Sprintf("vm.unprivileged_userfaultfd is %d and the process is neither root nor holds CAP_SYS_PTRACE: set the sysctl vm.unprivileged_userfaultfd=1, or run QEMU as root", h.sysctl)
	if devFirst {
		s += ", or give its user read-write access to /dev/userfaultfd"
	}
	return s
}

// PeerPID returns the process id at the other end of a unix socket
// connection (SO_PEERCRED): for a QMP socket, the QEMU process. Use it for
// Options.DestinationPID when the destination's monitor is a local unix
// socket.
func PeerPID(conn net.Conn) (int, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return 0, fmt.Errorf("preflight: peer pid: %T is not a unix socket", conn)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("preflight: peer pid: %w", err)
	}
	var (
		cred *unix.Ucred
		gerr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("preflight: peer pid: %w", err)
	}
	if gerr != nil {
		return 0, fmt.Errorf("preflight: peer pid: %w", gerr)
	}
	return int(cred.Pid), nil
}
