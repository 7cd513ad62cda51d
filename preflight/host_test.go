package preflight

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeHost writes a /proc/PID/status, the sysctl (when sysctl >= 0) and
// /dev/userfaultfd (when devMode != 0) under a temporary root.
func fakeHost(t *testing.T, pid, uid int, capEff string, sysctl int, devMode os.FileMode) string {
	t.Helper()
	root := t.TempDir()
	pdir := filepath.Join(root, "proc", fmt.Sprint(pid))
	require.NoError(t, os.MkdirAll(pdir, 0o755))
	status := fmt.Sprintf("Name:\tqemu-system-x86\nUid:\t%d\t%d\t%d\t%d\nGid:\t%d\t%d\t%d\t%d\nGroups:\t4 24\nCapEff:\t%s\n", uid, uid, uid, uid, uid, uid, uid, uid, capEff)
	require.NoError(t, os.WriteFile(filepath.Join(pdir, "status"), []byte(status), 0o644))
	if sysctl >= 0 {
		require.NoError(t, os.MkdirAll(filepath.Join(root, "proc", "sys", "vm"), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(root, "proc", "sys", "vm", "unprivileged_userfaultfd"), fmt.Appendf(nil, "%d\n", sysctl), 0o644))
	}
	if devMode != 0 {
		require.NoError(t, os.MkdirAll(filepath.Join(root, "dev"), 0o755))
		f := filepath.Join(root, "dev", "userfaultfd")
		require.NoError(t, os.WriteFile(f, nil, devMode))
		require.NoError(t, os.Chmod(f, devMode))
	}
	return root
}

func TestUserfaultfd(t *testing.T) {
	me := os.Getuid() // the fake /dev/userfaultfd belongs to the test's user
	for _, tc := range []struct {
		name     string
		uid      int
		capEff   string
		sysctl   int
		devMode  os.FileMode
		devFirst bool // QEMU 8.1+
		way      string
		problem  string
	}{
		{name: "root", uid: 0, capEff: "000001ffffffffff", sysctl: 0, way: "runs as root"},
		{name: "ptrace", uid: 1000, capEff: "0000000000080000", sysctl: 0, way: "has CAP_SYS_PTRACE"},
		{name: "sysctl", uid: 1000, capEff: "0000000000000000", sysctl: 1, way: "vm.unprivileged_userfaultfd=1"},
		{name: "unprivileged 7.2", uid: 1000, capEff: "0000000000000000", sysctl: 0, devMode: 0o666,
			problem: "vm.unprivileged_userfaultfd is 0 and the process is neither root nor holds CAP_SYS_PTRACE: set the sysctl vm.unprivileged_userfaultfd=1, or run QEMU as root"},
		{name: "device 10.0", uid: 1000, capEff: "0000000000000000", sysctl: 0, devMode: 0o666, devFirst: true, way: "/dev/userfaultfd"},
		{name: "device closed 10.0", uid: 1000, capEff: "0000000000000000", sysctl: 0, devMode: 0o600, devFirst: true,
			problem: "vm.unprivileged_userfaultfd is 0 and the process is neither root nor holds CAP_SYS_PTRACE: set the sysctl vm.unprivileged_userfaultfd=1, or run QEMU as root, or give its user read-write access to /dev/userfaultfd"},
		{name: "no kernel support", uid: 0, capEff: "000001ffffffffff", sysctl: -1,
			problem: "the kernel has no userfaultfd (neither /proc/sys/vm/unprivileged_userfaultfd nor /dev/userfaultfd exists): use a kernel built with CONFIG_USERFAULTFD"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			uid := tc.uid
			if tc.name == "device closed 10.0" && me == 1000 {
				t.Skip("the test user owns the fake device")
			}
			root := fakeHost(t, 4242, uid, tc.capEff, tc.sysctl, tc.devMode)
			h, err := readHost(root, 4242)
			require.NoError(t, err)
			assert.Equal(t, tc.way, h.uffdWay(tc.devFirst))
			assert.Equal(t, tc.problem, h.uffdProblem(tc.devFirst))
		})
	}
}

func TestReadHostMissingProcess(t *testing.T) {
	_, err := readHost(t.TempDir(), 4242)
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestPeerPID(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	c, err := net.Dial("unix", sock)
	require.NoError(t, err)
	defer c.Close()
	if s := <-accepted; s != nil {
		defer s.Close()
	}
	pid, err := PeerPID(c)
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), pid)

	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	_, err = PeerPID(a)
	assert.Error(t, err)
}

func TestMachineHint(t *testing.T) {
	src := []machineInfo{{Name: "pc-i440fx-7.2", Alias: "pc", IsDefault: true}, {Name: "pc-i440fx-7.1"}}
	dst := []machineInfo{{Name: "pc-i440fx-10.0", Alias: "pc"}, {Name: "pc-i440fx-7.2"}}
	assert.Equal(t, ` ("pc" resolved to pc-i440fx-7.2 on the source and pc-i440fx-10.0 on the destination): start the destination with -machine pc-i440fx-7.2`,
		machineHint("pc-i440fx-7.2", "pc-i440fx-10.0", src, dst))
	// 10.0 -> 7.2: the older QEMU does not have the newer machine.
	assert.Equal(t, `: the destination QEMU has no machine type pc-i440fx-10.0: it cannot take this guest (migrate to a QEMU that has it)`,
		machineHint("pc-i440fx-10.0", "pc-i440fx-7.2", []machineInfo{{Name: "pc-i440fx-10.0"}}, []machineInfo{{Name: "pc-i440fx-7.2", Alias: "pc"}}))
	assert.Equal(t, ": start the destination with -machine q35", machineHint("q35", "pc", nil, nil))
}

func TestDedupAliases(t *testing.T) {
	assert.Equal(t, []string{"cmp-legacy", "sse4.1", "sse4.2"}, dedupAliases([]string{"sse4_1", "sse4.1", "sse4-1", "cmp_legacy", "cmp-legacy", "sse4.2"}))
}
