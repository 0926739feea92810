// Package config reads the settings of the keyless commands from three
// sources, in order of precedence: command-line flags, environment
// variables PREFIX_NAME, and a YAML file named by -config. It is
// peterbourgon/ff/v3 with a small YAML parser over go.yaml.in/yaml/v3,
// because ff's own YAML parser pulls in the archived gopkg.in/yaml.v2.
package config

import (
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/peterbourgon/ff/v3"
	"go.yaml.in/yaml/v3"
)

// Parse defines -config on fs, parses args into fs, then fills every flag
// not given on the command line from the environment variable prefix_NAME
// (the flag's name in upper case, '-' as '_': -max-queued is
// KEYSERVER_MAX_QUEUED), then from the YAML file named by -config (keys are
// flag names: "max-queued: 64"). A key the flag set does not define is an
// error, except the names of sections: keys whose values are lists or
// mappings, which the program reads itself with [Section]. fs's usage text is
// extended to say all this.
func Parse(fs *flag.FlagSet, args []string, prefix string, sections ...string) error {
	fs.String("config", "", "YAML file of settings, one key per flag name (e.g. \"log-level: debug\"); command-line flags, then "+prefix+"_* environment variables, take precedence")
	usage := fs.Usage
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Every flag can also be set by the environment variable %s_<NAME> (upper case, '-' as '_'),\nor as a key of the -config YAML file. Flags win over variables, variables over the file.\n\n", prefix)
		if usage != nil {
			usage()
		} else {
			fs.PrintDefaults()
		}
	}
	return ff.Parse(fs, args,
		ff.WithEnvVarPrefix(prefix),
		ff.WithConfigFileFlag("config"),
		ff.WithConfigFileParser(yamlParser(sections)),
	)
}

// Section returns the node of key name in the YAML file at path, or nil if
// the file has no such key. Errors name the file.
func Section(path, name string) (*yaml.Node, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	m, err := readMapping(f)
	if err != nil || m == nil {
		return nil, err
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == name {
			return m.Content[i+1], nil
		}
	}
	return nil, nil
}

// readMapping reads a YAML document that is a mapping; nil if it is empty.
func readMapping(r io.Reader) (*yaml.Node, error) {
	var doc yaml.Node
	if err := yaml.NewDecoder(r).Decode(&doc); err != nil {
		if err == io.EOF {
			return nil, nil
		}
		return nil, fmt.Errorf("config file: %w", err)
	}
	if len(doc.Content) == 0 {
		return nil, nil
	}
	m := doc.Content[0]
	if m.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config file: line %d: want a mapping of flag names to values", m.Line)
	}
	return m, nil
}

// YAML is an ff.ConfigFileParser for a YAML mapping of flag names to
// scalar values.
func YAML(r io.Reader, set func(name, value string) error) error {
	return yamlParser(nil)(r, set)
}

// yamlParser returns YAML, skipping the keys named in sections.
func yamlParser(sections []string) ff.ConfigFileParser {
	return func(r io.Reader, set func(name, value string) error) error {
		m, err := readMapping(r)
		if err != nil || m == nil {
			return err
		}
		for i := 0; i+1 < len(m.Content); i += 2 {
			k, v := m.Content[i], m.Content[i+1]
			if slices.Contains(sections, k.Value) {
				continue
			}
			if v.Kind != yaml.ScalarNode {
				return fmt.Errorf("config file: line %d: %s: want a single value", v.Line, k.Value)
			}
			if err := set(strings.TrimPrefix(k.Value, "-"), v.Value); err != nil {
				return fmt.Errorf("config file: line %d: %s: %w", k.Line, k.Value, err)
			}
		}
		return nil
	}
}
