package qmp

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The lazy decode (members and values on demand) summarises the captured
// schemas exactly as a full decode does.
func TestLazySchemaMatchesFullDecode(t *testing.T) {
	for _, v := range []string{"7.2", "10.0"} {
		raw, err := os.ReadFile(filepath.Join("..", "testdata", "qmp", v, "query-qmp-schema.json"))
		require.NoError(t, err)
		var full []SchemaInfo
		require.NoError(t, json.Unmarshal(raw, &full), v)
		var lazy []schemaEntry
		require.NoError(t, json.Unmarshal(raw, &lazy), v)
		require.Len(t, lazy, len(full), v)
		assert.Equal(t, FeaturesFromSchema(full), summarise(lazy), v)
	}
}
