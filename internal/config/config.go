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
	"strings"

	"github.com/peterbourgon/ff/v3"
	"go.yaml.in/yaml/v3"
)

// Parse defines -config on fs, parses args into fs, then fills every flag
// not given on the command line from the environment variable prefix_NAME
// (the flag's name in upper case, '-' as '_': -max-queued is
// KEYSERVER_MAX_QUEUED), then from the YAML file named by -config (keys are
// flag names: "max-queued: 64"). A key the flag set does not define is an
// error. fs's usage text is extended to say all this.
func Parse(fs *flag.FlagSet, args []string, prefix string) error {
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
		ff.WithConfigFileParser(YAML),
	)
}

// YAML is an ff.ConfigFileParser for a YAML mapping of flag names to
// scalar values.
func YAML(r io.Reader, set func(name, value string) error) error {
	var doc yaml.Node
	if err := yaml.NewDecoder(r).Decode(&doc); err != nil {
		if err == io.EOF {
			return nil
		}
		return fmt.Errorf("config file: %w", err)
	}
	if len(doc.Content) == 0 {
		return nil
	}
	m := doc.Content[0]
	if m.Kind != yaml.MappingNode {
		return fmt.Errorf("config file: line %d: want a mapping of flag names to values", m.Line)
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		if v.Kind != yaml.ScalarNode {
			return fmt.Errorf("config file: line %d: %s: want a single value", v.Line, k.Value)
		}
		if err := set(strings.TrimPrefix(k.Value, "-"), v.Value); err != nil {
			return fmt.Errorf("config file: line %d: %s: %w", k.Line, k.Value, err)
		}
	}
	return nil
}
