package mcprequest

import (
	"encoding/json"
	"strings"
	"testing"
)

// validJSONCases are bodies on each side of json.Valid's line, the seeds of FuzzValidJSON.
var validJSONCases = []string{
	``, ` `, `{}`, `[]`, ` { } `, `[ ]`, `{"a":1}`, `{"a" : [1, 2.5e-3, -0, true, false, null, "x"] }`,
	`{"a":1,}`, `[1,]`, `[,1]`, `{,}`, `{"a"}`, `{"a":}`, `{"a" 1}`, `{1:2}`, `[1 2]`, `{"a":1]`, `[}`, `[`, `{`, `]`, `}`,
	`"x"`, `"`, `"\"`, `"\\"`, `"\/\b\f\n\r\t"`, `"\u00e9"`, `"\u00E9\uD83D\uDE00"`, `"\u00g9"`, `"\u00e"`, `"\x"`, `"\'"`,
	"\"a\x00b\"", "\"a\x1fb\"", "\"a\x7fb\"", "\"\xff\xfe\"", "\"\xc3\xa9\"", "\xef\xbb\xbf{}", "{}\x00", "\x00",
	`0`, `-0`, `01`, `-01`, `1.`, `.5`, `1.5`, `1e5`, `1E+5`, `1e-5`, `1e`, `1e+`, `-`, `+1`, `0x10`, `1.5e3.2`, `-a`, `Infinity`, `NaN`,
	`true`, `tru`, `truex`, `false`, `fals`, `null`, `nul`, `nullnull`, `True`,
	"\t{\r\n\"a\"\t:\n1\r}\n", "{\"a\":1}\v", "{\"a\":1} x", `{"a":1}{}`, `[][]`, `1 2`,
	`{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`,
	strings.Repeat("[", 64) + strings.Repeat("]", 64), strings.Repeat("[", 65) + strings.Repeat("]", 65),
	strings.Repeat(`{"a":`, 70) + "1" + strings.Repeat("}", 70), strings.Repeat("[", 70) + strings.Repeat("]", 69),
	strings.Repeat("[", 10001) + strings.Repeat("]", 10001), strings.Repeat("[", 10000) + strings.Repeat("]", 10000),
}

func TestValidJSON(t *testing.T) {
	for _, body := range validJSONCases {
		if got, want := validJSON([]byte(body)), json.Valid([]byte(body)); got != want {
			t.Errorf("validJSON(%.80q) = %v, json.Valid %v", body, got, want)
		}
	}
}

// FuzzValidJSON: validJSON accepts exactly what json.Valid accepts.
func FuzzValidJSON(f *testing.F) {
	for _, body := range validJSONCases {
		f.Add([]byte(body))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		if got, want := validJSON(body), json.Valid(body); got != want {
			t.Fatalf("validJSON(%q) = %v, json.Valid %v", body, got, want)
		}
	})
}

// BenchmarkValidJSON is validJSON against json.Valid on the bodies of BenchmarkInspectWarm.
func BenchmarkValidJSON(b *testing.B) {
	for _, bc := range []struct{ name, body string }{
		{"call", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{}}}`},
		{"call 512", `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"` + strings.Repeat("x", 512) + `"}}}`},
	} {
		body := []byte(bc.body)
		b.Run(bc.name+"/json.Valid", func(b *testing.B) {
			for b.Loop() {
				json.Valid(body)
			}
		})
		b.Run(bc.name+"/validJSON", func(b *testing.B) {
			for b.Loop() {
				validJSON(body)
			}
		})
	}
}
