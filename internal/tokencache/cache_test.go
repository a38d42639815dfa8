package tokencache

import "testing"

func TestCache(t *testing.T) {
	key := func(i byte) (k [32]byte) { k[0] = i; return k }
	t.Run("stays within its bound", func(t *testing.T) {
		c := New[[32]byte, string](3)
		for i := range byte(10) {
			c.Put(key(i), "v", int64(100+int(i)), false, 0)
			if c.Len() > 3 {
				t.Fatalf("%d entries", c.Len())
			}
		}
	})
	t.Run("the zero value is a bounded cache", func(t *testing.T) {
		var c Cache[[32]byte, string]
		c.Put(key(1), "v", 10, false, 0)
		if v, ok := c.Get(key(1), 5); !ok || v != "v" {
			t.Errorf("Get = %q %v", v, ok)
		}
		if _, ok := c.Get(key(1), 10); ok {
			t.Error("an entry is served at its expiry")
		}
	})
	t.Run("DeleteFunc removes the matching entries only", func(t *testing.T) {
		c := New[[32]byte, string](10)
		c.Put(key(1), "family-a", 10, false, 0)
		c.Put(key(2), "family-b", 10, false, 0)
		c.Put(key(3), "family-a", 10, false, 0)
		if n := c.DeleteFunc(func(v string) bool { return v == "family-a" }); n != 2 {
			t.Errorf("deleted %d", n)
		}
		if _, ok := c.Get(key(2), 0); !ok || c.Len() != 1 {
			t.Error("the other family's entry went too")
		}
	})
	t.Run("DeleteExpired gives back expired entries only, and voids nothing", func(t *testing.T) {
		c := New[[32]byte, string](10)
		c.Put(key(1), "old", 10, false, 0)
		c.Put(key(2), "refusal", 12, true, 0)
		c.Put(key(3), "live", 20, false, 0)
		epoch := c.Epoch()
		if n := c.DeleteExpired(12); n != 2 {
			t.Errorf("deleted %d, want 2", n)
		}
		if v, ok := c.Get(key(3), 12); !ok || v != "live" || c.Len() != 1 {
			t.Errorf("after the sweep: Get = %q %v, %d entries", v, ok, c.Len())
		}
		if !c.PutSince(epoch, key(4), "computed before", 30, false, 12) {
			t.Error("a sweep of expired entries refused a value computed before it")
		}
	})
}
