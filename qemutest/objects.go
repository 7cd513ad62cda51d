package qemutest

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Objects: object-add and object-del keep the arguments by id (TLS
// credentials are objects; Options.RefuseObject refuses them on one side as
// QEMU does when their files are missing), and tlsMismatch decides whether
// the migration's TLS handshake can work.

func (q *QEMU) installObjects() {
	q.handle("object-add", func(args json.RawMessage) (any, error) {
		var a map[string]any
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		id, _ := a["id"].(string)
		if _, dup := q.objects[id]; dup {
			return nil, errGeneric(fmt.Sprintf("attempt to add duplicate property '%s' to object (type 'container')", id))
		}
		if t, _ := a["qom-type"].(string); q.p.opt.RefuseObject != "" && q.p.opt.RefuseObjectSide == q.side && strings.HasPrefix(t, "tls-creds") {
			return nil, errGeneric(q.p.opt.RefuseObject)
		}
		q.objects[id] = a
		return nil, nil
	})
	q.handle("object-del", func(args json.RawMessage) (any, error) {
		var a struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		if _, ok := q.objects[a.ID]; !ok {
			return nil, errGeneric(fmt.Sprintf("object '%s' not found", a.ID))
		}
		delete(q.objects, a.ID)
		return nil, nil
	})
}

// tlsMismatch is the error-desc of a TLS handshake that cannot work: a
// side whose tls-creds names no object of its own with the right endpoint,
// or one side with TLS and the other without ("" when they match).
func (p *Pair) tlsMismatch() string {
	var creds [2]string
	for i, q := range []*QEMU{p.Src, p.Dst} {
		end := "client"
		if q.side == Destination {
			end = "server"
		}
		creds[i], _ = q.params["tls-creds"].(string)
		if creds[i] == "" {
			continue
		}
		o, ok := q.objects[creds[i]]
		if !ok {
			return fmt.Sprintf("No TLS credentials with id '%s'", creds[i])
		}
		if o["endpoint"] != end {
			return fmt.Sprintf("Expecting TLS credentials with a %s endpoint", end)
		}
	}
	if (creds[0] == "") != (creds[1] == "") {
		return "Unable to read from socket: Connection reset by peer"
	}
	return ""
}
