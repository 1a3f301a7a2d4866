# A static portcullis binary on a minimal, non-root base image.
FROM rust:1.90-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portcullis

# distroless/static: CA certificates for provider TLS, no shell, uid 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/release/portcullis /portcullis
USER 65532:65532
EXPOSE 8080 9464
ENTRYPOINT ["/portcullis"]
CMD ["run"]
