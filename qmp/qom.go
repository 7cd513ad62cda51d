package qmp

import "context"

// ObjectPropertyInfo is one entry of qom-list: a property (or child) of a
// QOM object.
type ObjectPropertyInfo struct {
	Name string `json:"name"`
	Type string `json:"type"` // "child<secret>", "string", "link<...>", ...
}

// QomList runs qom-list: the properties and children of the object at path
// ("/objects" lists the objects created with -object or object-add).
func (c *Client) QomList(ctx context.Context, path string) ([]ObjectPropertyInfo, error) {
	var out []ObjectPropertyInfo
	err := c.Execute(ctx, "qom-list", map[string]string{"path": path}, &out)
	return out, err
}

// QomGet runs qom-get of property on the object at path and decodes the
// value into result.
func (c *Client) QomGet(ctx context.Context, path, property string, result any) error {
	return c.Execute(ctx, "qom-get", map[string]string{"path": path, "property": property}, result)
}
