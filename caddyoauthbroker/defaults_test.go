package caddyoauthbroker

import (
	"go/ast"
	"go/parser"
	"go/token"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// derivedDefaults are the fields whose default is not a value but depends on the IdP or
// on other fields; flows decides them where it knows those. Their doc comments still say
// what the default is.
var derivedDefaults = map[string]bool{
	"Handler.PublicIssuer":  true, // the issuer
	"Handler.Delegation":    true, // a struct: its fields are compared one by one
	"Handler.OfflineAccess": true, // a struct: no tools need offline access
	"Handler.StorageRaw":    true, // Caddy's storage
	"Delegation.Mode":       true, // what the IdP's discovery advertises
	"Delegation.Scopes":     true, // the handler's scopes, less the OpenID ones
	// Mode app_password's fields: set only in that mode, the public URL from nextcloud_url.
	"Delegation.NextcloudPublicURL": true,
	"Delegation.UserClaim":          true,
	"Delegation.UserAgent":          true,
	"Client.Name":                   true, // the client id
	"Client.Scopes":                 true, // the handler's scopes
}

// documentedDefaults reads module.go's doc comments: for each exported field of the
// configuration types, the text after "Default:" up to the sentence's end or a
// parenthesis, or "required" when the comment says the field is required.
func documentedDefaults(t *testing.T) map[string]string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "module.go", nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	docs := make(map[string]string)
	for _, decl := range f.Decls {
		g, ok := decl.(*ast.GenDecl)
		if !ok {
			continue
		}
		for _, spec := range g.Specs {
			ts, ok := spec.(*ast.TypeSpec)
			if !ok {
				continue
			}
			st, ok := ts.Type.(*ast.StructType)
			if !ok {
				continue
			}
			for _, field := range st.Fields.List {
				if len(field.Names) == 0 || !field.Names[0].IsExported() {
					continue
				}
				name := ts.Name.Name + "." + field.Names[0].Name
				doc := strings.Join(strings.Fields(field.Doc.Text()), " ")
				_, after, found := strings.Cut(doc, "Default: ")
				switch {
				case found:
					if i := strings.Index(after, ". "); i >= 0 {
						after = after[:i]
					}
					after, _, _ = strings.Cut(strings.TrimSuffix(after, "."), " (")
					docs[name] = after
				case strings.Contains(strings.ToLower(doc), "required"):
					docs[name] = "required"
				default:
					t.Errorf("%s: the doc comment states neither a default nor that it is required", name)
				}
			}
		}
	}
	return docs
}

// TestProvisionAppliesTheDocumentedDefaults provisions a configuration with only the
// required fields and compares each field with the default its doc comment states, so
// that the comment (Caddy's documentation is built from it) and the value applied cannot
// drift apart.
func TestProvisionAppliesTheDocumentedDefaults(t *testing.T) {
	docs := documentedDefaults(t)
	ctx, _ := provisionContext(t)
	h, err := load(t, ctx, map[string]any{
		"issuer":          "http://127.0.0.1:9",
		"client_id":       "mcp-broker",
		"resource":        "https://mcp.example.com/mcp",
		"encryption_keys": []string{testKey},
	})
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, v := range []reflect.Value{reflect.ValueOf(h).Elem(), reflect.ValueOf(h.Delegation).Elem()} {
		typ := v.Type()
		for i := range typ.NumField() {
			sf := typ.Field(i)
			name := typ.Name() + "." + sf.Name
			doc, ok := docs[name]
			if !sf.IsExported() || !ok || doc == "required" || derivedDefaults[name] {
				continue
			}
			if err := matchesDefault(v.Field(i), doc); err != "" {
				t.Errorf("%s: documented default %q, provisioned %s", name, doc, err)
			}
			checked++
		}
	}
	if checked < 20 {
		t.Errorf("only %d defaults compared; the doc comments were not read", checked)
	}
	for name := range derivedDefaults {
		if _, ok := docs[name]; !ok {
			t.Errorf("%s: listed as derived but has no documented default", name)
		}
	}
}

// matchesDefault compares a provisioned field with the default documented for it, and
// says what it found when they differ.
func matchesDefault(v reflect.Value, doc string) string {
	doc = strings.Trim(doc, "`")
	if doc == "none" {
		if v.IsZero() || v.Kind() == reflect.Slice && v.Len() == 0 {
			return ""
		}
		return "a value"
	}
	switch x := v.Interface().(type) {
	case caddy.Duration:
		want, err := caddy.ParseDuration(doc)
		if err != nil || time.Duration(x) != want {
			return time.Duration(x).String()
		}
	case int, int64:
		n := v.Int()
		want, err := strconv.ParseInt(strings.TrimSuffix(doc, " MiB"), 10, 64)
		if strings.HasSuffix(doc, " MiB") {
			want <<= 20
		}
		if err != nil || n != want {
			return strconv.FormatInt(n, 10)
		}
	case bool:
		if strconv.FormatBool(x) != doc {
			return strconv.FormatBool(x)
		}
	case *bool:
		if x == nil || strconv.FormatBool(*x) != doc {
			return "nil or the other value"
		}
	case string:
		if x != doc {
			return strconv.Quote(x)
		}
	case []string:
		if !slices.Equal(x, strings.Fields(doc)) {
			return strconv.Quote(strings.Join(x, " "))
		}
	default:
		return "a type this test cannot compare: " + v.Type().String()
	}
	return ""
}
