package transport_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

func TestParse(t *testing.T) {
	for uri, want := range map[string]transport.Channel{
		"unix:/run/m.sock":     {Scheme: transport.Unix, Address: qmp.UnixAddress("/run/m.sock")},
		"tcp:10.0.0.2:4444":    {Scheme: transport.TCP, Address: qmp.TCPAddress("10.0.0.2", "4444")},
		"tcp:[fd00::2]:0":      {Scheme: transport.TCP, Address: qmp.TCPAddress("fd00::2", "0")},
		"tcp:dst.example:0049": {Scheme: transport.TCP, Address: qmp.TCPAddress("dst.example", "49")},
		"fd:":                  {Scheme: transport.FD},
	} {
		got, err := transport.Parse(uri)
		require.NoError(t, err, uri)
		assert.Equal(t, want, got, uri)
	}
	c, _ := transport.Parse("tcp:[fd00::2]:0")
	assert.Equal(t, "tcp:[fd00::2]:0", c.String())
	assert.True(t, c.NeedsPort())

	for uri, want := range map[string]error{
		"exec:cat /dev/zero": transport.ErrUnsupportedScheme,
		"rdma:1.2.3.4:5":     transport.ErrUnsupportedScheme,
		"fd:mig":             transport.ErrBadURI,
		"/run/m.sock":        transport.ErrUnsupportedScheme,
		"unix:":              transport.ErrBadURI,
		"unix:/a,b":          transport.ErrBadURI,
		"tcp:host":           transport.ErrBadURI,
		"tcp::4444":          transport.ErrBadURI,
		"tcp:host:70000":     transport.ErrBadURI,
		"tcp:::1:4444":       transport.ErrBadURI,
		"unix:mig.sock":      transport.ErrBadURI,
		"unix:./mig.sock":    transport.ErrBadURI,
		"unix:/" + strings.Repeat("x", qmp.MaxUnixPath): transport.ErrBadURI,
	} {
		_, err := transport.Parse(uri)
		assert.ErrorIs(t, err, want, uri)
	}
}

func TestArgs(t *testing.T) {
	c, err := transport.Parse("tcp:[::1]:4444")
	require.NoError(t, err)
	old := transport.Form{}
	newer := transport.Newest()

	a := c.IncomingArgs(old, true)
	assert.Equal(t, "tcp:[::1]:4444", a.URI)
	assert.Nil(t, a.Channels)
	assert.Nil(t, a.ExitOnError)

	a = c.IncomingArgs(newer, false)
	assert.Empty(t, a.URI)
	require.Len(t, a.Channels, 1)
	assert.Equal(t, qmp.MigrationChannel{ChannelType: "main", Addr: qmp.MigrationAddr{Transport: "socket",
		SocketAddress: qmp.SocketAddress{Type: "inet", Host: "::1", Port: "4444"}}}, a.Channels[0])
	require.NotNil(t, a.ExitOnError)
	assert.False(t, *a.ExitOnError)

	assert.Equal(t, qmp.MigrateArgs{URI: "tcp:[::1]:4444"}, c.MigrateArgs(old))
	assert.Len(t, c.MigrateArgs(newer).Channels, 1)

	u, _ := transport.Parse("unix:/m.sock")
	assert.Equal(t, qmp.SocketAddress{Type: "unix", Path: "/m.sock"}, u.SocketAddress())

	fd := transport.Channel{Scheme: transport.FD, FDName: "qm-1"}
	assert.Equal(t, qmp.MigrateArgs{URI: "fd:qm-1"}, fd.MigrateArgs(old))
	assert.Equal(t, qmp.SocketAddress{Type: "fd", Str: "qm-1"}, fd.MigrateArgs(newer).Channels[0].Addr.SocketAddress)
}

func TestFormOf(t *testing.T) {
	assert.Equal(t, transport.Form{}, transport.FormOf(nil))
	assert.Equal(t, transport.Form{Channels: true}, transport.FormOf(&qmp.Features{MigrateChannels: true}))
	assert.Equal(t, transport.Newest(), transport.FormOf(&qmp.Features{MigrateChannels: true, IncomingExitOnError: true}))
}

// Fallback follows QEMU's exact refusals, one field at a time, and nothing
// else.
func TestFallback(t *testing.T) {
	refuse := func(desc string) error {
		return &qmp.Error{Command: "migrate-incoming", Class: "GenericError", Desc: desc}
	}
	// QEMU 7.2: the channels form lacks the mandatory uri; then the uri
	// form with exit-on-error is refused for exit-on-error.
	f, ok := transport.Newest().Fallback(refuse("Parameter 'uri' is missing"))
	require.True(t, ok)
	assert.Equal(t, transport.Form{ExitOnError: true}, f)
	f, ok = f.Fallback(refuse("Parameter 'exit-on-error' is unexpected"))
	require.True(t, ok)
	assert.Equal(t, transport.Form{}, f)
	// 8.2-9.0: channels known, exit-on-error not.
	f, ok = transport.Newest().Fallback(refuse("Parameter 'exit-on-error' is unexpected"))
	require.True(t, ok)
	assert.Equal(t, transport.Form{Channels: true}, f)
	f, ok = transport.Newest().Fallback(refuse("Parameter 'channels' is unexpected"))
	require.True(t, ok)
	assert.Equal(t, transport.Form{ExitOnError: true}, f)

	for name, err := range map[string]error{
		"other error":       refuse("The incoming migration has already been started"),
		"other argument":    refuse("Parameter 'detach' is unexpected"),
		"other class":       &qmp.Error{Class: "CommandNotFound", Desc: "Parameter 'uri' is missing"},
		"not a QEMU error":  errors.New("Parameter 'uri' is missing"),
		"wrapped elsewhere": fmt.Errorf("context: %w", context.Canceled),
		"nil":               nil,
	} {
		f, ok := transport.Newest().Fallback(err)
		assert.False(t, ok, name)
		assert.Equal(t, transport.Newest(), f, name)
	}
	// A field already off does not fall back again.
	_, ok = transport.Form{}.Fallback(refuse("Parameter 'uri' is missing"))
	assert.False(t, ok)
	_, ok = transport.Form{}.Fallback(refuse("Parameter 'exit-on-error' is unexpected"))
	assert.False(t, ok)
}

func TestCheckUUIDs(t *testing.T) {
	u := "11111111-1111-1111-1111-111111111111"
	assert.NoError(t, transport.CheckUUIDs("", ""))
	assert.NoError(t, transport.CheckUUIDs(u, u))
	err := transport.CheckUUIDs(u, "")
	assert.ErrorIs(t, err, transport.ErrUUIDMismatch)
	assert.Contains(t, err.Error(), "destination uuid none")
}

// WithPort takes the port a destination listening on tcp port 0 reports;
// other channels need none.
func TestWithPort(t *testing.T) {
	c, err := transport.Parse("tcp:dst.example:0")
	require.NoError(t, err)
	info := &qmp.MigrationInfo{SocketAddress: []qmp.SocketAddress{{Type: "inet", Host: "0.0.0.0", Port: "41234"}}}
	got, err := c.WithPort(info)
	require.NoError(t, err)
	assert.Equal(t, "tcp:dst.example:41234", got.String(), "the host stays the one given")
	_, err = c.WithPort(&qmp.MigrationInfo{})
	assert.ErrorIs(t, err, transport.ErrNoListenAddress)
	_, err = c.WithPort(nil)
	assert.ErrorIs(t, err, transport.ErrNoListenAddress)
	u, _ := transport.Parse("unix:/m.sock")
	got, err = u.WithPort(nil)
	require.NoError(t, err)
	assert.Equal(t, u, got)
}

func TestRemoveSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.sock")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	c, _ := transport.Parse("unix:" + path)
	require.NoError(t, transport.RemoveSocket(c))
	_, err = os.Stat(path)
	assert.True(t, os.IsNotExist(err))
	require.NoError(t, transport.RemoveSocket(c), "missing is fine")

	plain := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(plain, nil, 0o600))
	c, _ = transport.Parse("unix:" + plain)
	require.NoError(t, transport.RemoveSocket(c))
	_, err = os.Stat(plain)
	assert.NoError(t, err, "a regular file is never removed")
}

func ExampleParse() {
	c, err := transport.Parse("tcp:[fd00::2]:0")
	if err != nil {
		panic(err)
	}
	fmt.Println(c.Scheme, c.Host, c.Port, c.NeedsPort())
	fmt.Println(c.MigrateArgs(transport.Form{}).URI)
	_, err = transport.Parse("exec:nc dst 4444")
	fmt.Println(err)
	// Output:
	// tcp fd00::2 0 true
	// tcp:[fd00::2]:0
	// transport: "exec:nc dst 4444": scheme "exec": unsupported migration URI scheme (want unix:/path, tcp:host:port or fd:)
}
