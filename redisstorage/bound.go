package redisstorage

import (
	"context"
	"time"

	"github.com/redis/go-redis/v9"
)

// operationBound is a go-redis hook that ends each command and pipeline, its retry and any
// dial it needs, within one attempt's timeouts (dial + write + read): go-redis's own retry
// of a timed-out pipeline (a fresh dial, its handshake, a second read) took 2 s with
// timeouts of 500 ms, and 5 s on a loaded machine, where a caller needing storage must get
// its 503 within the documented bound. A retry still runs when the first attempt failed
// fast, as on a pooled connection Redis closed.
type operationBound time.Duration

func (b operationBound) DialHook(next redis.DialHook) redis.DialHook { return next }

func (b operationBound) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		ctx, cancel := b.bound(ctx)
		defer cancel()
		return next(ctx, cmd)
	}
}

func (b operationBound) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		ctx, cancel := b.bound(ctx)
		defer cancel()
		return next(ctx, cmds)
	}
}

// bound gives ctx the operation's deadline unless it already ends sooner.
func (b operationBound) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	d := time.Duration(b)
	if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) <= d {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

var _ redis.Hook = operationBound(0)
