package qmptest_test

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

func TestCheckArgs(t *testing.T) {
	for name, tc := range map[string]struct {
		args    string
		members []string
		want    string // "" = accepted
	}{
		"all given":            {`{"uri":"unix:/s"}`, []string{"uri"}, ""},
		"optional left out":    {`{"uri":"unix:/s"}`, []string{"uri", "*detach"}, ""},
		"no arguments":         {``, []string{"*uri"}, ""},
		"null":                 {`null`, []string{"*uri"}, ""},
		"mandatory missing":    {`{"channels":[]}`, []string{"uri"}, "Parameter 'uri' is missing"},
		"missing before extra": {`{"channels":[],"exit-on-error":true}`, []string{"uri"}, "Parameter 'uri' is missing"},
		"no arguments missing": {``, []string{"uri"}, "Parameter 'uri' is missing"},
		"unexpected":           {`{"uri":"u","exit-on-error":true}`, []string{"uri"}, "Parameter 'exit-on-error' is unexpected"},
		"two unexpected":       {`{"uri":"u","z":1,"b":2}`, []string{"*uri"}, "Parameter 'b' is unexpected"},
		"not an object":        {`[1]`, []string{"*uri"}, "QMP input member 'arguments' must be an object"},
	} {
		t.Run(name, func(t *testing.T) {
			err := qmptest.CheckArgs(json.RawMessage(tc.args), tc.members...)
			if tc.want == "" {
				assert.NoError(t, err)
				return
			}
			var qe *qmp.Error
			require.ErrorAs(t, err, &qe)
			assert.Equal(t, "GenericError", qe.Class)
			assert.Equal(t, tc.want, qe.Desc)
		})
	}
}

// A command wrapped in Args is refused before its handler runs, over the
// wire, with QEMU's error.
func TestArgsRefusesBeforeHandler(t *testing.T) {
	s := qmptest.NewServer()
	defer s.Close()
	ran := 0
	s.Handle("migrate-incoming", qmptest.Args(func(json.RawMessage) (any, error) { ran++; return nil, nil }, "uri"))
	c := newClient(t, s)
	err := c.MigrateIncoming(t.Context(), qmp.MigrateIncomingArgs{URI: "unix:/s", ExitOnError: qmp.Ptr(true)})
	assert.True(t, qmp.IsUnexpectedArgument(err, "exit-on-error"), "%v", err)
	assert.Zero(t, ran)
	require.NoError(t, c.MigrateIncoming(t.Context(), qmp.MigrateIncomingArgs{URI: "unix:/s"}))
	assert.Equal(t, 1, ran)
}
