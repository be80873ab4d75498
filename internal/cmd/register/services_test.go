package main

import (
	"reflect"
	"testing"

	dockerapi "github.com/fsouza/go-dockerclient"
)

func container(image string, env []string, labels map[string]string, ports map[dockerapi.Port][]dockerapi.PortBinding) *dockerapi.Container {
	return &dockerapi.Container{
		Name:            "/shop_web_1",
		Config:          &dockerapi.Config{Image: image, Env: env, Labels: labels},
		NetworkSettings: &dockerapi.NetworkSettings{Ports: ports},
	}
}

func bind(ip, port string) []dockerapi.PortBinding {
	return []dockerapi.PortBinding{{HostIP: ip, HostPort: port}}
}

func TestServices(t *testing.T) {
	gw := "198.18.150.1"
	tests := []struct {
		name   string
		c      *dockerapi.Container
		hostIP string
		want   []service
	}{
		{
			name: "SERVICE_NAME, published on one address",
			c: container("example/web:1.2", []string{"SERVICE_NAME=web", "PATH=/bin"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{"80/tcp": bind(gw, "32768")}),
			want: []service{{ID: "h:shop_web_1:80", Name: "web", Address: gw, Port: 32768}},
		},
		{
			name: "no name: the image's base name",
			c: container("registry.example:5000/team/redis:7", nil, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{"6379/tcp": bind(gw, "32769")}),
			want: []service{{ID: "h:shop_web_1:6379", Name: "redis", Address: gw, Port: 32769}},
		},
		{
			name: "several ports: suffixed unless SERVICE_<port>_NAME",
			c: container("x", []string{"SERVICE_NAME=db", "SERVICE_8080_NAME=db-admin"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{
					"8080/tcp": bind(gw, "40001"),
					"5432/tcp": bind(gw, "40000"),
				}),
			want: []service{
				{ID: "h:shop_web_1:5432", Name: "db-5432", Address: gw, Port: 40000},
				{ID: "h:shop_web_1:8080", Name: "db-admin", Address: gw, Port: 40001},
			},
		},
		{
			name: "exposed but not published: nothing",
			c: container("x", []string{"SERVICE_NAME=web"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{"80/tcp": nil}),
		},
		{
			name: "every address: -ip replaces it",
			c: container("x", []string{"SERVICE_NAME=web"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{"80/tcp": {{HostIP: "0.0.0.0", HostPort: "32770"}, {HostIP: "::", HostPort: "32770"}}}),
			hostIP: "198.18.150.1",
			want:   []service{{ID: "h:shop_web_1:80", Name: "web", Address: gw, Port: 32770}},
		},
		{
			name: "every address and no -ip: kept as published",
			c: container("x", []string{"SERVICE_NAME=web"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{"80/tcp": bind("0.0.0.0", "32770")}),
			want: []service{{ID: "h:shop_web_1:80", Name: "web", Address: "0.0.0.0", Port: 32770}},
		},
		{
			name: "labels, the environment winning; tags with an escaped comma",
			c: container("x", []string{"SERVICE_NAME=from-env"},
				map[string]string{"SERVICE_NAME": "from-label", "SERVICE_TAGS": `a,b\,c,,d`},
				map[dockerapi.Port][]dockerapi.PortBinding{"80/tcp": bind(gw, "1")}),
			want: []service{{ID: "h:shop_web_1:80", Name: "from-env", Address: gw, Port: 1, Tags: []string{"a", "b,c", "d"}}},
		},
		{
			name: "SERVICE_<port>_IGNORE skips that port only; udp is marked",
			c: container("x", []string{"SERVICE_NAME=dns", "SERVICE_53_IGNORE=1", "SERVICE_5353_NAME=mdns"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{
					"53/tcp":   bind(gw, "2"),
					"5353/udp": bind(gw, "3"),
				}),
			want: []service{{ID: "h:shop_web_1:5353:udp", Name: "mdns", Address: gw, Port: 3, Tags: []string{"udp"}}},
		},
		{
			name: "another port's variables do not apply",
			c: container("img", []string{"SERVICE_81_NAME=other"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{"80/tcp": bind(gw, "4")}),
			want: []service{{ID: "h:shop_web_1:80", Name: "img", Address: gw, Port: 4}},
		},
		{
			name: "SERVICE_IGNORE skips the container",
			c: container("x", []string{"SERVICE_IGNORE=true"}, nil,
				map[dockerapi.Port][]dockerapi.PortBinding{"80/tcp": bind(gw, "5")}),
		},
		{name: "no network settings", c: &dockerapi.Container{Config: &dockerapi.Config{}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := services(tt.c, "h", tt.hostIP)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v; want %+v", got, tt.want)
			}
		})
	}
}
