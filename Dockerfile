# pgvalve container image: build with cargo, run the single static-ish binary on Debian slim.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin pgvalve

FROM debian:bookworm-slim
RUN useradd --system --no-create-home pgvalve
COPY --from=build /src/target/release/pgvalve /usr/local/bin/pgvalve
COPY config/pgvalve.toml /etc/pgvalve/pgvalve.toml
USER pgvalve
EXPOSE 6432 9930
# Configure with a file (-c /etc/pgvalve/pgvalve.toml) or with PGVALVE_* environment
# variables, e.g. PGVALVE_UPSTREAM=postgres://user:password@db:5432 PGVALVE_LISTEN=0.0.0.0:6432
ENTRYPOINT ["pgvalve"]
CMD ["run"]
