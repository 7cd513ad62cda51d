package integration

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/qemulab"
)

// TestCLIMetrics scrapes `qmigrate migrate --metrics-addr` during a real
// migration and parses the exposition with the Prometheus text parser: the
// running migration's series while it runs, labelled with its name (the
// outcome counters and histograms, filled once the migration ended, are
// read by package metrics' own tests: the CLI's listener closes with it).
func TestCLIMetrics(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	bin := buildCLI(t)
	src, dst, srcSock, dstSock := cliPair(t, q, 2e6, true)
	uri := "unix:" + filepath.Join(shortTempDir(t), "mig.sock")
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	// A slow guest over a 32 MiB/s cap: a first pass of about 5 s, then
	// what it dirtied meanwhile fits 500 ms: time to scrape it running.
	cmd := exec.CommandContext(ctx, bin, "migrate", "--json", "--src", "unix:"+srcSock, "--dst", "unix:"+dstSock, "--uri", uri,
		"--bandwidth", "32MiB", "--policy", "qemu", "--max-downtime", "500ms", "--timeout", "2m", "--metrics-addr", "127.0.0.1:0")
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	lines := bufio.NewScanner(stderr)
	var url string
	for lines.Scan() {
		if u, ok := strings.CutPrefix(lines.Text(), "serving metrics on "); ok {
			url = u
			break
		}
	}
	require.NotEmpty(t, url, "the CLI says where it serves the metrics")
	go func() { _, _ = io.Copy(io.Discard, stderr) }()

	// While it runs: the migration's series, labelled with its name (the
	// --src address).
	var running map[string]*dto.MetricFamily
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		fams := scrapeMetrics(t, url)
		if m := metricWith(fams, "qmigrate_migration_data_processed_bytes", "name", "unix:"+srcSock); m != nil && m.GetGauge().GetValue() > 0 {
			running = fams
			break
		}
	}
	require.NotNil(t, running, "a running migration's series")
	total := metricWith(running, "qmigrate_migration_data_total_bytes", "name", "unix:"+srcSock)
	require.NotNil(t, total)
	assert.Greater(t, total.GetGauge().GetValue(), float64(100<<20), "the guest's RAM")
	assert.NotNil(t, metricWith(running, "qmigrate_migration_phase", "phase", "converge"))
	assert.NotNil(t, metricWith(running, "qmigrate_migration_memory_transfer_rate_bytes", "name", "unix:"+srcSock))

	// The end: the migration completes, the process exits and its
	// listener closes.
	require.NoError(t, cmd.Wait(), "migrate exits 0")
	_, err = qemulab.CheckSweep(t.Context(), src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
	_, err = http.Get(url)
	assert.Error(t, err, "the listener closed with the command")
}

func scrapeMetrics(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return fams
}

// metricWith is the metric of family name carrying label=value.
func metricWith(fams map[string]*dto.MetricFamily, name, label, value string) *dto.Metric {
	for _, m := range fams[name].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == label && l.GetValue() == value {
				return m
			}
		}
	}
	return nil
}
