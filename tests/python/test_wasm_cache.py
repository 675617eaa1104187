"""The Wasm compilation cache, end to end: the real server compiles each component once into
--wasm-cache-dir, loads it from there on the next start (and still serves), recompiles an entry
that was damaged, and refuses a cache folder that others may write (the server runs code from it).
"""

import os
import re
import subprocess

import numpy as np

from conftest import copy_model_repository, run_wisp, wisp_bin
from test_encoder import text_input

MODELS = ("minilm_embed_tokenizer", "simple")


def origins(log):
    """model → how its component was loaded ("compiled" or "cached"), from the server log."""
    return dict(re.findall(r'model=(\w+):1 .*?component="(\w+)"', log))


def embed_tokens(server):
    with server.client() as client:
        return client.infer("minilm_embed_tokenizer", [text_input("TEXT", ["a cached tokenizer"])]) \
            .as_numpy("input_ids")


def test_components_compile_once_and_load_from_the_cache(tmp_path):
    repo = copy_model_repository(tmp_path)
    for run in ("first", "second", "third"):
        (tmp_path / run).mkdir()
    cache = tmp_path / "cache"
    args = ["--wasm-cache-dir", str(cache)]
    with run_wisp(tmp_path / "first", repository=repo, mode="explicit", load_models=MODELS,
                  extra_args=args) as server:
        first = origins(server.log())
        ids = embed_tokens(server)
    assert first == {m: "compiled" for m in MODELS}, first
    entries = sorted(cache.iterdir())
    assert len(entries) == 2 and all(e.suffix == ".cwasm" for e in entries), entries
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    with run_wisp(tmp_path / "second", repository=repo, mode="explicit", load_models=MODELS,
                  extra_args=args) as server:
        assert origins(server.log()) == {m: "cached" for m in MODELS}, server.log()
        np.testing.assert_array_equal(embed_tokens(server), ids)
    # A damaged entry is compiled again (and replaced), not trusted.
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:1000])
    with run_wisp(tmp_path / "third", repository=repo, mode="explicit", load_models=MODELS,
                  extra_args=args) as server:
        assert origins(server.log()) == {m: "compiled" for m in MODELS}, server.log()
        np.testing.assert_array_equal(embed_tokens(server), ids)
    assert all(e.stat().st_size > 1000 for e in entries)


def test_a_cache_folder_others_may_write_is_refused(tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)
    result = subprocess.run(
        [str(wisp_bin()), "serve", "--model-repository", str(tmp_path), "--http-port", "0",
         "--wasm-cache-dir", str(cache)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--wasm-cache-dir" in result.stderr and "writable by group or others" in result.stderr, \
        result.stderr
