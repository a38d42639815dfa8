package redisstorage

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// referenceDoc is the module's reference, which TestRedisReference holds to the code.
const referenceDoc = "../docs/redis.md"

// TestRedisReference fails when docs/redis.md lacks a JSON field of Storage or a
// subdirective UnmarshalCaddyfile accepts, names one the code does not have, or shows a
// syntax block other than UnmarshalCaddyfile's doc comment.
func TestRedisReference(t *testing.T) {
	raw, err := os.ReadFile(referenceDoc)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)

	var fields []string
	for f := range reflect.TypeFor[Storage]().Fields() {
		if name, _, _ := strings.Cut(f.Tag.Get("json"), ","); f.IsExported() && name != "" {
			fields = append(fields, name)
		}
	}
	file, err := parser.ParseFile(token.NewFileSet(), "caddyfile.go", nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	var subdirectives []string
	var syntax string
	for _, decl := range file.Decls {
		fn, ok := decl.(*ast.FuncDecl)
		if !ok || fn.Name.Name != "UnmarshalCaddyfile" {
			continue
		}
		_, after, _ := strings.Cut(fn.Doc.Text(), "Syntax:\n\n")
		for line := range strings.Lines(after) {
			code, ok := strings.CutPrefix(line, "\t")
			if !ok {
				break
			}
			syntax += code
		}
		ast.Inspect(fn.Body, func(n ast.Node) bool {
			if c, ok := n.(*ast.CaseClause); ok {
				for _, e := range c.List {
					if lit, ok := e.(*ast.BasicLit); ok && lit.Kind == token.STRING {
						s, _ := strconv.Unquote(lit.Value)
						subdirectives = append(subdirectives, s)
					}
				}
			}
			return true
		})
	}
	if syntax == "" || len(subdirectives) == 0 {
		t.Fatal("caddyfile.go: UnmarshalCaddyfile has no Syntax block or no subdirectives")
	}

	same(t, "JSON section's fields", column(t, doc, "`caddy.storage.mcp_oauth_redis` object", 0), fields)
	same(t, "JSON section's Caddyfile column", column(t, doc, "`caddy.storage.mcp_oauth_redis` object", 3), subdirectives)
	same(t, "Caddyfile section's subdirectives", column(t, doc, "`mcp_oauth_redis` block", 0), subdirectives)
	same(t, "Caddyfile section's JSON fields", column(t, doc, "`mcp_oauth_redis` block", 1), fields)
	if !strings.Contains(doc, "```caddyfile-fragment\n"+syntax+"```") {
		t.Errorf("%s: no caddyfile-fragment block is UnmarshalCaddyfile's syntax block:\n%s", referenceDoc, syntax)
	}
}

// same reports names one list has and the other lacks.
func same(t *testing.T, what string, inDoc, inCode []string) {
	t.Helper()
	for _, n := range inCode {
		if !slices.Contains(inDoc, n) {
			t.Errorf("%s, %s: %q is missing", referenceDoc, what, n)
		}
	}
	for _, n := range inDoc {
		if !slices.Contains(inCode, n) {
			t.Errorf("%s, %s: names %q, which the code does not have", referenceDoc, what, n)
		}
	}
}

// column lists the first backticked name in column i of the table under the ### heading.
func column(t *testing.T, doc, heading string, i int) []string {
	t.Helper()
	_, section, ok := strings.Cut(doc, "\n### "+heading+"\n")
	if !ok {
		t.Fatalf("%s has no section ### %s", referenceDoc, heading)
	}
	section, _, _ = strings.Cut(section, "\n#")
	var names []string
	for line := range strings.Lines(section) {
		if !strings.HasPrefix(line, "|") || strings.HasPrefix(line, "|---") {
			continue
		}
		cells := strings.Split(strings.Trim(strings.TrimSpace(line), "|"), "|")
		if i >= len(cells) {
			continue
		}
		parts := strings.Split(cells[i], "`")
		if len(parts) >= 3 && !slices.Contains(names, parts[1]) {
			names = append(names, parts[1])
		}
	}
	if len(names) == 0 {
		t.Errorf("%s, section %s: no table of names", referenceDoc, heading)
	}
	return names
}
