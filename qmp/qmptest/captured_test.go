package qmptest_test

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

func TestCapturedError(t *testing.T) {
	want, err := qmptest.CapturedError(filepath.Join("..", "..", "testdata", "qmp", "7.2", "errors", "migrate-unexpected.json"))
	require.NoError(t, err)
	require.NotNil(t, want)
	assert.Equal(t, "GenericError", want.Class)
	assert.NoError(t, qmptest.MatchError(&qmp.Error{Class: want.Class, Desc: want.Desc}, want))
	assert.ErrorContains(t, qmptest.MatchError(&qmp.Error{Class: want.Class, Desc: "other"}, want), `got GenericError "other"`)
	assert.ErrorContains(t, qmptest.MatchError(nil, want), "want QEMU's GenericError")
	assert.ErrorContains(t, qmptest.MatchError(errors.New("closed"), want), "got closed")

	none, err := qmptest.CapturedError(filepath.Join(t.TempDir(), "accepted.json"))
	require.NoError(t, err, "no capture: QEMU accepted it")
	assert.Nil(t, none)
	assert.NoError(t, qmptest.MatchError(nil, none))
	assert.ErrorContains(t, qmptest.MatchError(errors.New("refused"), none), "QEMU accepted the request, got refused")
}
