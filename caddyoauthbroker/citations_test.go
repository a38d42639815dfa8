package caddyoauthbroker

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// mdCitation is a Markdown file named in source: SECURITY.md, interop/README.md.
var mdCitation = regexp.MustCompile(`[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b`)

// TestSourcesCiteOnlyFilesOfTheRepository: the repository stands alone, so every Markdown
// document its Go and shell sources cite is one of its own files, named from the root or
// from the citing file's folder.
func TestSourcesCiteOnlyFilesOfTheRepository(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case ".git", "node_modules", "testdata":
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") && !strings.HasSuffix(p, ".sh") {
			return nil
		}
		src, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, name := range mdCitation.FindAllString(string(src), -1) {
			_, errRoot := os.Stat(filepath.Join(root, name))
			_, errHere := os.Stat(filepath.Join(filepath.Dir(p), name))
			if errRoot != nil && errHere != nil {
				rel, _ := filepath.Rel(root, p)
				t.Errorf("%s cites %s, which is not in the repository; cite SECURITY.md rows or RFC sections, or say it in place", rel, name)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
