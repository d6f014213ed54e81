# syntax=docker/dockerfile:1
# One image for every role: `herald ingress | delivery | operator | ...` (the Helm chart
# runs it with different arguments). Build: docker build -t herald:dev .

FROM rust:1.95-bookworm AS build
# aws-lc-sys (rustls' crypto) builds C code; cmake and clang cover its fallbacks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# --ignore-rust-version: mail-parser declares rust-version 1.98 but builds and passes its
# tests on 1.95 (README). protoc comes vendored with the build (protoc-bin-vendored).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --ignore-rust-version -p herald \
 && install -D -m 0755 target/release/herald /out/herald

# glibc, libgcc and CA certificates, no shell, no package manager; user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/herald /usr/local/bin/herald
USER 65532:65532
# Submission (STARTTLS, implicit TLS), optional port-25 listener, admin endpoint, reports API
# (HTTP, gRPC): all above 1024, so no capability is needed; the Service maps SMTP to 587/465/25.
EXPOSE 2587 2465 2525 9090 8080 50051
ENTRYPOINT ["/usr/local/bin/herald"]
CMD ["--help"]
