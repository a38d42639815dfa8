package redisstorage

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// conn is one Redis client shared by the loaded configurations that connect alike (see
// connections), with the locks this process holds through it.
type conn struct {
	client redis.UniversalClient
	logger *zap.Logger

	// done closes when the client does; lock renewals stop then.
	done      chan struct{}
	closeOnce sync.Once

	mu    sync.Mutex
	locks map[string]*heldLock // by lock key

	// checkOnce starts the check of the server's settings on first use; checked closes
	// when it is over.
	checkOnce sync.Once
	checked   chan struct{}
	// lease is how long a lock lives without renewal; tests shorten it.
	lease time.Duration
}

func newConn(client redis.UniversalClient, logger *zap.Logger) *conn {
	return &conn{
		client:  client,
		logger:  logger,
		done:    make(chan struct{}),
		checked: make(chan struct{}),
		locks:   make(map[string]*heldLock),
		lease:   defaultLease,
	}
}

// Destruct closes the client once no configuration uses it, first releasing the locks held
// through it: their renewals stop now, and Caddy, when it exits, unloads its configuration
// before it unlocks what it holds, which would find the client closed. A second call does
// nothing.
func (c *conn) Destruct() error {
	var err error
	c.closeOnce.Do(func() {
		close(c.done)
		c.mu.Lock()
		held := c.locks
		c.locks = make(map[string]*heldLock)
		c.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		for key, h := range held {
			if rerr := releaseScript.Run(ctx, c.client, []string{key}, h.token).Err(); rerr != nil {
				c.logger.Warn("releasing a storage lock at close; it expires with its lease",
					zap.String("lock", key), zap.Duration("lease", c.lease), zap.Error(rerr))
			}
		}
		cancel()
		err = c.client.Close()
	})
	return err
}

// closed reports whether Destruct ran.
func (c *conn) closed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// used is called by every operation: the first one starts the server check.
func (c *conn) used() {
	c.checkOnce.Do(func() { go c.checkServer() })
}

// checkServer warns when the server may evict keys or does not persist them: this storage
// holds certificates, sessions and grants, and an evicted key is one lost. It reads INFO,
// which managed services that rename CONFIG still answer, and CONFIG GET save when allowed.
func (c *conn) checkServer() {
	defer close(c.checked)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		select {
		case <-c.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	// INFO's default sections include memory, persistence and cluster; naming several
	// sections needs Redis 7.
	info, err := c.client.Info(ctx).Result()
	if err != nil {
		if !c.closed() { // else closed meanwhile: nothing to warn about
			c.logger.Warn("could not check the Redis server's eviction policy and persistence", zap.Error(err))
		}
		return
	}
	fields := parseInfo(info)
	if fields["cluster_enabled"] == "1" {
		c.logger.Error("the Redis server is a Redis Cluster node, which this storage does not support: " +
			"keys in other slots fail, and List sees one node's keys")
	}
	if policy := fields["maxmemory_policy"]; policy != "" && policy != "noeviction" {
		c.logger.Warn("the Redis server evicts keys when full; set maxmemory-policy noeviction: "+
			"this storage holds certificates, sessions and grants, and an evicted key is lost",
			zap.String("maxmemory_policy", policy))
	}
	if fields["aof_enabled"] == "1" {
		return
	}
	save, err := c.client.ConfigGet(ctx, "save").Result()
	if err != nil {
		// CONFIG renamed or forbidden: persistence is the operator's to know.
		c.logger.Debug("could not read the Redis server's save setting", zap.Error(err))
		return
	}
	if strings.TrimSpace(save["save"]) == "" {
		c.logger.Warn("the Redis server does not persist (no RDB snapshots, no AOF); enable appendonly or save: " +
			"this storage holds certificates, sessions and grants, which a restart would lose")
	}
}

// parseInfo reads INFO's "field:value" lines.
func parseInfo(info string) map[string]string {
	fields := make(map[string]string)
	for line := range strings.Lines(info) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if ok && !strings.HasPrefix(k, "#") {
			fields[k] = v
		}
	}
	return fields
}
