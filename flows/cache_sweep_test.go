package flows

import (
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestSweepCaches: an expired verdict on a broker token leaves memory at the sweep, a live
// one stays and is still served from memory.
func TestSweepCaches(t *testing.T) {
	e := newTokenEnv(t, testenv.SharedOP(t), nil)
	expired, _ := issueTestPair(t, e.b)
	if _, err := e.b.verifyBrokerToken(t.Context(), expired.AccessToken); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(brokerCacheTTL)
	live, _ := issueTestPair(t, e.b)
	if _, err := e.b.verifyBrokerToken(t.Context(), live.AccessToken); err != nil {
		t.Fatal(err)
	}
	if n := e.b.SweepCaches(); n != 1 {
		t.Errorf("swept %d entries, want the one expired", n)
	}
	if n := e.b.brokerTokens.Len(); n != 1 {
		t.Errorf("%d verdicts left, want the live one", n)
	}
	if err := e.b.cfg.Records.Delete(t.Context(), tokenRecordKey(kindAccessToken, live.AccessToken)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.b.verifyBrokerToken(t.Context(), live.AccessToken); err != nil {
		t.Errorf("the live verdict after the sweep: %v, want it served from memory", err)
	}
}
