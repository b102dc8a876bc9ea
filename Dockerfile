# syntax=docker/dockerfile:1
#
# ScopeHold image: /scopehold (controller, node plugin, crdgen) and
# /kubectl-scopehold, both static musl binaries, on distroless (no shell, no
# package manager), running as 65532:65532 by default. The node plugin's
# DaemonSet overrides the user to root (it mounts tmpfs); see the Helm chart.
#
# NOT BUILT HERE: the development machines have the docker CLI but no Docker
# engine, so this file has never been built as an image. What was checked is the
# build stage's cargo command on the host (Debian bookworm, apt musl-tools,
# `rustup target add x86_64-unknown-linux-musl`, CC_x86_64_unknown_linux_musl=
# musl-gcc): it produced static-pie `scopehold` and `kubectl-scopehold` binaries
# that run (5 min warm, 22 min cold on 2 shared cores). Unchecked: the base
# images, the BuildKit cache mounts, and the image running in a cluster.
# Build with BuildKit:
#   docker build -t ghcr.io/scopehold/scopehold:dev .

ARG RUST_VERSION=1

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# musl-tools provides musl-gcc: `ring` (rustls' crypto) compiles C and assembly
# in its build script, and for the musl target that needs a musl C compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
# build.rs compiles the protos with protox (pure Rust): no protoc needed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --target x86_64-unknown-linux-musl \
      --bin scopehold --bin kubectl-scopehold \
 && mkdir -p /out \
 && cp target/x86_64-unknown-linux-musl/dist/scopehold /out/scopehold \
 && cp target/x86_64-unknown-linux-musl/dist/kubectl-scopehold /out/kubectl-scopehold

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="scopehold" \
      org.opencontainers.image.description="Scoped, audited, revocable secrets for coding agents in Kubernetes" \
      org.opencontainers.image.source="https://github.com/scopehold/scopehold" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/scopehold /scopehold
COPY --from=build /out/kubectl-scopehold /kubectl-scopehold
USER 65532:65532
ENTRYPOINT ["/scopehold"]
