package idp

// Methods only tests call, kept out of the production files.

// cached tells whether v holds a verdict on raw that is still good.
func (v *Verifier) cached(raw string) bool {
	_, ok := v.lookup(v.index(raw), raw, v.cfg.Now().UnixNano())
	return ok
}
