"""Python plugins, end to end: `wisp plugin new` and `wisp plugin build --install` with the
pinned componentize-py, served by the real server; the text_clean example in the default
repository's minilm_embed_clean pipeline against the same code run natively; the sandbox against
a hostile Python plugin (a loop, a memory bomb, /etc/passwd, a socket); and bad plugins with
clear errors. A Rust plugin from `wisp plugin new --lang rust` too.
"""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from conftest import REPO_ROOT, copy_model_repository, run_wisp, wisp_bin
from test_encoder import text_input

HOSTILE = Path(__file__).parent / "plugins" / "hostile_py"


def wisp(*args, check=True):
    result = subprocess.run([str(wisp_bin()), *map(str, args)], capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def plugin_natively(name):
    """plugins/python/NAME/app.py run by this interpreter (the SDK's export stubbed), so tests can
    check a served plugin against its own code."""
    sys.path.insert(0, str(REPO_ROOT / "plugins" / "python" / "sdk"))
    import wisp_plugin

    export = wisp_plugin.export
    wisp_plugin.export = lambda cls: cls
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_app",
                                                      REPO_ROOT / f"plugins/python/{name}/app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        wisp_plugin.export = export
    return module


def test_new_python_plugin_builds_installs_and_serves(tmp_path):
    wisp("plugin", "new", "scaler", "--lang", "python", "--dir", tmp_path / "scaler")
    repo = tmp_path / "repository"
    wisp("plugin", "build", tmp_path / "scaler", "--install", repo / "scaler")
    assert (repo / "scaler" / "1" / "model.wasm").stat().st_size > 1 << 20
    with run_wisp(tmp_path, repository=repo) as server:
        data = httpclient.InferInput("INPUT0", [1, 3], "FP32")
        data.set_data_from_numpy(np.array([[1, 2, 3]], np.float32))
        with server.client() as client:
            out = client.infer("scaler", [data]).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(out, [[2.5, 5.0, 7.5]])
        assert "scaler v1 ready: factor 2.5" in server.log()


def test_text_clean_pipeline_equals_the_code_run_natively(tmp_path):
    native = plugin_natively("text_clean")
    texts = ["Mail jane.doe@example.com or call +44 20 7946 0958", "ﬁne\u200b  text\twith\ncontrols",
             "card 4111 1111 1111 1111 and https://example.com/x?y=1", "nothing to hide"]
    want = [native.clean(t, True, False) for t in texts]
    assert want[0] == "Mail [EMAIL] or call [PHONE]" and want[2] == "card [CARD] and [URL]"
    repo = copy_model_repository(tmp_path)
    models = ("text_clean", "minilm_embed_tokenizer", "minilm_embed_encoder", "minilm_embed",
              "minilm_embed_clean")
    with run_wisp(tmp_path, repository=repo, mode="explicit", load_models=models) as server:
        with server.client() as client:
            got = client.infer("text_clean", [text_input("TEXT", texts)]).as_numpy("CLEAN")
            assert [g[0].decode() for g in got] == want
            lower = client.infer("text_clean", [text_input("TEXT", texts[:1])],
                                 parameters={"lowercase": True}).as_numpy("CLEAN")
            assert lower[0][0].decode() == want[0].lower()
            # The pipeline embeds the cleaned texts: the same as embedding them directly.
            piped = client.infer("minilm_embed_clean", [text_input("TEXT", texts)]).as_numpy("EMBEDDING")
            direct = client.infer("minilm_embed", [text_input("TEXT", want)]).as_numpy("EMBEDDING")
            np.testing.assert_array_equal(piped, direct)


def install_hostile(root, model):
    """Builds the hostile plugin from a copy of its folder into `model`."""
    source = root / "hostile_src"
    if not source.exists():
        shutil.copytree(HOSTILE, source)
    wisp("plugin", "build", source, "--install", model)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    repo = root / "repository"
    install_hostile(root, repo / "hostile_py")
    with run_wisp(root, repository=repo) as server:
        yield server


def attack(server, kind):
    text = httpclient.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x"], dtype=object))
    with server.client() as client:
        return client.infer("hostile_py", [text],
                            parameters=None if kind is None else {"attack": kind})


@pytest.mark.parametrize("kind, message", [
    ("loop", "execution deadline of 2000 ms exceeded"),
    ("memory", "memory limit"),
    ("passwd", "FileNotFoundError"),
    ("socket", "Error"),
    ("raise", "ValueError: bad luck"),
])
def test_the_sandbox_holds_against_python(hostile, kind, message):
    with pytest.raises(Exception) as err:
        attack(hostile, kind)
    assert message in str(err.value), err.value
    # The server and the model keep serving (a broken instance is rebuilt).
    assert attack(hostile, None).as_numpy("OUT")[0].decode() == "x"


def test_bad_python_plugins_give_clear_errors(tmp_path):
    # No Model class: the build says so.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "app.py").write_text("import wisp_plugin\n")
    result = wisp("plugin", "build", tmp_path / "empty", check=False)
    assert result.returncode != 0 and "Model" in result.stderr, result.stderr
    # An init that raises: the model is unavailable, with the reason.
    repo = tmp_path / "repository"
    install_hostile(tmp_path, repo / "fails")
    config = repo / "fails" / "config.toml"
    config.write_text(config.read_text() + "\n[parameters]\nfail_init = true\n")
    with run_wisp(tmp_path, repository=repo, mode="explicit") as server:
        # A load compiles the component (seconds, unoptimised, where the cache is cold).
        with httpclient.InferenceServerClient(server.url, network_timeout=300) as client:
            with pytest.raises(Exception) as err:
                client.load_model("fails")
        assert "init refuses on purpose" in str(err.value), err.value
    # Not a plugin folder.
    result = wisp("plugin", "build", tmp_path, check=False)
    assert result.returncode != 0 and "no Cargo.toml (Rust), app.py (Python) or app.js (JavaScript)" in result.stderr


def test_new_rust_plugin_builds_installs_and_serves(tmp_path):
    wisp("plugin", "new", "scale_rs", "--lang", "rust", "--dir", tmp_path / "scale_rs")
    repo = tmp_path / "repository"
    wisp("plugin", "build", tmp_path / "scale_rs", "--install", repo / "scale_rs")
    with run_wisp(tmp_path, repository=repo) as server:
        data = httpclient.InferInput("INPUT0", [1, 2], "FP32")
        data.set_data_from_numpy(np.array([[2, 4]], np.float32))
        with server.client() as client:
            np.testing.assert_array_equal(client.infer("scale_rs", [data]).as_numpy("OUTPUT0"), [[5.0, 10.0]])
    result = wisp("plugin", "new", "scale_rs", "--lang", "rust", "--dir", tmp_path / "scale_rs", check=False)
    assert result.returncode != 0 and "exists" in result.stderr
