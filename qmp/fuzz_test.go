package qmp_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"testing"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

const fuzzGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}` + "\n"

// FuzzReader feeds arbitrary bytes to the client's reader and dispatch path
// after a valid handshake, with a command in flight and a subscription
// open. The client must neither panic nor hang: when the far end closes,
// every call returns and Done is closed.
func FuzzReader(f *testing.F) {
	for _, s := range []string{
		`{"return": {"status": "active", "ram": {"transferred": 1}}, "id": "2"}`,
		`{"error": {"class": "GenericError", "desc": "x"}, "id": "2"}`,
		`{"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {"seconds": 1, "microseconds": 2}}`,
		`{"event": "BLOCK_JOB_READY", "data": {"device": "m0", "len": 1}}` + "\n" + `{"return": {}, "id": "2"}`,
		`{"return": {}, "id": 2}`,
		`{"return": null, "id": "2"}`,
		`{"QMP": {}}`,
		"\n\n\r\n  \n",
		`{"event": ""}`,
		`{"id": "2"}`,
		`[]`,
		`{"return": {}, "id": "2"` + "\n",
		"\x00\xff{",
	} {
		f.Add([]byte(s))
	}
	for _, g := range goldenFiles(f, "query-migrate") {
		f.Add(append(append([]byte(`{"id": "2", "return": `), compact(f, g)...), '}'))
	}
	for _, g := range goldenFiles(f, "events") {
		var evs []json.RawMessage
		if json.Unmarshal(g, &evs) == nil {
			var b []byte
			for _, e := range evs {
				b = append(b, compact(f, e)...)
				b = append(b, '\n')
			}
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		client, server := net.Pipe()
		go func() {
			defer server.Close()
			r := bufio.NewReader(server)
			if _, err := server.Write([]byte(fuzzGreeting)); err != nil {
				return
			}
			if _, err := r.ReadBytes('\n'); err != nil { // qmp_capabilities, id 1
				return
			}
			if _, err := server.Write([]byte(`{"return": {}, "id": "1"}` + "\n")); err != nil {
				return
			}
			go func() { // drain whatever the client sends
				for {
					if _, err := r.ReadBytes('\n'); err != nil {
						return
					}
				}
			}()
			server.Write(data)
			server.Write([]byte("\n"))
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := qmp.NewClient(ctx, client)
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer c.Close()
		sub := c.Subscribe(qmp.EventFilter{Match: func(e qmp.Event) bool {
			_ = e.Field("device")
			return true
		}})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for ev := range sub.C {
				var info qmp.MigrationInfo
				_ = ev.Decode(&info)
				_ = info.Status.Terminal()
			}
		}()
		var info qmp.MigrationInfo
		_ = c.Execute(ctx, "query-migrate", nil, &info)
		select {
		case <-c.Done():
		case <-ctx.Done():
			t.Fatal("client did not notice the closed connection")
		}
		if c.Err() == nil {
			t.Fatal("Done closed but Err is nil")
		}
		<-done
		if ctx.Err() != nil {
			t.Fatal("hang")
		}
	})
}

// FuzzDecode decodes arbitrary JSON into the wire types and the schema
// summary. Nothing may panic; a decoded MigrationInfo always has a status.
func FuzzDecode(f *testing.F) {
	for _, dir := range []string{"query-migrate", "query-block-jobs", "query-jobs", "query-status", "events"} {
		for _, g := range goldenFiles(f, dir) {
			f.Add(compact(f, g))
		}
	}
	for _, s := range []string{
		`{}`, `null`, `{"status": 5}`, `{"ram": null, "total-time": -1}`,
		`[{"name": "migrate", "meta-type": "command", "arg-type": "1"}, {"name": "1", "meta-type": "object", "members": [{"name": "channels", "type": "2"}]}]`,
		`[{"name": "migrate-set-capabilities", "meta-type": "command", "arg-type": "a"}, {"name": "a", "meta-type": "object", "members": [{"name": "capabilities", "type": "b"}]}, {"name": "b", "meta-type": "array", "element-type": "c"}, {"name": "c", "meta-type": "object", "members": [{"name": "capability", "type": "d"}]}, {"name": "d", "meta-type": "enum", "values": ["xbzrle"]}]`,
		`[{"name": "query-migrate", "meta-type": "command", "ret-type": "q"}, {"name": "q", "meta-type": "object", "members": [{"name": "status", "type": "q"}]}]`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var info qmp.MigrationInfo
		if json.Unmarshal(data, &info) == nil {
			if info.Status == "" {
				t.Fatal("decoded MigrationInfo without a status")
			}
			_ = info.Status.Terminal()
			_ = info.Status.Postcopy()
			if info.RAM != nil {
				_ = info.RAM.Throughput()
				_ = info.RAM.DirtyRate()
			}
		}
		var jobs []qmp.BlockJobInfo
		_ = json.Unmarshal(data, &jobs)
		var params qmp.MigrationParameters
		if json.Unmarshal(data, &params) == nil {
			_ = params.DowntimeLimitDuration()
		}
		ev := qmp.Event{Name: "X", Data: data}
		_ = ev.Field("device")
		_ = qmp.ForDevice("d")(ev)
		var schema []qmp.SchemaInfo
		if json.Unmarshal(data, &schema) == nil {
			_ = qmp.FeaturesFromSchema(schema)
		}
	})
}
