package qmp

import (
	"context"
	"encoding/json"
	"sort"
	"strings"
)

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// StatusInfo is the reply of query-status.
type StatusInfo struct {
	Running    bool   `json:"running"`
	Singlestep bool   `json:"singlestep"`
	Status     string `json:"status"` // RunState: running, paused, inmigrate, postmigrate, prelaunch, finish-migrate, ...
}

// QueryStatus runs query-status.
func (c *Client) QueryStatus(ctx context.Context) (*StatusInfo, error) {
	var s StatusInfo
	if err := c.Execute(ctx, "query-status", nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Stop runs stop (pause the vCPUs).
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont runs cont (resume the vCPUs).
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// Quit runs quit. QEMU may close the connection before or after replying; both
// count as success.
func (c *Client) Quit(ctx context.Context) error {
	err := c.Execute(ctx, "quit", nil, nil)
	if err != nil && isClosed(err) {
		return nil
	}
	return err
}

// QueryUUID runs query-uuid: the QEMU's -uuid, lower case, or "" for a
// QEMU started without one (which answers the all-zero UUID).
func (c *Client) QueryUUID(ctx context.Context) (string, error) {
	var r struct {
		UUID string `json:"UUID"`
	}
	if err := c.Execute(ctx, "query-uuid", nil, &r); err != nil {
		return "", err
	}
	if r.UUID == "00000000-0000-0000-0000-000000000000" {
		return "", nil
	}
	return strings.ToLower(r.UUID), nil
}

// VersionInfo is the reply of query-version.
type VersionInfo struct {
	QEMU    Version `json:"qemu"`
	Package string  `json:"package"`
}

// QueryVersion runs query-version.
func (c *Client) QueryVersion(ctx context.Context) (*VersionInfo, error) {
	var v VersionInfo
	if err := c.Execute(ctx, "query-version", nil, &v); err != nil {
		return nil, err
	}
	v.QEMU.Package = v.Package
	return &v, nil
}

// SchemaInfo is one entry of query-qmp-schema. Only the members qmigrate reads
// are decoded; the rest stay in Raw.
type SchemaInfo struct {
	Name        string          `json:"name"`
	MetaType    string          `json:"meta-type"`
	ArgType     string          `json:"arg-type,omitempty"`
	RetType     string          `json:"ret-type,omitempty"`
	AllowOOB    bool            `json:"allow-oob,omitempty"`
	Values      []string        `json:"values,omitempty"` // enum (old form)
	Members     []SchemaMember  `json:"members,omitempty"`
	Variants    []SchemaVariant `json:"variants,omitempty"`
	Tag         string          `json:"tag,omitempty"`
	ElementType string          `json:"element-type,omitempty"` // array
	JSONTypes   []string        `json:"json-types,omitempty"`   // builtin
	Features    []string        `json:"features,omitempty"`
}

// SchemaMember is an object member or (name-only) an enum member.
type SchemaMember struct {
	Name     string          `json:"name"`
	Type     string          `json:"type,omitempty"`
	Default  json.RawMessage `json:"default,omitempty"`
	Features []string        `json:"features,omitempty"`
}

// SchemaVariant is one variant of a union.
type SchemaVariant struct {
	Case string `json:"case"`
	Type string `json:"type"`
}

// QueryQMPSchema runs query-qmp-schema.
func (c *Client) QueryQMPSchema(ctx context.Context) ([]SchemaInfo, error) {
	var s []SchemaInfo
	if err := c.Execute(ctx, "query-qmp-schema", nil, &s); err != nil {
		return nil, err
	}
	return s, nil
}

// Getfd passes fd to QEMU under fdname (getfd). The caller still owns fd and
// should close its copy.
func (c *Client) Getfd(ctx context.Context, fdname string, fd int) error {
	return c.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": fdname}, nil, fd)
}

// Closefd closes a file descriptor QEMU holds under fdname.
func (c *Client) Closefd(ctx context.Context, fdname string) error {
	return c.Execute(ctx, "closefd", map[string]any{"fdname": fdname}, nil)
}

// AddFdInfo is the reply of add-fd.
type AddFdInfo struct {
	FdsetID int `json:"fdset-id"`
	Fd      int `json:"fd"`
}

// AddFd passes fd into an fd set (add-fd); fdsetID < 0 lets QEMU choose.
func (c *Client) AddFd(ctx context.Context, fd, fdsetID int, opaque string) (*AddFdInfo, error) {
	args := map[string]any{}
	if fdsetID >= 0 {
		args["fdset-id"] = fdsetID
	}
	if opaque != "" {
		args["opaque"] = opaque
	}
	var info AddFdInfo
	if err := c.ExecuteWithFile(ctx, "add-fd", args, &info, fd); err != nil {
		return nil, err
	}
	return &info, nil
}

// RemoveFd removes an fd set (fd < 0) or one fd of it (remove-fd).
func (c *Client) RemoveFd(ctx context.Context, fdsetID, fd int) error {
	args := map[string]any{"fdset-id": fdsetID}
	if fd >= 0 {
		args["fd"] = fd
	}
	return c.Execute(ctx, "remove-fd", args, nil)
}

// ObjectAdd runs object-add with qom-type, id and the type's properties.
func (c *Client) ObjectAdd(ctx context.Context, qomType, id string, props map[string]any) error {
	args := map[string]any{"qom-type": qomType, "id": id}
	for k, v := range props {
		args[k] = v
	}
	return c.Execute(ctx, "object-add", args, nil)
}

// ObjectDel runs object-del.
func (c *Client) ObjectDel(ctx context.Context, id string) error {
	return c.Execute(ctx, "object-del", map[string]any{"id": id}, nil)
}

// HumanMonitorCommand runs an HMP command line through QMP (for pmemsave-like
// diagnostics the typed layer does not cover).
func (c *Client) HumanMonitorCommand(ctx context.Context, line string) (string, error) {
	var out string
	err := c.Execute(ctx, "human-monitor-command", map[string]any{"command-line": line}, &out)
	return out, err
}

// Pmemsave saves guest physical memory [addr, addr+size) to filename.
func (c *Client) Pmemsave(ctx context.Context, addr, size uint64, filename string) error {
	return c.Execute(ctx, "pmemsave", map[string]any{"val": addr, "size": size, "filename": filename}, nil)
}
