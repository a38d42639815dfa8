package testenv

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// readmeFilter finds the access log filter in README.md: the log directive of the
// caddyfile block after the access-log-filter marker.
var readmeFilter = regexp.MustCompile("(?s)<!-- access-log-filter[^>]*-->\n```caddyfile\n.*?\n(\tlog \\{\n.*?\n\t\\})\n.*?```")

// readmeAccessLog is the file the README's filter writes to.
const readmeAccessLog = "/var/log/caddy/mcp-access.log"

// AccessLogFilter is the access log filter the README at readme ships, indented for a
// site block, writing to file instead. The tests of the filter take it from the README,
// so that what admins copy is what is tested.
func AccessLogFilter(tb testing.TB, readme, file string) string {
	tb.Helper()
	text, err := os.ReadFile(readme)
	if err != nil {
		tb.Fatal(err)
	}
	m := readmeFilter.FindSubmatch(text)
	if m == nil {
		tb.Fatalf("no access log filter in %s", readme)
	}
	filter := strings.Replace(string(m[1]), readmeAccessLog, file, 1)
	if !strings.Contains(filter, file) {
		tb.Fatalf("the filter in %s writes to no %s to replace", readme, readmeAccessLog)
	}
	return filter
}
