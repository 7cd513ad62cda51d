package qemutest

import (
	"encoding/json"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// Run state and identity: query-status, stop, cont, qom-get and qom-list
// (objects here, the machine's QOM tree in machine.go), the UUID, the RAM
// size, and a query-qmp-schema that qmp.FeaturesFromSchema reads as the
// simulated version's.

func (q *QEMU) installRunState() {
	p, isSrc := q.p, q.side == Source
	q.handle("query-status", func(json.RawMessage) (any, error) {
		st := map[string]any{"running": q.run == "running", "status": q.run}
		if v := q.p.version(q.side); v[0] < 9 {
			st["singlestep"] = false // 7.2 has it, 10.0 no more
		}
		return st, nil
	})
	q.handle("query-qmp-schema", func(json.RawMessage) (any, error) { return q.schema(), nil })
	q.handle("query-memory-size-summary", func(json.RawMessage) (any, error) {
		ram := p.opt.RAM
		if !isSrc {
			ram = p.opt.DstRAM
		}
		return map[string]any{"base-memory": ram}, nil
	})
	q.handle("qom-get", func(args json.RawMessage) (any, error) {
		var a struct{ Path, Property string }
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		if id, ok := strings.CutPrefix(a.Path, "/objects/"); ok {
			o, found := q.objects[id]
			if !found {
				return nil, &qmp.Error{Class: "DeviceNotFound", Desc: "Device '" + a.Path + "' not found"}
			}
			v, has := o[a.Property]
			if !has {
				return nil, errGeneric("Property '" + a.Property + "' not found")
			}
			return v, nil
		}
		return q.qomGet(a.Path, a.Property)
	})
	q.handle("qom-list", func(args json.RawMessage) (any, error) {
		var a struct{ Path string }
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		if a.Path != "/objects" {
			return q.qomList(a.Path)
		}
		out := []map[string]string{{"name": "type", "type": "string"}}
		for id, o := range q.objects {
			t, _ := o["qom-type"].(string)
			out = append(out, map[string]string{"name": id, "type": "child<" + t + ">"})
		}
		return out, nil
	})
	q.handle("query-uuid", func(json.RawMessage) (any, error) {
		u := p.opt.SrcUUID
		if !isSrc {
			u = p.opt.DstUUID
		}
		if u == "" {
			u = "00000000-0000-0000-0000-000000000000"
		}
		return map[string]any{"UUID": u}, nil
	})
	q.handle("stop", q.stop)
	q.handle("cont", q.cont)
}

func (q *QEMU) stop(json.RawMessage) (any, error) {
	p := q.p
	q.stops++
	if q.run == "inmigrate" {
		p.mig.dstHeld = true // QEMU's qmp_stop: autostart off
	}
	if q.run == "running" {
		q.run = "paused"
		q.Emit("STOP", nil)
		if q.side == Source && p.ram.stopAt.IsZero() && p.active() {
			p.ram.stopAt = time.Now()
		}
	}
	return nil, nil
}

func (q *QEMU) cont(json.RawMessage) (any, error) {
	switch q.run {
	case "inmigrate":
		return nil, errGeneric("Guest is waiting for an incoming migration")
	case "running":
		return nil, nil
	case "finish-migrate":
		return nil, errGeneric("Migration is not finalized yet")
	}
	if q.side == Destination && q.p.mig.dstStatus != qmp.StatusCompleted {
		return nil, errGeneric("migration not completed")
	}
	q.run = "running"
	q.Emit("RESUME", nil)
	return nil, nil
}

// schema builds a minimal query-qmp-schema of q for qmp.FeaturesFromSchema:
// the commands q answers, migrate's and migrate-incoming's arguments, the
// capabilities, parameters and migration statuses, the events.
func (q *QEMU) schema() []map[string]any {
	v := q.p.version(q.side)
	caps := append([]string{}, capNames()...)
	statuses := []string{"none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
		"postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug"}
	members := func(names ...string) []map[string]any {
		var out []map[string]any
		for _, n := range names {
			out = append(out, map[string]any{"name": n, "type": "str"})
		}
		return out
	}
	var migrateArgs, incomingArgs []string
	for _, m := range migrateMembers(v) {
		migrateArgs = append(migrateArgs, strings.TrimPrefix(m, "*"))
	}
	for _, m := range incomingMembers(v) {
		incomingArgs = append(incomingArgs, strings.TrimPrefix(m, "*"))
	}
	var params []string
	for k := range q.p.Src.params {
		params = append(params, k)
	}
	cmds := []string{"query-status", "query-migrate", "migrate-set-capabilities", "migrate-set-parameters",
		"query-migrate-capabilities", "query-migrate-parameters", "migrate", "migrate-incoming", "migrate_cancel",
		"migrate-continue", "migrate-start-postcopy", "migrate-pause", "migrate-recover", "stop", "cont", "query-uuid", "qom-get", "qom-list", "query-memory-size-summary",
		"object-add", "object-del"}
	cmds = append(cmds, q.blockCommands()...)
	cmds = append(cmds, machineCommands()...)
	if q.block == nil {
		cmds = append(cmds, "query-block")
	}
	out := []map[string]any{
		{"name": "migrate-set-capabilities", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
		{"name": "0", "meta-type": "object", "members": []map[string]any{{"name": "capabilities", "type": "[2]"}}},
		{"name": "[2]", "meta-type": "array", "element-type": "2"},
		{"name": "2", "meta-type": "object", "members": []map[string]any{{"name": "capability", "type": "3"}, {"name": "state", "type": "bool"}}},
		{"name": "3", "meta-type": "enum", "values": caps},
		{"name": "migrate-set-parameters", "meta-type": "command", "arg-type": "4", "ret-type": "1"},
		{"name": "4", "meta-type": "object", "members": members(params...)},
		{"name": "query-migrate", "meta-type": "command", "arg-type": "1", "ret-type": "5"},
		{"name": "5", "meta-type": "object", "members": []map[string]any{{"name": "status", "type": "6"}}},
		{"name": "6", "meta-type": "enum", "values": statuses},
		{"name": "migrate", "meta-type": "command", "arg-type": "7", "ret-type": "1"},
		{"name": "7", "meta-type": "object", "members": members(migrateArgs...)},
		{"name": "migrate-incoming", "meta-type": "command", "arg-type": "8", "ret-type": "1"},
		{"name": "8", "meta-type": "object", "members": members(incomingArgs...)},
		{"name": "1", "meta-type": "object", "members": []map[string]any{}},
	}
	for _, c := range cmds {
		switch c {
		case "migrate-set-capabilities", "migrate-set-parameters", "query-migrate", "migrate", "migrate-incoming":
			continue
		}
		out = append(out, map[string]any{"name": c, "meta-type": "command", "arg-type": "1", "ret-type": "1"})
	}
	for _, e := range []string{"MIGRATION", "MIGRATION_PASS", "STOP", "RESUME"} {
		out = append(out, map[string]any{"name": e, "meta-type": "event", "arg-type": "1"})
	}
	return out
}

// hasChannels: migrate and migrate-incoming take "channels" from 8.2.
func hasChannels(v [3]int) bool {
	return v[0] > 8 || (v[0] == 8 && v[1] >= 2)
}

// hasExitOnError: migrate-incoming takes "exit-on-error" from 9.1.
func hasExitOnError(v [3]int) bool {
	return v[0] > 9 || (v[0] == 9 && v[1] >= 1)
}
