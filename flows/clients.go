package flows

// Client is an MCP client the broker knows.
type Client struct {
	ID           string
	Name         string
	RedirectURIs []string
	// Scopes the client may ask for.
	Scopes []string
}

// clientRegistry finds clients by id. Today it holds the clients of the configuration.
type clientRegistry struct {
	static map[string]*Client
}

func newClientRegistry(cfg []ClientConfig, defaultScopes []string) *clientRegistry {
	reg := &clientRegistry{static: make(map[string]*Client, len(cfg))}
	for _, c := range cfg {
		cl := &Client{ID: c.ClientID, Name: c.Name, RedirectURIs: c.RedirectURIs, Scopes: c.Scopes}
		if cl.Name == "" {
			cl.Name = cl.ID
		}
		if len(cl.Scopes) == 0 {
			cl.Scopes = defaultScopes
		}
		reg.static[c.ClientID] = cl
	}
	return reg
}

// lookup returns the client with id, or nil.
func (c *clientRegistry) lookup(id string) *Client {
	return c.static[id]
}

// allowsScopes tells whether every scope asked is one the client may ask for; `openid`
// is always allowed.
func (c *Client) allowsScopes(asked []string) bool {
	p := Principal{Scopes: append([]string{"openid"}, c.Scopes...)}
	return p.HasScopes(asked)
}
