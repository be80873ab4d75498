package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// consulAgent is the two calls of Consul's agent API that register uses.
type consulAgent struct {
	url  string // e.g. http://127.0.0.1:8500
	http *http.Client
}

func (a *consulAgent) register(ctx context.Context, s service) error {
	body, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return a.put(ctx, "/v1/agent/service/register", body)
}

func (a *consulAgent) deregister(ctx context.Context, id string) error {
	return a.put(ctx, "/v1/agent/service/deregister/"+url.PathEscape(id), nil)
}

func (a *consulAgent) put(ctx context.Context, path string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, strings.TrimSuffix(a.url, "/")+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("PUT %s: %s: %s", path, resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}
