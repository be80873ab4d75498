# Multi-stage build of the connectable image. Needs a registry for the base
# images; on an engine without one, scripts/local-image.sh builds an
# equivalent image from this host's files (make local-image).
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /connectable .

# Debian's iptables package ships both backends (iptables-nft and
# iptables-legacy); connectable picks the one the host uses (--iptables).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
	&& rm -rf /var/lib/apt/lists/*
COPY --from=build /connectable /connectable
ENTRYPOINT ["/connectable"]
