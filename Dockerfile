# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain, run on a small Debian
# image as a non-root user.
#   docker build -t qualia-webhook .
#   docker run -p 8000:8000 -v qw-data:/var/lib/qualia-webhook/data --env-file .env qualia-webhook

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked --bin qualia-webhook --bin qualia-standin

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/qualia-webhook qualia \
 && mkdir -p /var/lib/qualia-webhook/data \
 && chown -R qualia:qualia /var/lib/qualia-webhook
COPY --from=build /src/target/release/qualia-webhook /src/target/release/qualia-standin /usr/local/bin/
USER qualia
WORKDIR /var/lib/qualia-webhook
ENV BIND=0.0.0.0:8000 \
    STORE=sqlite:///var/lib/qualia-webhook/data/qualia-webhook.db
VOLUME ["/var/lib/qualia-webhook/data"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["qualia-webhook", "health", "--url", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["qualia-webhook"]
CMD ["serve"]
