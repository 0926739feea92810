package bench

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/internal/h2frames"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/tlscore"
)

// loadFlags are the flags of every mode that runs a load.
type loadFlags struct {
	concurrency int
	warmup      time.Duration
	duration    time.Duration
	timeout     time.Duration
	pause       time.Duration
	watch       string
}

func (f *loadFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&f.concurrency, "concurrency", 1, "number of workers, each running one operation at a time")
	fs.DurationVar(&f.warmup, "warmup", 500*time.Millisecond, "time to run before measuring")
	fs.DurationVar(&f.duration, "duration", 2*time.Second, "time to measure")
	fs.DurationVar(&f.timeout, "op-timeout", tlscore.DefaultCallTimeout, "deadline of each operation")
	fs.DurationVar(&f.pause, "pause", 0, "idle time of each worker before each operation, not counted in its latency")
	fs.StringVar(&f.watch, "watch", "", "other processes whose CPU time to measure, as name=pid,name=pid")
}

// measure runs the load of op and returns what it measured; self names
// this process in Result.CPU.
// frames, if not nil, are the frames of the load's connection: the result
// then has its frames per operation over the measurement window.
func (f *loadFlags) measure(ctx context.Context, name, self string, op Op, frames *h2frames.Counts) (Result, error) {
	watch, err := parseWatch(f.watch)
	if err != nil {
		return Result{}, err
	}
	watch[self] = os.Getpid()
	load := &Load{Name: name, Concurrency: f.concurrency, Warmup: f.warmup, Duration: f.duration, OpTimeout: f.timeout, Op: op,
		Pause: f.pause, Watch: watch}
	var at [2]frameSnapshot
	var ended bool
	if frames != nil {
		load.AtWindow = func(end bool) {
			if end {
				at[1], ended = framesNow(frames), true
			} else {
				at[0] = framesNow(frames)
			}
		}
	}
	res, err := load.Run(ctx)
	if err == nil && ended {
		res.FramesPerOp = perOp(at[0], at[1], res.Ops)
	}
	return res, err
}

// run is measure, with the Result printed as JSON on stdout.
func (f *loadFlags) run(ctx context.Context, stdout io.Writer, name, self string, op Op) error {
	res, err := f.measure(ctx, name, self, op, nil)
	if err != nil {
		return err
	}
	return writeJSON(stdout, res)
}

// linkFlags are the client side of the mutual-TLS link to a keyserver.
type linkFlags struct {
	serverName, ca, cert, key string
	window                    int
}

func (f *linkFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.serverName, "server-name", linkServerName, "name of the keyserver's certificate")
	fs.StringVar(&f.ca, "ca", "", "PEM CA of the keyserver's certificate (required)")
	fs.StringVar(&f.cert, "cert", "", "PEM client certificate (required)")
	fs.StringVar(&f.key, "key", "", "PEM private key of -cert (required)")
	fs.IntVar(&f.window, "link-window", link.DefaultWindowSize, "HTTP/2 flow-control window of the client's connection, in bytes, as the edge's -link-window")
}

func (f *linkFlags) tlsConfig() (*tls.Config, error) {
	return link.ClientMTLSConfig(f.cert, f.key, f.ca, f.serverName)
}

// dial opens one gRPC connection to addr with the link's credentials and
// the edge's transport options, then opts: what the edge's client does,
// without its balancing and retry service config. Its HTTP/2 frames are
// counted in frames, if not nil.
func (f *linkFlags) dial(addr string, frames *h2frames.Counts, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if err := link.ValidateWindowSize(f.window); err != nil {
		return nil, fmt.Errorf("bench: -link-window: %w", err)
	}
	cfg, err := f.tlsConfig()
	if err != nil {
		return nil, err
	}
	creds := credentials.NewTLS(cfg)
	if frames != nil {
		creds = h2frames.ClientCredentials(creds, frames)
	}
	opts = append(append(link.DialOptions(link.WithWindowSize(f.window)), grpc.WithTransportCredentials(creds)), opts...)
	conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("bench: dial %s: %w", addr, err)
	}
	return conn, nil
}

// hsmFlags open the token in-process.
type hsmFlags struct {
	module, label, pinFile string
	maxSessions            int
}

func (f *hsmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.module, "module", "/usr/lib/softhsm/libsofthsm2.so", "PKCS #11 module")
	fs.StringVar(&f.label, "token-label", "", "token label (required)")
	fs.StringVar(&f.pinFile, "pin-file", "", "file holding the user PIN (required)")
	fs.IntVar(&f.maxSessions, "max-sessions", 0, "hsm.Config.MaxSessions (0: the package default)")
}

func (f *hsmFlags) open() (*hsm.Module, error) {
	pin, err := os.ReadFile(f.pinFile)
	if err != nil {
		return nil, fmt.Errorf("bench: -pin-file: %w", err)
	}
	return hsm.Open(hsm.Config{
		ModulePath:  f.module,
		TokenLabel:  f.label,
		PIN:         strings.TrimRight(string(pin), "\r\n"),
		MaxSessions: f.maxSessions,
	})
}
