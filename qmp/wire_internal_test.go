package qmp

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAppendRequest(t *testing.T) {
	for _, tc := range []struct {
		verb, cmd string
		args      any
		want      string
	}{
		{"execute", "query-status", nil, `{"execute":"query-status","id":"7"}`},
		{"exec-oob", "migrate-pause", nil, `{"exec-oob":"migrate-pause","id":"7"}`},
		{"execute", "migrate", map[string]string{"uri": "unix:/a<b>"}, `{"execute":"migrate","id":"7","arguments":{"uri":"unix:/a\u003cb\u003e"}}`},
		{"execute", `we"ird\cmd` + "\n", nil, `{"execute":"we\"ird\\cmd\n","id":"7"}`},
		{"execute", "x", (*MigrationParameters)(nil), `{"execute":"x","id":"7"}`},
		{"execute", "x", json.RawMessage(`{"a":1}`), `{"execute":"x","id":"7","arguments":{"a":1}}`},
	} {
		b, err := appendRequest(nil, tc.verb, tc.cmd, 7, tc.args)
		require.NoError(t, err)
		require.Equal(t, byte('\n'), b[len(b)-1])
		assert.JSONEq(t, tc.want, string(b[:len(b)-1]))
		var m map[string]any
		require.NoError(t, json.Unmarshal(b, &m))
		assert.Equal(t, tc.cmd, m[tc.verb])
	}
	_, err := appendRequest(nil, "execute", "x", 1, make(chan int))
	assert.Error(t, err)
}

func TestParseID(t *testing.T) {
	for raw, want := range map[string]uint64{`"1"`: 1, `"18446744073"`: 18446744073, `"0"`: 0} {
		got, ok := parseID(json.RawMessage(raw))
		assert.True(t, ok, raw)
		assert.Equal(t, want, got, raw)
	}
	for _, raw := range []string{``, `""`, `1`, `"1`, `"a"`, `"-1"`, `"1.0"`, `null`, `"99999999999999999999"`, `{"a":1}`} {
		_, ok := parseID(json.RawMessage(raw))
		assert.False(t, ok, raw)
	}
}

func TestRedact(t *testing.T) {
	in := `{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"aHVudGVyMg==","format":"base64"}}`
	out := redact([]byte(in))
	assert.NotContains(t, out, "aHVudGVyMg")
	assert.Contains(t, out, `"data":"<redacted>"`)
	assert.Contains(t, out, `"format":"base64"`)
	// Event data objects are not secrets and stay readable.
	ev := `{"event":"MIGRATION","data":{"status":"active"}}`
	assert.Equal(t, ev, redact([]byte(ev)))
	esc := `{"password": "a\"b\\c", "keyid": "k"}`
	assert.Equal(t, `{"password": "<redacted>", "keyid": "<redacted>"}`, redact([]byte(esc)))
}
