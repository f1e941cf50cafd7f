# Herald, built in one stage and run from a slim one.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin herald

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER herald
ENV HERALD_HTTP_ADDR=0.0.0.0:4000
EXPOSE 4000
# Ready as `herald check --running` sees it: the node answers /readyz, PostgreSQL and its migrations,
# and every RabbitMQ node (README, "Running it as a service").
HEALTHCHECK --interval=15s --timeout=10s --start-period=20s --retries=3 CMD ["herald", "check", "--running"]
ENTRYPOINT ["herald"]
CMD ["serve"]
