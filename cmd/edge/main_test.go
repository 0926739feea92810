package main

import (
	"bytes"
	"errors"
	"flag"
	"strings"
	"testing"
)

func TestRunFlagErrors(t *testing.T) {
	required := []string{"-certs", "d", "-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-cert", "c", "-tls-key", "k"}
	with := func(extra ...string) []string { return append(append([]string{}, required...), extra...) }
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no certs", []string{"-origin", "http://o"}, "-certs is required"},
		{"no origin", required, "set exactly one of -origin"},
		{"two origins", with("-origin", "http://o", "-tcp-origin", "o:1"), "set exactly one of -origin"},
		{"bad origin scheme", with("-origin", "ftp://o"), `-origin "ftp://o"`},
		{"origin without host", with("-origin", "http://"), `-origin "http://"`},
		{"bad log level", with("-origin", "http://o", "-log-level", "chatty"), `-log-level "chatty"`},
		{"zero call timeout", with("-origin", "http://o", "-call-timeout", "0s"), "-call-timeout"},
		{"keepalive too short", with("-origin", "http://o", "-keepalive", "1s"), "-keepalive"},
		{"zero reconnect backoff", with("-origin", "http://o", "-reconnect-backoff", "0s"), "-reconnect-backoff"},
		{"extra argument", with("-origin", "http://o", "extra"), "unexpected arguments"},
		{"missing client certificate", with("-origin", "http://o"), "no such file"},
		{"several keyservers without a name", append(with("-origin", "http://o"), "-keyserver", "a:1,b:2"), "-keyserver-name is required"},
		{"dns name among others", append(with("-origin", "http://o"), "-keyserver", "dns:///ks:1,b:2", "-keyserver-name", "ks"), "must be the only keyserver address"},
		{"dns name without port", append(with("-origin", "http://o"), "-keyserver", "dns:///ks"), `-keyserver "dns:///ks"`},
		{"keyserver without port", append(with("-origin", "http://o"), "-keyserver", "a"), `-keyserver "a"`},
		{"unknown flag", []string{"-frobnicate"}, "frobnicate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			err := run(t.Context(), tt.args, &stderr, nil)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("run(%q) = %v, want an error containing %q", tt.args, err, tt.wantErr)
			}
		})
	}
	var stderr bytes.Buffer
	if err := run(t.Context(), []string{"-h"}, &stderr, nil); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("run(-h) = %v, want flag.ErrHelp", err)
	}
	for _, f := range []string{"-listen", "-certs", "-default-cert", "-rsa-key-exchange", "-origin", "-tcp-origin", "-keyserver", "-call-timeout", "-keepalive", "-reconnect-backoff", "-grace"} {
		if !strings.Contains(stderr.String(), f) {
			t.Errorf("edge -h does not document %s", f)
		}
	}
}

func TestSplitList(t *testing.T) {
	got := splitList(" a:1, ,b:2,")
	if len(got) != 2 || got[0] != "a:1" || got[1] != "b:2" {
		t.Errorf("splitList = %q", got)
	}
}
