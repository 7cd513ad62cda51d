package qmp

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The lazy decode (scanner, then members on demand) summarises the captured
// schemas exactly as a full decode does.
func TestScanSchemaMatchesFullDecode(t *testing.T) {
	for _, v := range []string{"7.2", "10.0"} {
		raw, err := os.ReadFile(filepath.Join("..", "testdata", "qmp", v, "query-qmp-schema.json"))
		require.NoError(t, err)
		var full []SchemaInfo
		require.NoError(t, json.Unmarshal(raw, &full), v)
		scanned, ok := scanSchema(raw)
		require.True(t, ok, v)
		require.Len(t, scanned, len(full), v)
		var list schemaList
		require.NoError(t, json.Unmarshal(raw, &list), v)
		assert.Equal(t, FeaturesFromSchema(full), summarise(scanned), v)
		assert.Equal(t, FeaturesFromSchema(full), summarise(list), v)
	}
}

// On any input the scanner either declines or agrees with encoding/json.
func FuzzScanSchema(f *testing.F) {
	for _, s := range []string{
		`[]`, ` [ ] `, `[{}]`, `[null]`, `{}`, `[{"name":"a","meta-type":"command","allow-oob":true}]`,
		`[{"name":"a\"b\\u00e9","members":[{"name":"x","type":"[1]"}],"values":["p","q"]}]`,
		`[{"Name":"a"}]`, `[{"n\u0061me":"a"}]`, `[{"name":null,"allow-oob":null,"arg-type":"0"}]`,
		`[{"name":1}]`, `[{"allow-oob":"yes"}]`, `[{"name":"a","variants":[{"case":"x","type":"1"}],"x":{"y":[1,2,{"z":"}"}]}}]`,
		"[{\"name\":\"\xff\"}]", `[{"name":"a"},{"name":"b","element-type":"c","ret-type":"d"}]`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if !json.Valid(data) {
			return // the client hands only valid JSON to the decoder
		}
		var want []schemaEntry
		werr := json.Unmarshal(data, &want)
		got, ok := scanSchema(data)
		if !ok {
			return
		}
		if werr != nil {
			t.Fatalf("scanner accepted %q, encoding/json: %v", data, werr)
		}
		if len(got) != len(want) {
			t.Fatalf("%q: %d entries, encoding/json %d", data, len(got), len(want))
		}
		for i := range got {
			got[i].decode()
			want[i].decode()
			if !reflect.DeepEqual(got[i], want[i]) {
				t.Fatalf("%q: entry %d: %+v, encoding/json %+v", data, i, got[i], want[i])
			}
		}
	})
}
