package engine_test

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The README's embedding example is ExampleStart's body: the README cannot
// show code that does not compile or run.
func TestReadmeExample(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	src, err := os.ReadFile("example_test.go")
	require.NoError(t, err)
	s := string(src)
	i := strings.Index(s, "func ExampleStart() {\n")
	require.GreaterOrEqual(t, i, 0)
	s = s[i+len("func ExampleStart() {\n"):]
	s = s[:strings.Index(s, "\t// Output:")]
	var body []string
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		body = append(body, strings.TrimPrefix(l, "\t"))
	}
	r := string(readme)
	i = strings.Index(r, "### Embedding")
	require.GreaterOrEqual(t, i, 0, "README has an Embedding section")
	r = r[i:]
	start := strings.Index(r, "```go\n") + len("```go\n")
	end := strings.Index(r[start:], "```")
	require.Equal(t, strings.Join(body, "\n")+"\n", r[start:start+end], "README's example differs from ExampleStart: copy it over")
}
