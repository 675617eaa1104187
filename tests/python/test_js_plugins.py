"""JavaScript plugins, end to end: `wisp plugin new --lang js` and `wisp plugin build --install`
with the pinned componentize-js, served by the real server; the sentence_split example against
the same code run by Node; the sandbox against a hostile JavaScript plugin (a loop, a memory bomb,
a network fetch, /etc/passwd through the host's tokenizer, an exception).
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from conftest import REPO_ROOT, run_wisp
from test_encoder import text_input
from test_python_plugins import wisp

HOSTILE = Path(__file__).parent / "plugins" / "hostile_js"
SPLIT = REPO_ROOT / "plugins" / "js" / "sentence_split"
TEXTS = ["Dr. Smith met J. Doe at 5 p.m. It rained! Did it? Yes.", "Ein Satz. 日本語です。はい！",
         "Wait... what?! \"Quoted.\" Next (aside.) Done", "no end at all"]


def split_with_node(texts):
    """sentence_split's own split(), run by Node with the SDK's names stubbed."""
    script = """
globalThis.InvalidInput = class extends Error {};
globalThis.WispModel = class {};
globalThis.Tensor = {};
globalThis.exportModel = (c) => c;
const fs = require("fs");
const source = fs.readFileSync(process.argv[1], "utf8").replace("export const model", "globalThis.model");
eval(source + "\\nglobalThis.split = split;");
console.log(JSON.stringify(JSON.parse(process.argv[2]).map((t) => split(t, 256))));
"""
    out = subprocess.run(["node", "-e", script, str(SPLIT / "app.js"), json.dumps(texts)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("js")
    repo = root / "repository"
    wisp("plugin", "new", "scalejs", "--lang", "js", "--dir", root / "scalejs")
    wisp("plugin", "build", root / "scalejs", "--install", repo / "scalejs")
    for name, source in (("sentence_split", SPLIT), ("hostile_js", HOSTILE)):
        shutil.copytree(source, root / f"{name}_src")
        wisp("plugin", "build", root / f"{name}_src", "--install", repo / name)
    # Three JavaScript engines to compile (tens of seconds each, unoptimised, with a cold cache).
    with run_wisp(root, repository=repo, ready_timeout=300) as s:
        yield s


def test_the_js_template_builds_and_serves(server):
    data = httpclient.InferInput("INPUT0", [1, 3], "FP32")
    data.set_data_from_numpy(np.array([[1, 2, 3]], np.float32))
    with server.client() as client:
        np.testing.assert_array_equal(client.infer("scalejs", [data]).as_numpy("OUTPUT0"), [[2.5, 5.0, 7.5]])
    assert "scalejs v1 ready: factor 2.5" in server.log()


def test_sentence_split_equals_node(server):
    with server.client() as client:
        got = client.infer("sentence_split", [text_input("TEXT", TEXTS)]).as_numpy("SENTENCES")
    got = [json.loads(g[0]) for g in got]
    assert got == split_with_node(TEXTS)
    assert got[1] == ["Ein Satz.", "日本語です。", "はい！"]


def attack(server, kind):
    text = httpclient.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x"], dtype=object))
    with server.client() as client:
        return client.infer("hostile_js", [text], parameters=None if kind is None else {"attack": kind})


@pytest.mark.parametrize("kind, message", [
    ("loop", "execution deadline of 2000 ms exceeded"),
    ("memory", "memory limit"),
    # No wasi:http in the component or the sandbox: the engine's fetch traps, and the
    # instance is replaced.
    ("fetch", "wasm trap"),
    ("passwd", "tokenizer path '/etc/passwd' is not a file inside the version folder"),
    ("throw", "TypeError: bad luck"),
])
def test_the_sandbox_holds_against_javascript(server, kind, message):
    with pytest.raises(Exception) as err:
        attack(server, kind)
    assert message in str(err.value), err.value
    assert attack(server, None).as_numpy("OUT")[0].decode() == "x"
