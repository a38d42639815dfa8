package mcprequest

import (
	"bytes"
	"encoding/json"
)

// validJSON is json.Valid(b), in one pass over b without encoding/json's state machine,
// about four times faster: the body of every tool call is validated before it is read.
// It accepts exactly what json.Valid accepts (FuzzValidJSON compares them): RFC 8259's
// grammar with bytes >= 0x80 taken as they are in strings, no control character in a
// string, nothing but whitespace after the value. A body nested deeper than its own stack
// is left to json.Valid, whose nesting bound it then applies.
func validJSON(b []byte) bool {
	// The containers open at i: '{' or '['; a closing byte is its opening one plus 2.
	var open [64]byte
	depth := 0
	i := 0
	for {
		// A value starts at i.
		i = skipSpace(b, i)
		if i >= len(b) {
			return false
		}
		switch c := b[i]; c {
		case '{', '[':
			if depth == len(open) {
				return json.Valid(b)
			}
			if i = skipSpace(b, i+1); i < len(b) && b[i] == c+2 {
				i++ // empty
				break
			}
			open[depth] = c
			depth++
			if c == '{' {
				i = memberName(b, i)
			}
			if i < 0 {
				return false
			}
			continue
		case '"':
			i = stringEnd(b, i)
		case 't':
			i = literalEnd(b, i, "true")
		case 'f':
			i = literalEnd(b, i, "false")
		case 'n':
			i = literalEnd(b, i, "null")
		default:
			i = numberEnd(b, i)
		}
		if i < 0 {
			return false
		}
		// A value ended at i: it closes containers, or another value follows a comma.
		for {
			i = skipSpace(b, i)
			if depth == 0 {
				return i == len(b)
			}
			if i >= len(b) {
				return false
			}
			if b[i] == open[depth-1]+2 {
				depth--
				i++
				continue
			}
			if b[i] != ',' {
				return false
			}
			i++
			if open[depth-1] == '{' {
				if i = memberName(b, skipSpace(b, i)); i < 0 {
					return false
				}
			}
			break
		}
	}
}

// memberName returns the index past the name of an object member at b[i] and its colon,
// or -1 when there is none.
func memberName(b []byte, i int) int {
	if i >= len(b) || b[i] != '"' {
		return -1
	}
	if i = stringEnd(b, i); i < 0 {
		return -1
	}
	if i = skipSpace(b, i); i >= len(b) || b[i] != ':' {
		return -1
	}
	return i + 1
}

// stringEnd returns the index past the valid JSON string at b[i] (a quote), or -1.
func stringEnd(b []byte, i int) int {
	for i++; i < len(b); {
		switch c := b[i]; {
		case c == '"':
			return i + 1
		case c == '\\':
			if i+1 >= len(b) {
				return -1
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(b) || !hex4(b[i+2:i+6]) {
					return -1
				}
				i += 6
			default:
				return -1
			}
		case c < 0x20:
			return -1
		default:
			i++
		}
	}
	return -1
}

func hex4(h []byte) bool {
	for _, c := range h {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// literalEnd returns the index past lit at b[i], or -1.
func literalEnd(b []byte, i int, lit string) int {
	if !bytes.HasPrefix(b[i:], []byte(lit)) {
		return -1
	}
	return i + len(lit)
}

// numberEnd returns the index past the JSON number at b[i], or -1: an optional minus,
// 0 or a digit string not starting with 0, then an optional fraction and exponent, each
// with at least one digit.
func numberEnd(b []byte, i int) int {
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i >= len(b):
		return -1
	case b[i] == '0':
		i++
	case '1' <= b[i] && b[i] <= '9':
		i = digitsEnd(b, i+1)
	default:
		return -1
	}
	if i < len(b) && b[i] == '.' {
		if i+1 >= len(b) || !isDigit(b[i+1]) {
			return -1
		}
		i = digitsEnd(b, i+1)
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		if i++; i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || !isDigit(b[i]) {
			return -1
		}
		i = digitsEnd(b, i)
	}
	return i
}

func digitsEnd(b []byte, i int) int {
	for i < len(b) && isDigit(b[i]) {
		i++
	}
	return i
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }
