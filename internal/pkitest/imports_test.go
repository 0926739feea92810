package pkitest

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const (
	modulePath = "github.com/keyless-tls/keyless"
	importPath = modulePath + "/internal/pkitest"
)

// TestImportedByTestsOnly checks the package's place in the module: no
// file but a _test.go file outside this package imports it, and it
// imports nothing of the module itself, so that production code cannot
// grow a dependency on test keys and the packages under test cannot be
// imported back by their own test helper.
func TestImportedByTestsOnly(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	self, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		checked++
		inSelf := filepath.Dir(path) == self
		for _, imp := range f.Imports {
			p, err := strconv.Unquote(imp.Path.Value)
			if err != nil {
				return err
			}
			switch {
			case p == importPath && !inSelf && !strings.HasSuffix(path, "_test.go"):
				t.Errorf("%s imports %s; only _test.go files may", path, importPath)
			case inSelf && !strings.HasSuffix(path, "_test.go") && strings.HasPrefix(p, modulePath):
				t.Errorf("%s imports %s; pkitest must not import the module's packages", path, p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 10 {
		t.Fatalf("checked %d Go files under %s; is this the module root?", checked, root)
	}
}
