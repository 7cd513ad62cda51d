package qmp

import (
	"context"
	"encoding/json"
)

// BlockInfo is one entry of query-block (a drive attached to a device).
type BlockInfo struct {
	Device    string           `json:"device"`
	QDev      string           `json:"qdev"`
	Type      string           `json:"type"`
	Removable bool             `json:"removable"`
	Locked    bool             `json:"locked"`
	Inserted  *BlockDeviceInfo `json:"inserted"`
}

// BlockDeviceInfo is the medium of a drive, or a node of query-named-block-nodes.
type BlockDeviceInfo struct {
	File             string          `json:"file"`
	NodeName         string          `json:"node-name"`
	ReadOnly         bool            `json:"ro"`
	Driver           string          `json:"drv"`
	BackingFile      string          `json:"backing_file"`
	BackingFileDepth int             `json:"backing_file_depth"`
	Encrypted        bool            `json:"encrypted"`
	Image            *ImageInfo      `json:"image"`
	Cache            json.RawMessage `json:"cache"`
}

// ImageInfo is the image description of a node.
type ImageInfo struct {
	Filename        string     `json:"filename"`
	Format          string     `json:"format"`
	VirtualSize     uint64     `json:"virtual-size"`
	ActualSize      uint64     `json:"actual-size"`
	BackingFilename string     `json:"backing-filename"`
	BackingImage    *ImageInfo `json:"backing-image"`
}

// QueryBlock runs query-block.
func (c *Client) QueryBlock(ctx context.Context) ([]BlockInfo, error) {
	var out []BlockInfo
	return out, c.Execute(ctx, "query-block", nil, &out)
}

// QueryNamedBlockNodes runs query-named-block-nodes (flat: false unless asked).
func (c *Client) QueryNamedBlockNodes(ctx context.Context) ([]BlockDeviceInfo, error) {
	var out []BlockDeviceInfo
	return out, c.Execute(ctx, "query-named-block-nodes", nil, &out)
}

// BlockdevAdd runs blockdev-add with options (BlockdevOptions: driver,
// node-name and the driver's members), usually a map.
func (c *Client) BlockdevAdd(ctx context.Context, options any) error {
	return c.Execute(ctx, "blockdev-add", options, nil)
}

// BlockdevDel runs blockdev-del.
func (c *Client) BlockdevDel(ctx context.Context, nodeName string) error {
	return c.Execute(ctx, "blockdev-del", map[string]any{"node-name": nodeName}, nil)
}

// BlockdevCreate starts the blockdev-create job jobID with options
// (BlockdevCreateOptions). The job must be waited for and dismissed.
func (c *Client) BlockdevCreate(ctx context.Context, jobID string, options any) error {
	return c.Execute(ctx, "blockdev-create", map[string]any{"job-id": jobID, "options": options}, nil)
}

// BlockdevMirrorArgs are the arguments of blockdev-mirror.
type BlockdevMirrorArgs struct {
	JobID          string `json:"job-id,omitempty"`
	Device         string `json:"device"`
	Target         string `json:"target"`
	Replaces       string `json:"replaces,omitempty"`
	Sync           string `json:"sync"` // full, top, none
	Speed          uint64 `json:"speed,omitempty"`
	Granularity    uint32 `json:"granularity,omitempty"`
	BufSize        uint64 `json:"buf-size,omitempty"`
	OnSourceError  string `json:"on-source-error,omitempty"`
	OnTargetError  string `json:"on-target-error,omitempty"`
	FilterNodeName string `json:"filter-node-name,omitempty"`
	CopyMode       string `json:"copy-mode,omitempty"` // background, write-blocking
	AutoFinalize   *bool  `json:"auto-finalize,omitempty"`
	AutoDismiss    *bool  `json:"auto-dismiss,omitempty"`
	TargetIsZero   *bool  `json:"target-is-zero,omitempty"` // 10.1+
}

// BlockdevMirror runs blockdev-mirror.
func (c *Client) BlockdevMirror(ctx context.Context, args BlockdevMirrorArgs) error {
	return c.Execute(ctx, "blockdev-mirror", args, nil)
}

// BlockJobCancel runs block-job-cancel. With force false on a READY mirror it
// is the soft cancel that finishes the last sync and leaves a point-in-time copy
// (event BLOCK_JOB_COMPLETED).
func (c *Client) BlockJobCancel(ctx context.Context, device string, force bool) error {
	args := map[string]any{"device": device}
	if force {
		args["force"] = true
	}
	return c.Execute(ctx, "block-job-cancel", args, nil)
}

// BlockJobComplete runs block-job-complete (pivot to the target).
func (c *Client) BlockJobComplete(ctx context.Context, device string) error {
	return c.Execute(ctx, "block-job-complete", map[string]any{"device": device}, nil)
}

// BlockJobChange runs block-job-change for a mirror (8.2+): copyMode
// "write-blocking" makes guest writes synchronous to the target.
func (c *Client) BlockJobChange(ctx context.Context, id, copyMode string) error {
	return c.Execute(ctx, "block-job-change", map[string]any{"id": id, "type": "mirror", "copy-mode": copyMode}, nil)
}

// BlockJobSetSpeed runs block-job-set-speed (bytes per second, 0 = unlimited).
func (c *Client) BlockJobSetSpeed(ctx context.Context, device string, speed uint64) error {
	return c.Execute(ctx, "block-job-set-speed", map[string]any{"device": device, "speed": speed}, nil)
}

// BlockJobInfo is one entry of query-block-jobs.
type BlockJobInfo struct {
	Type         string `json:"type"`
	Device       string `json:"device"` // the job id
	Len          uint64 `json:"len"`
	Offset       uint64 `json:"offset"`
	Busy         bool   `json:"busy"`
	Paused       bool   `json:"paused"`
	Speed        uint64 `json:"speed"`
	IOStatus     string `json:"io-status"`
	Ready        bool   `json:"ready"`
	Status       string `json:"status"` // JobStatus
	AutoFinalize bool   `json:"auto-finalize"`
	AutoDismiss  bool   `json:"auto-dismiss"`
	Error        string `json:"error"`
}

// QueryBlockJobs runs query-block-jobs.
func (c *Client) QueryBlockJobs(ctx context.Context) ([]BlockJobInfo, error) {
	var out []BlockJobInfo
	return out, c.Execute(ctx, "query-block-jobs", nil, &out)
}

// JobInfo is one entry of query-jobs.
type JobInfo struct {
	ID              string `json:"id"`
	Type            string `json:"type"`
	Status          string `json:"status"`
	CurrentProgress uint64 `json:"current-progress"`
	TotalProgress   uint64 `json:"total-progress"`
	Error           string `json:"error"`
}

// QueryJobs runs query-jobs.
func (c *Client) QueryJobs(ctx context.Context) ([]JobInfo, error) {
	var out []JobInfo
	return out, c.Execute(ctx, "query-jobs", nil, &out)
}

// JobDismiss runs job-dismiss for a concluded job.
func (c *Client) JobDismiss(ctx context.Context, id string) error {
	return c.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil)
}

// JobCancel runs job-cancel (always a force cancel).
func (c *Client) JobCancel(ctx context.Context, id string) error {
	return c.Execute(ctx, "job-cancel", map[string]any{"id": id}, nil)
}

// NBDServerStart runs nbd-server-start, listening on addr (sent in the
// legacy SocketAddress form that command takes).
func (c *Client) NBDServerStart(ctx context.Context, addr Address, tlsCreds string) error {
	args := map[string]any{"addr": addr.legacy()}
	if tlsCreds != "" {
		args["tls-creds"] = tlsCreds
	}
	return c.Execute(ctx, "nbd-server-start", args, nil)
}

// NBDServerStop runs nbd-server-stop.
func (c *Client) NBDServerStop(ctx context.Context) error {
	return c.Execute(ctx, "nbd-server-stop", nil, nil)
}

// BlockExportAddArgs are the arguments of block-export-add for an NBD export.
type BlockExportAddArgs struct {
	Type            string `json:"type"` // "nbd"
	ID              string `json:"id"`
	NodeName        string `json:"node-name"`
	Writable        bool   `json:"writable,omitempty"`
	Name            string `json:"name,omitempty"` // NBD export name (default: node name)
	Description     string `json:"description,omitempty"`
	AllocationDepth bool   `json:"allocation-depth,omitempty"`
}

// BlockExportAdd runs block-export-add.
func (c *Client) BlockExportAdd(ctx context.Context, args BlockExportAddArgs) error {
	if args.Type == "" {
		args.Type = "nbd"
	}
	return c.Execute(ctx, "block-export-add", args, nil)
}

// BlockExportDel runs block-export-del; mode "" (safe) or "hard".
func (c *Client) BlockExportDel(ctx context.Context, id, mode string) error {
	args := map[string]any{"id": id}
	if mode != "" {
		args["mode"] = mode
	}
	return c.Execute(ctx, "block-export-del", args, nil)
}

// BlockExportInfo is one entry of query-block-exports.
type BlockExportInfo struct {
	ID           string `json:"id"`
	Type         string `json:"type"`
	NodeName     string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

// QueryBlockExports runs query-block-exports.
func (c *Client) QueryBlockExports(ctx context.Context) ([]BlockExportInfo, error) {
	var out []BlockExportInfo
	return out, c.Execute(ctx, "query-block-exports", nil, &out)
}
