package flows

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOnlyStoresTouchRecords keeps the seam of store.go: outside the store_*.go files no
// production code calls storage.Records (cfg.Records.X) or reaches into a store's records
// field, so a handler can only do what its store allows.
func TestOnlyStoresTouchRecords(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") || name == "store.go" || strings.HasPrefix(name, "store_") {
			continue
		}
		src, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		f, err := parser.ParseFile(fset, name, src, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if sel.Sel.Name == "records" {
				t.Errorf("%s: a store's records used outside the stores", fset.Position(sel.Pos()))
			}
			if inner, ok := sel.X.(*ast.SelectorExpr); ok && inner.Sel.Name == "Records" {
				t.Errorf("%s: storage.Records.%s called outside the stores; add an operation to a store instead",
					fset.Position(sel.Pos()), sel.Sel.Name)
			}
			return true
		})
	}
}
