# Build: docker build -t sfu-server .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p sfu-server

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 sfu
COPY --from=build /src/target/release/sfu-server /usr/local/bin/sfu-server
USER sfu
ENV SFU_HTTP_ADDR=0.0.0.0:7880 SFU_MEDIA_ADDR=0.0.0.0:7882
EXPOSE 7880/tcp 7882/udp
ENTRYPOINT ["/usr/local/bin/sfu-server"]
