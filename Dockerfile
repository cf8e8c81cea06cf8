# syncq: the `syncq` binary (worker, migrate, demo, operator commands).
# Build stage: the offline query data in .sqlx/ means no database is needed.
FROM rust:1-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true
COPY Cargo.toml Cargo.lock ./
COPY .sqlx .sqlx
COPY migrations migrations
COPY src src
COPY README.md README.md
COPY docs docs
RUN cargo build --release --locked --bin syncq

# Runtime stage: the binary alone, as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 syncq
COPY --from=build /src/target/release/syncq /usr/local/bin/syncq
USER syncq
ENTRYPOINT ["syncq"]
CMD ["worker"]
