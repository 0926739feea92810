package hsmtest

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// delayRelay forwards connections from one unix socket to another and
// holds back everything the far end sends by a delay that can change at
// any time: an appliance that answers each call late.
type delayRelay struct {
	ln    net.Listener
	delay atomic.Int64 // nanoseconds
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
}

func startDelayRelay(t testing.TB, listen, upstream string) *delayRelay {
	t.Helper()
	ln, err := net.Listen("unix", listen)
	if err != nil {
		t.Fatalf("hsmtest: relay: %v", err)
	}
	r := &delayRelay{ln: ln}
	r.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("unix", upstream)
			if err != nil {
				c.Close()
				continue
			}
			r.mu.Lock()
			r.conns = append(r.conns, c, u)
			r.mu.Unlock()
			r.wg.Go(func() { _, _ = io.Copy(u, c); u.Close() })
			r.wg.Go(func() {
				buf := make([]byte, 32<<10)
				for {
					n, err := u.Read(buf)
					if n > 0 {
						time.Sleep(time.Duration(r.delay.Load()))
						if _, werr := c.Write(buf[:n]); werr != nil {
							break
						}
					}
					if err != nil {
						break
					}
				}
				c.Close()
			})
		}
	})
	return r
}

// close stops the relay and every connection through it, and waits for
// its goroutines.
func (r *delayRelay) close() {
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}
