package link

import (
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// keyserverName and edgeIdentity are the names of the test PKI's keyserver
// and edge certificates.
const (
	keyserverName = "keyserver.test"
	edgeIdentity  = "edge.test"
)

const defaultTestTimeout = 10 * time.Second

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
