# Builds the `llmq` and `mock-provider` binaries; one image serves every llmq service.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p llmq-worker -p llmq-mock-provider \
 && cp target/release/llmq target/release/mock-provider /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/llmq /usr/local/bin/mock-provider /usr/local/bin/
COPY migrations /app/migrations
WORKDIR /app
USER nobody
CMD ["llmq", "--help"]
