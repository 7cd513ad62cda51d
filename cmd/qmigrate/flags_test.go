package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

func TestParseByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
	}{
		{"0", 0},
		{"unlimited", 0},
		{"1234", 1234},
		{"100B", 100},
		{"100K", 100 << 10},
		{"100k", 100 << 10},
		{"100KiB", 100 << 10},
		{"100KB", 100_000},
		{"500MB", 500_000_000},
		{"256MiB", 256 << 20},
		{"256mib", 256 << 20},
		{"256M", 256 << 20},
		{"1GiB", 1 << 30},
		{"1G", 1 << 30},
		{"1GB", 1_000_000_000},
		{"1.5GiB", 3 << 29},
		{"2TiB", 2 << 40},
		{"1TB", 1_000_000_000_000},
		{"64MiB/s", 64 << 20},
		{"1 GiB", 1 << 30},
		{" 10MB/s ", 10_000_000},
	} {
		got, err := parseByteSize(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
	}
	for _, bad := range []string{"", "MiB", "-1", "1XB", "1.2.3M", "abc", "1e3", "1Mbit", "99999999TiB", "0.4", "0.1B"} {
		_, err := parseByteSize(bad)
		assert.Error(t, err, bad)
	}
	// A negative size says so; a size that rounds to 0 bytes is refused
	// rather than read as 0, which means unlimited.
	_, err := parseByteSize("-5MiB")
	assert.ErrorContains(t, err, "negative")
	_, err = parseByteSize("0.4")
	assert.ErrorContains(t, err, "less than one byte")
	got, err := parseByteSize("0.6")
	require.NoError(t, err)
	assert.Equal(t, uint64(1), got)
}

func TestDurationFlag(t *testing.T) {
	var d duration
	require.NoError(t, d.Set("300ms"))
	assert.Equal(t, 300*time.Millisecond, time.Duration(d))
	require.NoError(t, d.Set("0"))
	assert.Zero(t, d)
	err := d.Set("300")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no unit")
	assert.Error(t, d.Set("-1s"))
	assert.Error(t, d.Set("soon"))
}

func TestPolicyFlag(t *testing.T) {
	var p policyName
	assert.Equal(t, "auto", p.String())
	for _, name := range strategy.Policies() {
		require.NoError(t, p.Set(name))
		assert.Equal(t, name, string(p))
	}
	require.NoError(t, p.Set("KubeVirt"))
	assert.Equal(t, "kubevirt", string(p))
	err := p.Set("libvirt")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "auto, qemu, kubevirt, nova, proxmox")
}

func TestStringListAndChannels(t *testing.T) {
	var l stringList
	require.NoError(t, l.Set("disk0"))
	require.NoError(t, l.Set("disk1,disk2"))
	require.NoError(t, l.Set("disk0"))
	assert.Equal(t, stringList{"disk0", "disk1", "disk2"}, l)
	assert.Error(t, l.Set("a,,b"))

	var c channelCount
	require.NoError(t, c.Set("4"))
	assert.Equal(t, channelCount(4), c)
	require.NoError(t, c.Set("1"))
	require.NoError(t, c.Set("255"))
	assert.Error(t, c.Set("0"), "0 channels is no multifd: leave the flag out")
	assert.Error(t, c.Set("-1"))
	assert.Error(t, c.Set("256"))
	assert.Error(t, c.Set("two"))
}

func TestMigrateConfigFromFlags(t *testing.T) {
	var o migrateOptions
	fs := o.flagSet()
	require.NoError(t, parseFlags(fs, []string{
		"--src", "unix:/run/src.qmp", "--dst=tcp:10.0.0.2:4000", "-uri", "tcp:10.0.0.2:0",
		"--max-downtime=500ms", "--bandwidth", "1GiB", "--timeout", "5m", "--progress-timeout=30s",
		"--policy", "nova", "--allow-postcopy", "--allow-pause", "--no-auto-converge", "--multifd", "4",
		"--disk", "disk0", "--disk=disk1", "--nbd", "tcp:10.0.0.2:10809", "--connect-timeout", "3s", "--unresponsive-timeout=1m", "-v",
		"--insecure-qmp",
	}))
	cfg, err := o.config()
	require.NoError(t, err)
	assert.True(t, cfg.Destination.InsecureTCP)
	assert.Equal(t, "unix:/run/src.qmp", cfg.Source.Address.String())
	assert.Equal(t, "tcp:10.0.0.2:4000", cfg.Destination.Address.String())
	assert.Equal(t, "tcp:10.0.0.2:0", cfg.URI)
	assert.Equal(t, uint64(1<<30), cfg.Bandwidth)
	assert.Equal(t, 4, cfg.MultifdChannels)
	assert.Equal(t, 3*time.Second, cfg.ConnectTimeout)
	assert.Equal(t, time.Minute, cfg.UnresponsiveTimeout)
	assert.Equal(t, strategy.Config{Policy: "nova", Limits: strategy.Limits{
		MaxDowntime: 500 * time.Millisecond, Budget: 5 * time.Minute, ProgressTimeout: 30 * time.Second,
		NoThrottle: true, AllowPostcopy: true, AllowPause: true,
	}}, cfg.Strategy)
	require.NotNil(t, cfg.Storage)
	assert.Equal(t, []string{"disk0", "disk1"}, cfg.Storage.Disks)
	assert.Equal(t, "tcp:10.0.0.2:10809", cfg.Storage.NBDAddress.String())
	assert.True(t, o.verbose)
}

func TestMigrateConfigDefaults(t *testing.T) {
	var o migrateOptions
	require.NoError(t, parseFlags(o.flagSet(), []string{"--src", "unix:/a", "--dst", "unix:/b", "--uri", "unix:/c"}))
	cfg, err := o.config()
	require.NoError(t, err)
	assert.Equal(t, strategy.Config{Policy: "auto", Limits: strategy.Limits{MaxDowntime: 300 * time.Millisecond}}, cfg.Strategy)
	assert.Zero(t, cfg.Bandwidth)
	assert.Zero(t, cfg.MultifdChannels)
	assert.Nil(t, cfg.Storage)
	assert.Equal(t, 10*time.Second, cfg.ConnectTimeout)
	assert.Equal(t, engine.DefaultUnresponsiveTimeout, cfg.UnresponsiveTimeout)
	assert.False(t, o.jsonOut)

	o = migrateOptions{}
	require.NoError(t, parseFlags(o.flagSet(), []string{"--src", "unix:/a", "--dst", "unix:/b", "--uri", "unix:/c", "--copy-storage"}))
	cfg, err = o.config()
	require.NoError(t, err)
	require.NotNil(t, cfg.Storage)
	assert.Empty(t, cfg.Storage.Disks)
	assert.Empty(t, cfg.Storage.NBDAddress)
	assert.False(t, cfg.Storage.WriteBlocking)

	o = migrateOptions{}
	require.NoError(t, parseFlags(o.flagSet(), []string{"--src", "unix:/a", "--dst", "unix:/b", "--uri", "unix:/c", "--disk", "d0", "--write-blocking"}))
	cfg, err = o.config()
	require.NoError(t, err)
	require.NotNil(t, cfg.Storage)
	assert.True(t, cfg.Storage.WriteBlocking)
	assert.Equal(t, []string{"d0"}, cfg.Storage.Disks)
}

// runCLI runs the CLI in-process and returns its exit status and output.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsageErrorsExit2NamingTheProblem(t *testing.T) {
	base := []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "unix:/c"}
	for _, tc := range []struct {
		name string
		args []string
		want []string // substrings of stderr
	}{
		{"no command", nil, []string{"Usage:"}},
		{"unknown command", []string{"migr"}, []string{`unknown command "migr"`}},
		{"unknown flag", append(base, "--fast"), []string{"--fast", "not defined", "qmigrate migrate --help"}},
		{"bad bandwidth", append(base, "--bandwidth", "fast"), []string{"--bandwidth", `"fast"`}},
		{"bad bandwidth unit", append(base, "--bandwidth=10XB"), []string{"--bandwidth", "XB"}},
		{"bad duration", append(base, "--max-downtime", "300"), []string{"--max-downtime", "no unit"}},
		{"zero downtime", append(base, "--max-downtime", "0s"), []string{"--max-downtime"}},
		{"huge downtime", append(base, "--max-downtime", "1h"), []string{"--max-downtime", "maximum"}},
		{"bad timeout", append(base, "--timeout", "-5s"), []string{"--timeout", "negative"}},
		{"bad policy", append(base, "--policy", "libvirt"), []string{"--policy", `"libvirt"`, "auto, qemu, kubevirt, nova, proxmox"}},
		{"bad multifd", append(base, "--multifd", "x"), []string{"--multifd"}},
		{"zero multifd", append(base, "--multifd", "0"), []string{"--multifd", `"0"`, "1 to 255"}},
		{"negative multifd", append(base, "--multifd=-2"), []string{"--multifd", `"-2"`, "1 to 255"}},
		{"sub-byte bandwidth", append(base, "--bandwidth", "0.4"), []string{"--bandwidth", "less than one byte"}},
		{"negative bandwidth", append(base, "--bandwidth", "-1MiB"), []string{"--bandwidth", "negative"}},
		{"empty policy", append(base, "--policy="), []string{"--policy", "unknown policy"}},
		{"policy without value", append(base, "--policy"), []string{"flag needs an argument: --policy"}},
		{"single-dash unknown flag", append(base, "-fast"), []string{"not defined: --fast"}},
		{"bad boolean", append(base, "--json=maybe"), []string{`invalid boolean value "maybe" for --json`}},
		{"bare path src", []string{"migrate", "--src", "/run/src.qmp", "--dst", "unix:/b", "--uri", "unix:/c"},
			[]string{"--src", "missing scheme", "did you mean unix:/run/src.qmp?"}},
		{"host:port dst", []string{"migrate", "--src", "unix:/a", "--dst", "10.0.0.2:4000", "--uri", "unix:/c"},
			[]string{"--dst", "missing scheme", "did you mean tcp:10.0.0.2:4000?"}},
		{"src port out of range", []string{"migrate", "--src", "tcp:10.0.0.1:99999", "--dst", "unix:/b", "--uri", "unix:/c"},
			[]string{"--src", `port "99999"`, "1 to 65535"}},
		{"src port 0", []string{"migrate", "--src", "tcp:10.0.0.1:0", "--dst", "unix:/b", "--uri", "unix:/c"},
			[]string{"--src", `port "0"`}},
		{"src path too long", []string{"migrate", "--src", "unix:/" + strings.Repeat("s", 120), "--dst", "unix:/b", "--uri", "unix:/c"},
			[]string{"--src", "longer than the 107"}},
		{"bare path uri", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "/run/mig.sock"},
			[]string{"--uri", "missing scheme", "did you mean unix:/run/mig.sock?"}},
		{"host:port uri", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "10.0.0.2:4444"},
			[]string{"--uri", "did you mean tcp:10.0.0.2:4444?"}},
		{"uri empty host", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "tcp::4444"},
			[]string{"--uri", "empty host", "qmigrate migrate --help"}},
		{"uri port out of range", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "tcp:10.0.0.2:70000"},
			[]string{"--uri", `port "70000"`, "qmigrate migrate --help"}},
		{"uri relative path", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "unix:mig.sock"},
			[]string{"--uri", "not absolute"}},
		{"uri fd", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "fd:3"},
			[]string{"--uri", `unsupported scheme "fd:"`}},
		{"help unknown topic", []string{"help", "migr"}, []string{`unknown command "migr"`}},
		{"help extra argument", []string{"help", "migrate", "now"}, []string{`unexpected argument "now"`}},
		{"missing src", []string{"migrate", "--dst", "unix:/b", "--uri", "unix:/c"}, []string{"--src is required"}},
		{"missing dst", []string{"migrate", "--src", "unix:/a", "--uri", "unix:/c"}, []string{"--dst is required"}},
		{"missing uri", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b"}, []string{"--uri is required"}},
		{"bad src", []string{"migrate", "--src", "/run/src.qmp", "--dst", "unix:/b", "--uri", "unix:/c"}, []string{"--src", "/run/src.qmp", "unix:/path or tcp:host:port"}},
		{"tcp without port", []string{"migrate", "--src", "tcp:localhost", "--dst", "unix:/b", "--uri", "unix:/c"}, []string{"--src", "tcp:localhost"}},
		{"exec uri", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "exec:cat"}, []string{"--uri", "exec:cat", `unsupported scheme "exec:"`}},
		{"same socket", []string{"migrate", "--src", "unix:/a", "--dst", "unix:/a", "--uri", "unix:/c"}, []string{"--src and --dst"}},
		{"same socket spelled differently", []string{"migrate", "--src", "unix:/run/q.qmp", "--dst", "unix://run/./q.qmp", "--uri", "unix:/c"},
			[]string{"--src and --dst are the same socket", "unix://run/./q.qmp"}},
		{"nbd alone", append(base, "--nbd", "unix:/n"), []string{"--nbd needs --copy-storage or --disk"}},
		{"write-blocking alone", append(base, "--write-blocking"), []string{"--write-blocking needs --copy-storage or --disk"}},
		{"bad nbd", append(base, "--copy-storage", "--nbd", "nbd://x"), []string{"--nbd", "nbd://x"}},
		{"positional", append(base, "extra"), []string{`unexpected argument "extra"`}},
		{"version arg", []string{"version", "x"}, []string{"unexpected argument"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(t, tc.args...)
			assert.Equal(t, exitUsage, code)
			assert.Empty(t, stdout)
			for _, w := range tc.want {
				assert.Contains(t, stderr, w)
			}
		})
	}
}

func TestUsageErrorWithJSONStillEndsWithResult(t *testing.T) {
	for _, args := range [][]string{
		{"migrate", "--json", "--src", "unix:/a", "--dst", "unix:/b", "--uri", "unix:/c", "--policy", "bogus"},
		{"migrate", "--json", "--dst", "unix:/b", "--uri", "unix:/c"},
	} {
		code, stdout, stderr := runCLI(t, args...)
		assert.Equal(t, exitUsage, code)
		assert.NotEmpty(t, stderr)
		lines := strings.Split(strings.TrimSpace(stdout), "\n")
		require.Len(t, lines, 1, stdout)
		var res map[string]any
		require.NoError(t, json.Unmarshal([]byte(lines[0]), &res))
		assert.Equal(t, "result", res["type"])
		assert.Equal(t, "failed", res["status"])
		assert.NotEmpty(t, res["error"])
		assert.Equal(t, []any{}, res["decisions"])
	}
}

func TestHelpAndVersion(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		code, stdout, _ := runCLI(t, args...)
		assert.Equal(t, exitOK, code)
		assert.Contains(t, stdout, "qmigrate migrate --src ADDR --dst ADDR --uri URI")
		assert.Contains(t, stdout, "qmigrate demo")
	}
	for _, args := range [][]string{{"migrate", "--help"}, {"migrate", "-h"}, {"help", "migrate"}} {
		code, stdout, _ := runCLI(t, args...)
		assert.Equal(t, exitOK, code)
		for _, f := range migrateFlagOrder() {
			assert.Contains(t, stdout, "--"+f, f)
		}
		assert.Contains(t, stdout, "-v, --verbose")
		assert.Contains(t, stdout, "EXIT STATUS")
		assert.Contains(t, stdout, `"type":"result"`)
	}
	for _, args := range [][]string{{"help", "help"}, {"help", "version"}} {
		code, stdout, _ := runCLI(t, args...)
		assert.Equal(t, exitOK, code, args)
		assert.Contains(t, stdout, "qmigrate migrate --src ADDR", args)
	}
	code, stdout, _ := runCLI(t, "version")
	assert.Equal(t, exitOK, code)
	assert.True(t, strings.HasPrefix(stdout, "qmigrate "), stdout)
}

func TestDashDash(t *testing.T) {
	for in, want := range map[string]string{
		"flag provided but not defined: -fast":                         "flag provided but not defined: --fast",
		`invalid value "a -b" for flag -policy: unknown policy "a -b"`: `invalid value "a -b" for flag --policy: unknown policy "a -b"`,
		`invalid boolean value "x -y" for -json: parse error`:          `invalid boolean value "x -y" for --json: parse error`,
		"flag needs an argument: -uri":                                 "flag needs an argument: --uri",
		"bad flag syntax: ---x":                                        "bad flag syntax: ---x",
	} {
		assert.Equal(t, want, dashDash(in), in)
	}
}

func TestWantsJSON(t *testing.T) {
	assert.True(t, wantsJSON([]string{"--bad", "--json"}))
	assert.True(t, wantsJSON([]string{"-json=true"}))
	assert.True(t, wantsJSON([]string{"--json=T"}), "every true the flag package takes")
	assert.True(t, wantsJSON([]string{"--json=TRUE"}))
	assert.False(t, wantsJSON([]string{"--json=0"}))
	assert.False(t, wantsJSON([]string{"--json=maybe"}))
	assert.False(t, wantsJSON([]string{"--json=false"}))
	assert.False(t, wantsJSON([]string{"--", "--json"}))
}

func TestDemoUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"demo", "--qemu", "/nonexistent/qemu-system-x86_64"}, []string{"--qemu", "/nonexistent/qemu-system-x86_64"}},
		{[]string{"demo", "--spin", "-5"}, []string{"--spin"}},
		{[]string{"demo", "--dirty-rate", "fast"}, []string{"--dirty-rate", `"fast"`}},
		{[]string{"demo", "--dirty-rate", "0"}, []string{"--dirty-rate must be more than 0"}},
		{[]string{"demo", "--unresponsive-timeout", "0"}, []string{"--unresponsive-timeout must be more than 0"}},
		{[]string{"demo", "--connect-timeout", "0s"}, []string{"--connect-timeout must be more than 0"}},
		{[]string{"demo", "--policy", "vmware"}, []string{"--policy", "auto, qemu, kubevirt, nova, proxmox"}},
		{[]string{"demo", "--src", "unix:/a"}, []string{"--src", "not defined"}},
	} {
		code, stdout, stderr := runCLI(t, tc.args...)
		assert.Equal(t, exitUsage, code, tc.args)
		assert.Empty(t, stdout, tc.args)
		for _, w := range tc.want {
			assert.Contains(t, stderr, w, tc.args)
		}
	}
	code, stdout, _ := runCLI(t, "demo", "--help")
	assert.Equal(t, exitOK, code)
	for _, f := range demoFlagOrder() {
		assert.Contains(t, stdout, "--"+f, f)
	}
	code, stdout, _ = runCLI(t, "demo", "--json", "--qemu", "/nonexistent/qemu")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stdout, `"type":"result","status":"failed"`)
}

// Every flag is listed in the help (a new flag missing from the order would
// silently vanish from --help).
func TestHelpListsEveryFlag(t *testing.T) {
	for _, tc := range []struct {
		fs    *flag.FlagSet
		order []string
	}{
		{(&migrateOptions{}).flagSet(), migrateFlagOrder()},
		{(&demoOptions{}).flagSet(), demoFlagOrder()},
		{(&evacuateOptions{}).flagSet(), evacuateFlagOrder()},
		{(&checkOptions{}).flagSet(), checkFlagOrder()},
	} {
		tc.fs.VisitAll(func(f *flag.Flag) {
			if f.Name != "v" {
				assert.Contains(t, tc.order, f.Name, tc.fs.Name())
			}
		})
	}
}

// The write-blocking decision renders like any other: its action and reason,
// no downtime or throttle details.
func TestWriteBlockingDecisionRendered(t *testing.T) {
	d := strategy.Decision{Action: strategy.MirrorWriteBlocking, Reason: "auto: disk mirrors never READY", At: 3 * time.Second}
	assert.Equal(t, "decision write-blocking: auto: disk mirrors never READY", describeDecision(d, nil, false))
	var out bytes.Buffer
	newJSONRenderer(&out).Event(engine.Event{Kind: engine.EventDecision, Elapsed: 3 * time.Second, Decision: &d})
	assert.JSONEq(t, `{"type":"decision","elapsed_ms":3000,"action":"write-blocking","reason":"auto: disk mirrors never READY"}`, out.String())
}

func TestTLSFlags(t *testing.T) {
	parse := func(args ...string) (engine.Config, error) {
		var o migrateOptions
		require.NoError(t, parseFlags(o.flagSet(), append([]string{"--src", "unix:/a", "--dst", "unix:/b"}, args...)))
		return o.config()
	}
	cfg, err := parse("--uri", "tcp:10.0.0.2:0", "--tls-x509", "/etc/pki/qemu", "--tls-authz", "auth0")
	require.NoError(t, err)
	assert.Equal(t, &transport.TLS{Kind: transport.TLSX509, Dir: "/etc/pki/qemu", Authz: "auth0"}, cfg.TLS)

	cfg, err = parse("--uri", "unix:/run/m.sock", "--tls-x509=/pki", "--tls-hostname", "dst.example", "--copy-storage")
	require.NoError(t, err)
	assert.Equal(t, &transport.TLS{Kind: transport.TLSX509, Dir: "/pki", Hostname: "dst.example"}, cfg.TLS)

	cfg, err = parse("--uri", "unix:/run/m.sock", "--tls-psk", "/pki/psk", "--tls-psk-user", "mig")
	require.NoError(t, err)
	assert.Equal(t, &transport.TLS{Kind: transport.TLSPSK, Dir: "/pki/psk", Username: "mig"}, cfg.TLS)

	cfg, err = parse("--uri", "unix:/run/m.sock")
	require.NoError(t, err)
	assert.Nil(t, cfg.TLS)
}

func TestTLSFlagErrorsExit2(t *testing.T) {
	base := []string{"migrate", "--src", "unix:/a", "--dst", "unix:/b"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"both kinds", []string{"--uri", "tcp:h:1", "--tls-x509", "/p", "--tls-psk", "/q"}, "--tls-x509 and --tls-psk exclude each other"},
		{"hostname alone", []string{"--uri", "tcp:h:1", "--tls-hostname", "h"}, "--tls-hostname needs --tls-x509 or --tls-psk"},
		{"authz alone", []string{"--uri", "tcp:h:1", "--tls-authz", "a"}, "--tls-authz needs --tls-x509 or --tls-psk"},
		{"psk user with x509", []string{"--uri", "tcp:h:1", "--tls-x509", "/p", "--tls-psk-user", "u"}, "--tls-psk-user goes with --tls-psk"},
		{"hostname with psk", []string{"--uri", "tcp:h:1", "--tls-psk", "/p", "--tls-hostname", "h"}, "--tls-hostname goes with --tls-x509"},
		{"relative folder", []string{"--uri", "tcp:h:1", "--tls-x509", "pki"}, `--tls-x509 "pki": not an absolute path`},
		{"x509 over unix", []string{"--uri", "unix:/m.sock", "--tls-x509", "/p"}, "--tls-x509 with --uri unix:/m.sock needs --tls-hostname"},
		{"x509 with a unix NBD server", []string{"--uri", "tcp:h:1", "--tls-x509", "/p", "--copy-storage", "--nbd", "unix:/n.sock"}, "--tls-x509 with --nbd unix:/n.sock needs --tls-hostname"},
		{"psk user with a colon", []string{"--uri", "tcp:h:1", "--tls-psk", "/p", "--tls-psk-user", "a:b"}, "TLS.Username"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(t, append(base, tc.args...)...)
			assert.Equal(t, exitUsage, code)
			assert.Empty(t, stdout)
			assert.Contains(t, stderr, tc.want)
		})
	}
}

// Plain tcp QMP to another host is refused without --insecure-qmp, naming
// the flag; --qmp-tls-x509 loads the client credentials (a missing folder
// is bad input naming the flag).
func TestQMPOverTCPNeedsTLSOrInsecure(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"plain remote", []string{"migrate", "--src", "tcp:198.18.0.1:4444", "--dst", "unix:/b", "--uri", "unix:/c"},
			[]string{"--src tcp:198.18.0.1:4444", "--qmp-tls-x509", "--insecure-qmp"}},
		{"credentials missing", []string{"migrate", "--src", "tcp:198.18.0.1:4444", "--dst", "unix:/b", "--uri", "unix:/c", "--qmp-tls-x509", "/nonexistent/qmp-tls"},
			[]string{"--qmp-tls-x509", "/nonexistent/qmp-tls", "ca-cert.pem"}},
		{"relative folder", []string{"migrate", "--src", "tcp:198.18.0.1:4444", "--dst", "unix:/b", "--uri", "unix:/c", "--qmp-tls-x509", "tls"},
			[]string{"--qmp-tls-x509", "absolute"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, tc.args...)
			assert.Equal(t, 2, code)
			for _, w := range tc.want {
				assert.Contains(t, stderr, w)
			}
		})
	}
}
