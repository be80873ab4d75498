package docker

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/connectable/connectable/internal/port"
)

// LabelPrefix starts every label the watcher reads: connect.<port>=<service>.
const LabelPrefix = "connect."

// LabelError says why one label was skipped.
type LabelError struct {
	Label string // the whole key, e.g. "connect.70000"
	Value string
	Err   error
}

func (e *LabelError) Error() string {
	return fmt.Sprintf("label %s=%q: %v", e.Label, e.Value, e.Err)
}

func (e *LabelError) Unwrap() error { return e.Err }

var errEmptyValue = errors.New("empty service name")

// ParseRoutes reads the connect.<port>=<service> labels among labels and
// returns the valid ones as port → service, nil when there are none. Labels
// without the prefix are ignored. Each malformed label is left out and named,
// with the reason, by one *LabelError in errs (in label order): a port that is
// not a plain decimal number from 1 to 65535 (internal/port: no sign, no
// leading zero, so connect.80 and connect.080 never both name one port), an
// empty value, or a value validate rejects. A nil validate accepts any
// value that is not blank.
func ParseRoutes(labels map[string]string, validate func(value string) error) (routes map[uint16]string, errs []error) {
	for _, key := range slices.Sorted(maps.Keys(labels)) {
		rest, ok := strings.CutPrefix(key, LabelPrefix)
		if !ok {
			continue
		}
		value := labels[key]
		p, err := port.Parse(rest)
		if err == nil {
			err = validateValue(value, validate)
		}
		if err != nil {
			errs = append(errs, &LabelError{Label: key, Value: value, Err: err})
			continue
		}
		if routes == nil {
			routes = make(map[uint16]string)
		}
		routes[p] = value
	}
	return routes, errs
}

func validateValue(value string, validate func(string) error) error {
	if strings.TrimSpace(value) == "" {
		return errEmptyValue
	}
	if validate == nil {
		return nil
	}
	if err := validate(value); err != nil {
		return fmt.Errorf("invalid service name: %w", err)
	}
	return nil
}

// hasRouteLabels reports whether any label asks for a route, valid or not:
// such a container is worth inspecting.
func hasRouteLabels(labels map[string]string) bool {
	for k := range labels {
		if strings.HasPrefix(k, LabelPrefix) {
			return true
		}
	}
	return false
}
