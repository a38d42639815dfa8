package caddyoauthbroker

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// referenceDoc is the configuration reference the tests below hold to the code.
const referenceDoc = "../docs/configuration.md"

// jsonSections maps each heading of the reference's JSON part to the type whose fields its
// table lists.
var jsonSections = map[string]reflect.Type{
	"`http.handlers.mcp_oauth` object":      reflect.TypeFor[Handler](),
	"`clients[]` object":                    reflect.TypeFor[Client](),
	"`delegation` object":                   reflect.TypeFor[Delegation](),
	"`tool_scopes[]` object":                reflect.TypeFor[ToolScope](),
	"`offline_access` object":               reflect.TypeFor[OfflineAccess](),
	"`background_clients[]` object":         reflect.TypeFor[BackgroundClient](),
	"`enterprise_managed` object":           reflect.TypeFor[EnterpriseManaged](),
	"`enterprise_managed.issuers[]` object": reflect.TypeFor[EnterpriseIssuer](),
}

// caddyfileSections maps each heading of the reference's Caddyfile part to the function
// of caddyfile.go that parses that block, and the type its JSON field column names.
var caddyfileSections = map[string]struct {
	parser string
	typ    reflect.Type
}{
	"`mcp_oauth` block":                   {"UnmarshalCaddyfile", reflect.TypeFor[Handler]()},
	"`client` block":                      {"unmarshalClient", reflect.TypeFor[Client]()},
	"`delegation` block":                  {"unmarshalDelegation", reflect.TypeFor[Delegation]()},
	"`offline_access` block":              {"unmarshalOfflineAccess", reflect.TypeFor[OfflineAccess]()},
	"`enterprise_managed` block":          {"unmarshalEnterpriseManaged", reflect.TypeFor[EnterpriseManaged]()},
	"`enterprise_managed` `issuer` block": {"unmarshalEnterpriseIssuer", reflect.TypeFor[EnterpriseIssuer]()},
}

// TestConfigurationReference fails when docs/configuration.md lacks a JSON field of the
// handler or of its nested types, or a subdirective the Caddyfile parser accepts, or names
// one the code no longer has.
func TestConfigurationReference(t *testing.T) {
	doc := readReference(t)

	// Every nested configuration type of the handler has its section.
	documented := make(map[reflect.Type]bool)
	for _, typ := range jsonSections {
		documented[typ] = true
	}
	for f := range reflect.TypeFor[Handler]().Fields() {
		typ := f.Type
		for typ.Kind() == reflect.Pointer || typ.Kind() == reflect.Slice {
			typ = typ.Elem()
		}
		if f.IsExported() && typ.Kind() == reflect.Struct && typ.PkgPath() == reflect.TypeFor[Handler]().PkgPath() && !documented[typ] {
			t.Errorf("%s: field %s is of type %s, which has no section in jsonSections (and so none in %s)", referenceDoc, f.Name, typ.Name(), referenceDoc)
		}
	}

	for heading, typ := range jsonSections {
		compareNames(t, "JSON section "+heading, doc.firstColumn(t, heading), jsonFields(typ))
	}
	storage, ok := reflect.TypeFor[Handler]().FieldByName("StorageRaw")
	if !ok {
		t.Fatal("Handler has no StorageRaw field")
	}
	compareNames(t, "JSON section `storage` object", doc.firstColumn(t, "`storage` object"), []string{caddyTag(storage, "inline_key")})

	accepted := caddyfileSubdirectives(t)
	var anySubdirective []string
	for _, names := range accepted {
		anySubdirective = append(anySubdirective, names...)
	}
	for heading := range jsonSections {
		for _, span := range doc.column(t, heading, 3) {
			if first, _, _ := strings.Cut(span, " "); !slices.Contains(anySubdirective, first) {
				t.Errorf("%s, section %s: Caddyfile column names %q, which the Caddyfile parser does not accept", referenceDoc, heading, span)
			}
		}
	}
	for heading, s := range caddyfileSections {
		names, ok := accepted[s.parser]
		if !ok {
			t.Errorf("caddyfile.go has no function %s (section %s)", s.parser, heading)
			continue
		}
		compareNames(t, "Caddyfile section "+heading, doc.firstColumn(t, heading), names)
		fields := jsonFields(s.typ)
		for _, name := range doc.column(t, heading, 1) {
			if !slices.Contains(fields, name) {
				t.Errorf("%s, section %s: JSON field column names %q, which %s does not have", referenceDoc, heading, name, s.typ.Name())
			}
		}
	}
	parsers := make(map[string]bool)
	for _, s := range caddyfileSections {
		parsers[s.parser] = true
	}
	for fn := range accepted {
		if !parsers[fn] {
			t.Errorf("caddyfile.go's %s parses subdirectives of a block that has no section in caddyfileSections (and so none in %s)", fn, referenceDoc)
		}
	}
}

// compareNames reports the names the code has and the doc lacks, and the other way round.
func compareNames(t *testing.T, where string, inDoc, inCode []string) {
	t.Helper()
	for _, n := range inCode {
		if !slices.Contains(inDoc, n) {
			t.Errorf("%s, %s: %q is missing", referenceDoc, where, n)
		}
	}
	for _, n := range inDoc {
		if !slices.Contains(inCode, n) {
			t.Errorf("%s, %s: names %q, which the code no longer has", referenceDoc, where, n)
		}
	}
}

// jsonFields lists the JSON names of typ's exported fields.
func jsonFields(typ reflect.Type) []string {
	var names []string
	for f := range typ.Fields() {
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name != "-" && name != "" {
			names = append(names, name)
		}
	}
	return names
}

// caddyTag reads key from a field's `caddy:"…"` struct tag.
func caddyTag(f reflect.StructField, key string) string {
	for kv := range strings.FieldsSeq(f.Tag.Get("caddy")) {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// TestConfigurationReferenceSyntaxBlock: the reference's syntax block is the one in
// UnmarshalCaddyfile's doc comment, which Caddy's generated documentation shows.
func TestConfigurationReferenceSyntaxBlock(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "caddyfile.go", nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	var comment string
	for _, decl := range f.Decls {
		if fn, ok := decl.(*ast.FuncDecl); ok && fn.Name.Name == "UnmarshalCaddyfile" && fn.Doc != nil {
			comment = fn.Doc.Text()
		}
	}
	_, after, ok := strings.Cut(comment, "Syntax:\n\n")
	if !ok {
		t.Fatal("UnmarshalCaddyfile's doc comment has no \"Syntax:\" block")
	}
	var want strings.Builder
	for line := range strings.Lines(after) {
		code, ok := strings.CutPrefix(line, "\t")
		if !ok {
			break
		}
		want.WriteString(code)
	}
	for _, b := range fencedBlocks(t, referenceDoc, "caddyfile-fragment") {
		if strings.HasPrefix(b.text, "mcp_oauth ") {
			if b.text != want.String() {
				t.Errorf("%s:%d: the syntax block differs from UnmarshalCaddyfile's doc comment, which is:\n%s", referenceDoc, b.line, want.String())
			}
			return
		}
	}
	t.Errorf("%s has no caddyfile-fragment block starting with mcp_oauth", referenceDoc)
}

// caddyfileSubdirectives reads caddyfile.go and returns, per function, the string labels
// of its `switch d.Val()` cases: the subdirectives that function accepts.
func caddyfileSubdirectives(t *testing.T) map[string][]string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "caddyfile.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string][]string)
	for _, decl := range f.Decls {
		fn, ok := decl.(*ast.FuncDecl)
		if !ok || fn.Body == nil {
			continue
		}
		ast.Inspect(fn.Body, func(n ast.Node) bool {
			sw, ok := n.(*ast.SwitchStmt)
			if !ok || !isValCall(sw.Tag) {
				return true
			}
			for _, stmt := range sw.Body.List {
				for _, e := range stmt.(*ast.CaseClause).List {
					lit, ok := e.(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						continue
					}
					s, err := strconv.Unquote(lit.Value)
					if err != nil {
						t.Fatal(err)
					}
					if !slices.Contains(out[fn.Name.Name], s) {
						out[fn.Name.Name] = append(out[fn.Name.Name], s)
					}
				}
			}
			return true
		})
	}
	if len(out) == 0 {
		t.Fatal("found no `switch d.Val()` in caddyfile.go")
	}
	return out
}

// isValCall reports whether e is `d.Val()`.
func isValCall(e ast.Expr) bool {
	call, ok := e.(*ast.CallExpr)
	if !ok || len(call.Args) != 0 {
		return false
	}
	sel, ok := call.Fun.(*ast.SelectorExpr)
	return ok && sel.Sel.Name == "Val"
}

// reference is docs/configuration.md split into its `###` sections.
type reference map[string][]string

func readReference(t *testing.T) reference {
	t.Helper()
	raw, err := os.ReadFile(referenceDoc)
	if err != nil {
		t.Fatal(err)
	}
	doc := make(reference)
	var heading string
	for line := range strings.Lines(string(raw)) {
		line = strings.TrimRight(line, "\n")
		if strings.HasPrefix(line, "#") {
			heading = ""
			if h, ok := strings.CutPrefix(line, "### "); ok {
				heading = h
			}
			continue
		}
		if heading != "" {
			doc[heading] = append(doc[heading], line)
		}
	}
	return doc
}

// firstColumn lists the names in the first column of the section's table.
func (doc reference) firstColumn(t *testing.T, heading string) []string {
	return doc.column(t, heading, 0)
}

// column lists the backticked names in column i of the section's table rows, skipping the
// header and rows whose cell holds no backticked name, like "(argument)".
func (doc reference) column(t *testing.T, heading string, i int) []string {
	t.Helper()
	lines, ok := doc[heading]
	if !ok {
		t.Errorf("%s has no section %q", referenceDoc, "### "+heading)
		return nil
	}
	var names []string
	header := true
	for _, line := range lines {
		if !strings.HasPrefix(line, "|") {
			continue
		}
		if header { // the header row, then the |---| row
			if strings.HasPrefix(line, "|---") {
				header = false
			}
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if i >= len(cells) {
			continue
		}
		for _, name := range backticked(cells[i]) {
			if !slices.Contains(names, name) {
				names = append(names, name)
			}
		}
	}
	if len(names) == 0 {
		t.Errorf("%s, section %q: no table of names", referenceDoc, heading)
	}
	return names
}

// backticked lists the `code` spans of a table cell.
func backticked(cell string) []string {
	var out []string
	parts := strings.Split(cell, "`")
	for i := 1; i < len(parts); i += 2 {
		out = append(out, parts[i])
	}
	return out
}

// TestDocsCaddyfileSnippetsAdapt adapts every ```caddyfile block of the README and docs/
// with Caddy's own adapter, naming the block's line when it fails. A block that is just
// the mcp_oauth directive is adapted inside a site; syntax summaries and other partial
// snippets are fenced as ```caddyfile-fragment and skipped.
func TestDocsCaddyfileSnippetsAdapt(t *testing.T) {
	docs, err := filepath.Glob("../docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	blocks := 0
	for _, file := range append([]string{"../README.md"}, docs...) {
		for _, b := range fencedBlocks(t, file, "caddyfile") {
			blocks++
			in := b.text
			if first := strings.Fields(in); len(first) > 0 && first[0] == "mcp_oauth" {
				in = "example.com {\n" + in + "}\n"
			}
			name := fmt.Sprintf("%s, the block at line %d", file, b.line)
			if _, _, err := adapter.Adapt([]byte(in), map[string]any{"filename": name}); err != nil {
				t.Errorf("%s:%d: the caddyfile block does not adapt: %v", file, b.line, err)
			}
		}
	}
	if blocks < 3 {
		t.Errorf("found only %d caddyfile blocks in README.md and docs/", blocks)
	}
}

// fencedBlock is one fenced block and the line its fence opens on.
type fencedBlock struct {
	line int
	text string
}

// fencedBlocks lists the blocks of file fenced as ```lang.
func fencedBlocks(t *testing.T, file, lang string) []fencedBlock {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var (
		blocks []fencedBlock
		cur    *fencedBlock
		fenced bool // inside any fence, so a ``` line closes rather than opens
	)
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		switch {
		case !fenced && strings.HasPrefix(trimmed, "```"):
			fenced = true
			if strings.TrimPrefix(trimmed, "```") == lang {
				cur = &fencedBlock{line: n}
			}
		case fenced && trimmed == "```":
			fenced = false
			if cur != nil {
				blocks = append(blocks, *cur)
				cur = nil
			}
		case cur != nil:
			cur.text += line + "\n"
		}
	}
	if fenced {
		t.Errorf("%s: a fence is never closed", file)
	}
	return blocks
}

// TestExamplesAdapt adapts the shipped example Caddyfiles without a warning (so they are
// formatted as `caddy fmt` would), and reads every mcp_oauth handler of the JSON example
// into Handler refusing unknown fields. scripts/test.sh also runs them through the caddy
// binary's adapt, fmt --diff and validate; e2e loads the JSON one into a running caddy.
func TestExamplesAdapt(t *testing.T) {
	files, err := filepath.Glob("../docs/examples/*.Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, "../Caddyfile.example")
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, f := range files {
		in, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		_, warnings, err := adapter.Adapt(in, map[string]any{"filename": f})
		if err != nil {
			t.Errorf("%s: %v", f, err)
		}
		if len(warnings) > 0 {
			t.Errorf("%s: warnings: %v", f, warnings)
		}
	}

	raw, err := os.ReadFile("../docs/examples/config.json")
	if err != nil {
		t.Fatal(err)
	}
	var cfg any
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("docs/examples/config.json: %v", err)
	}
	handlers := 0
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "mcp_oauth" {
				handlers++
				delete(v, "handler")
				obj, _ := json.Marshal(v)
				dec := json.NewDecoder(bytes.NewReader(obj))
				dec.DisallowUnknownFields()
				if err := dec.Decode(new(Handler)); err != nil {
					t.Errorf("docs/examples/config.json: the mcp_oauth handler: %v", err)
				}
				return
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(cfg)
	if handlers != 1 {
		t.Errorf("docs/examples/config.json has %d mcp_oauth handlers, want 1", handlers)
	}
}
