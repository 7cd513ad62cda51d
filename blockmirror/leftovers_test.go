package blockmirror

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// What a session left (its process died: no Abort) is found by its prefix
// and removed, and nothing else is touched.
func TestLeftovers(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	_, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)

	l, err := FindLeftovers(ctx, src.c, dst.c)
	require.NoError(t, err)
	assert.Len(t, l.Jobs, 2, "a mirror per writable disk")
	assert.Len(t, l.NBDNodes, 2)
	assert.Len(t, l.Exports, 2)
	assert.Zero(t, l.OtherExports)
	assert.False(t, l.Empty())

	did, err := RemoveLeftovers(ctx, src.c, dst.c, l)
	require.NoError(t, err)
	assert.Len(t, did, 7, "2 jobs, 2 nodes, 2 exports, the NBD server: %v", did)
	nothingLeft(t, src, dst)
	l, err = FindLeftovers(ctx, src.c, dst.c)
	require.NoError(t, err)
	assert.True(t, l.Empty())
}
