package nextcloud_test

import (
	"errors"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/nextcloud"
)

func newClient(t *testing.T, n *testenv.NextcloudStandIn, change func(*nextcloud.Config)) *nextcloud.Client {
	t.Helper()
	cfg := nextcloud.Config{URL: n.URL, PublicURL: "https://cloud.example.com/nc", UserAgent: "MCP broker test"}
	if change != nil {
		change(&cfg)
	}
	c, err := nextcloud.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLoginFlow(t *testing.T) {
	n := testenv.StartNextcloudStandIn(t)
	var clock testenv.Clock
	n.Now = clock.Now
	c := newClient(t, n, nil)
	ctx := t.Context()

	flow, err := c.StartLoginFlow(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("the login URL is on the public URL", func(t *testing.T) {
		if !strings.HasPrefix(flow.LoginURL, "https://cloud.example.com/nc/index.php/login/v2/flow/") || len(flow.PollToken) != 128 {
			t.Errorf("login URL %q, poll token of %d characters", flow.LoginURL, len(flow.PollToken))
		}
		reqs := n.Requests()
		if reqs[0].UserAgent != "MCP broker test" {
			t.Errorf("User-Agent %q", reqs[0].UserAgent)
		}
	})
	t.Run("a flow not granted yet is pending", func(t *testing.T) {
		if _, err := c.PollLoginFlow(ctx, flow.PollToken); !errors.Is(err, nextcloud.ErrPending) {
			t.Errorf("poll: %v", err)
		}
	})
	if err := n.Grant(strings.Replace(flow.LoginURL, "https://cloud.example.com/nc", n.URL, 1), "alice"); err != nil {
		t.Fatal(err)
	}
	var creds nextcloud.Credentials
	t.Run("a granted flow answers once", func(t *testing.T) {
		if creds, err = c.PollLoginFlow(ctx, flow.PollToken); err != nil || creds.LoginName != "alice" || len(creds.AppPassword) != 72 {
			t.Fatalf("poll: %+v %v", creds.LoginName, err)
		}
		if _, err := c.PollLoginFlow(ctx, flow.PollToken); !errors.Is(err, nextcloud.ErrPending) {
			t.Errorf("second poll: %v", err)
		}
	})
	t.Run("the app password authenticates as its user, with OCS-APIRequest", func(t *testing.T) {
		u, err := c.CurrentUser(ctx, creds)
		if err != nil || u.ID != "alice" {
			t.Fatalf("current user %+v %v", u, err)
		}
		last := n.Requests()[len(n.Requests())-1]
		if last.OCSAPIRequest != "true" || last.BasicLoginName != "alice" || last.Path != "/ocs/v2.php/cloud/user" {
			t.Errorf("request %+v", last)
		}
	})
	t.Run("an outage is no verdict on the password", func(t *testing.T) {
		n.FailOCS(http.StatusServiceUnavailable)
		defer n.FailOCS(0)
		_, err := c.CurrentUser(ctx, creds)
		var se *nextcloud.StatusError
		if !errors.As(err, &se) || se.Status != http.StatusServiceUnavailable || !nextcloud.Unavailable(err) {
			t.Errorf("current user: %v", err)
		}
	})
	t.Run("throttling is a typed error with the time to wait", func(t *testing.T) {
		n.Throttle(true)
		defer n.Throttle(false)
		err := c.DeleteAppPassword(ctx, creds)
		var te *nextcloud.ThrottledError
		if !errors.As(err, &te) || !nextcloud.Unavailable(err) || te.Until.Before(time.Now().Add(nextcloud.DefaultThrottleWait-time.Minute)) {
			t.Errorf("delete: %v", err)
		}
	})
	t.Run("a deleted app password is refused by Nextcloud", func(t *testing.T) {
		if err := c.DeleteAppPassword(ctx, creds); err != nil {
			t.Fatal(err)
		}
		if _, err := c.CurrentUser(ctx, creds); !errors.Is(err, nextcloud.ErrInvalidCredentials) || nextcloud.Unavailable(err) {
			t.Errorf("current user: %v", err)
		}
		if err := c.DeleteAppPassword(ctx, creds); !errors.Is(err, nextcloud.ErrInvalidCredentials) {
			t.Errorf("second delete: %v", err)
		}
	})
	t.Run("a flow expires after 1200 s", func(t *testing.T) {
		flow, err := c.StartLoginFlow(ctx)
		if err != nil {
			t.Fatal(err)
		}
		loginURL := strings.Replace(flow.LoginURL, "https://cloud.example.com/nc", n.URL, 1)
		clock.Advance(nextcloud.FlowLifetime + time.Second)
		if err := n.Grant(loginURL, "alice"); err == nil {
			t.Error("an expired flow was granted")
		}
		if _, err := c.PollLoginFlow(ctx, flow.PollToken); !errors.Is(err, nextcloud.ErrPending) {
			t.Errorf("poll: %v", err)
		}
	})
}

func TestLoginFlowErrorsHoldNoSecret(t *testing.T) {
	n := testenv.StartNextcloudStandIn(t)
	c := newClient(t, n, nil)
	secret := "s3cretAppPassw0rd"
	n.FailOCS(http.StatusBadGateway)
	for _, err := range []error{
		c.DeleteAppPassword(t.Context(), nextcloud.Credentials{LoginName: "alice", AppPassword: secret}),
		func() error { _, err := c.PollLoginFlow(t.Context(), secret); return err }(),
	} {
		if err == nil || strings.Contains(err.Error(), secret) {
			t.Errorf("error %v", err)
		}
	}
}

func TestConfigRefused(t *testing.T) {
	for name, cfg := range map[string]nextcloud.Config{
		"no URL":                 {},
		"a URL without a host":   {URL: "https:///nc"},
		"a URL with a query":     {URL: "https://cloud.example.com/?x=1"},
		"a public URL with user": {URL: "https://cloud.example.com", PublicURL: "https://u@cloud.example.com"},
		"a scheme not http":      {URL: "ftp://cloud.example.com"},
	} {
		if _, err := nextcloud.New(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestLoginFlowUserAgentAllowList(t *testing.T) {
	n := testenv.StartNextcloudStandIn(t)
	n.AllowedUserAgents = []*regexp.Regexp{regexp.MustCompile(`(?i)^MCP broker`)}
	for ua, allowed := range map[string]bool{"MCP broker test": true, "curl/8": false} {
		c := newClient(t, n, func(cfg *nextcloud.Config) { cfg.UserAgent = ua })
		flow, err := c.StartLoginFlow(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		err = n.Grant(strings.Replace(flow.LoginURL, "https://cloud.example.com/nc", n.URL, 1), "alice")
		if (err == nil) != allowed {
			t.Errorf("User-Agent %q: grant %v", ua, err)
		}
	}
}
