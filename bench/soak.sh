#!/usr/bin/env bash
# Soak and overload benchmark (bench/soak.py): starts `wisp serve` on 127.0.0.1 (free ports),
# measures the peak of a mixed load (simple, minilm_embed, simple_string_dyna_sequence, ensemble_add_sub,
# malformed requests), then runs it open-loop at 80 % of peak for --duration s (600) and at 2x
# peak for --overload-duration s (120). Reports errors, p99 over time and the server's RSS;
# writes bench-results/soak.json (--json). Arguments go to soak.py (--help lists them), e.g.
#   bench/soak.sh --duration 40 --overload-duration 20      # a smoke run
# The binary: $WISP_BIN, else target/release/wisp, else target/debug/wisp. Needs the plugins
# (scripts/build-plugins.sh) and the MiniLM weights (scripts/fetch-models.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# Standard library only (its HTTP client is bench/loopback_http.py).
exec python3 bench/soak.py "$@"
