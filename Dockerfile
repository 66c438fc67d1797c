# syntax=docker/dockerfile:1
# Release image: build with the Rust toolchain, run on a slim Debian as a non-root user.

FROM rust:1.95-slim-bookworm AS build
# The global allocator, jemalloc, is built from C source by its configure script and make (the
# slim image has gcc but not make).
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The built-in page is compiled into the binary (include_str!).
COPY static ./static
COPY postgresql ./postgresql
COPY tests ./tests
# The load generator is a member of the workspace: cargo reads its manifest, but only the
# service's package is built.
COPY bench ./bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package event-piper --bin event-piper \
    && cp target/release/event-piper /usr/local/bin/event-piper

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin event-piper
COPY --from=build /usr/local/bin/event-piper /usr/local/bin/event-piper
USER event-piper
# In a container the service must listen on all interfaces; DATABASE_URL comes from the
# environment (see docker-compose.yml). Without it the service would try to run a PostgreSQL of
# its own, which this image does not ship.
ENV EVENT_PIPER_LISTEN=0.0.0.0:4000
EXPOSE 4000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/event-piper"]
