package qmp

import (
	"context"
	"log/slog"
	"regexp"
)

// Values of these keys never reach the log: TLS secrets, passwords, keys.
var secretRe = regexp.MustCompile(`("(?:password|secret|data|key|passwordid|keyid|iv|psk|token)"\s*:\s*)"(?:[^"\\]|\\.)*"`)

// redact hides secret values in a wire line.
func redact(line []byte) string {
	return secretRe.ReplaceAllString(string(line), `$1"<redacted>"`)
}

func (c *Client) logWire(dir string, line []byte) {
	if !c.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	c.log.Debug("qmp wire", "dir", dir, "msg", redact(line))
}
