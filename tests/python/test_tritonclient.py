"""End-to-end tests of wisp with the real `tritonclient[http]` package.

The flows follow Triton's own Python client examples (simple_http_infer_client.py,
simple_http_async_infer_client.py, simple_http_string_infer_client.py, ...), run
against the real wisp binary (see conftest.py).
"""

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import REPO_ROOT
from sequence_examples import expected_sequence_outputs, sequence_plan


# Every model folder of the default repository (a folder with a config.toml).
DEFAULT_MODELS = {p.name for p in (REPO_ROOT / "model_repository").iterdir()
                  if (p / "config.toml").is_file()}
assert {"simple", "minilm_embed", "topic_classify", "text_clean"} <= DEFAULT_MODELS


# ---------------------------------------------------------------- helpers


def simple_inputs(in0, in1, binary_data=True):
    inputs = [
        httpclient.InferInput("INPUT0", list(in0.shape), "INT32"),
        httpclient.InferInput("INPUT1", list(in1.shape), "INT32"),
    ]
    inputs[0].set_data_from_numpy(in0, binary_data=binary_data)
    inputs[1].set_data_from_numpy(in1, binary_data=binary_data)
    return inputs


def simple_outputs(binary_data=True):
    return [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_data),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary_data),
    ]


def random_int32(rng, shape):
    return rng.integers(-1000, 1000, size=shape, dtype=np.int32)


def assert_simple_result(result, in0, in1):
    out0 = result.as_numpy("OUTPUT0")
    out1 = result.as_numpy("OUTPUT1")
    assert out0 is not None and out1 is not None, result.get_response()
    assert out0.dtype == np.int32 and out1.dtype == np.int32
    assert out0.shape == in0.shape and out1.shape == in0.shape
    np.testing.assert_array_equal(out0, in0 + in1)
    np.testing.assert_array_equal(out1, in0 - in1)


def as_bytes(x):
    """BYTES outputs come back as bytes (binary) or str (JSON)."""
    return x.encode("utf-8") if isinstance(x, str) else bytes(x)


def stats_for(client, model):
    stats = client.get_inference_statistics(model_name=model)
    entries = stats["model_stats"]
    assert len(entries) == 1, stats
    assert entries[0]["name"] == model
    return entries[0]


# ---------------------------------------------------------------- 1. server


def test_server_live_ready_metadata(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    meta = client.get_server_metadata()
    assert meta["name"] == "wisp"
    assert isinstance(meta["version"], str) and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


# ---------------------------------------------------------------- 2. simple


@pytest.mark.parametrize(
    "binary_in,binary_out",
    [(True, True), (False, False), (True, False), (False, True)],
    ids=["binary", "json", "binary-in-json-out", "json-in-binary-out"],
)
def test_simple_infer(client, binary_in, binary_out):
    rng = np.random.default_rng(1)
    in0 = random_int32(rng, (1, 16))
    in1 = random_int32(rng, (1, 16))
    result = client.infer(
        "simple", simple_inputs(in0, in1, binary_in), outputs=simple_outputs(binary_out)
    )
    assert_simple_result(result, in0, in1)
    response = result.get_response()
    assert response["model_name"] == "simple"
    by_name = {o["name"]: o for o in response["outputs"]}
    assert set(by_name) == {"OUTPUT0", "OUTPUT1"}
    for o in by_name.values():
        assert o["datatype"] == "INT32"
        assert o["shape"] == [1, 16]
        if binary_out:
            assert o["parameters"]["binary_data_size"] == 16 * 4
            assert "data" not in o
        else:
            assert "binary_data_size" not in o.get("parameters", {})


def test_simple_infer_batch_of_3(client):
    rng = np.random.default_rng(3)
    in0 = random_int32(rng, (3, 16))
    in1 = random_int32(rng, (3, 16))
    for binary in (True, False):
        result = client.infer("simple", simple_inputs(in0, in1, binary), outputs=simple_outputs(binary))
        assert_simple_result(result, in0, in1)


def test_simple_infer_max_batch(client):
    rng = np.random.default_rng(8)
    in0 = random_int32(rng, (8, 16))
    in1 = random_int32(rng, (8, 16))
    assert_simple_result(client.infer("simple", simple_inputs(in0, in1), outputs=simple_outputs()), in0, in1)


def test_simple_infer_no_outputs_requested(client):
    """No outputs named: tritonclient asks for every output in binary (binary_data_output)."""
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.full((1, 16), 7, dtype=np.int32)
    result = client.infer("simple", simple_inputs(in0, in1))
    assert_simple_result(result, in0, in1)
    for o in result.get_response()["outputs"]:
        assert o["parameters"]["binary_data_size"] == 64


def test_simple_infer_one_output_requested(client):
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.full((1, 16), 2, dtype=np.int32)
    result = client.infer(
        "simple", simple_inputs(in0, in1), outputs=[httpclient.InferRequestedOutput("OUTPUT1")]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), in0 - in1)


@pytest.mark.parametrize(
    "request_compression,response_compression",
    [("gzip", None), ("deflate", None), (None, "gzip"), (None, "deflate"), ("gzip", "gzip")],
)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_simple_infer_compression(client, request_compression, response_compression, binary):
    rng = np.random.default_rng(5)
    in0 = random_int32(rng, (2, 16))
    in1 = random_int32(rng, (2, 16))
    result = client.infer(
        "simple",
        simple_inputs(in0, in1, binary),
        outputs=simple_outputs(binary),
        request_compression_algorithm=request_compression,
        response_compression_algorithm=response_compression,
    )
    assert_simple_result(result, in0, in1)


def test_simple_infer_with_version_and_request_id(client):
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.arange(16, 32, dtype=np.int32).reshape(1, 16)
    result = client.infer(
        "simple", simple_inputs(in0, in1), outputs=simple_outputs(), model_version="1", request_id="req-42"
    )
    assert_simple_result(result, in0, in1)
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_version"] == "1"


# ---------------------------------------------------------------- 3. simple_string


def string_inputs(in0, in1, binary):
    def to_bytes(a):
        return np.array([str(x).encode("utf-8") for x in a.reshape(a.size)], dtype=np.object_).reshape(a.shape)

    data0, data1 = to_bytes(in0), to_bytes(in1)
    inputs = [
        httpclient.InferInput("INPUT0", list(data0.shape), "BYTES"),
        httpclient.InferInput("INPUT1", list(data1.shape), "BYTES"),
    ]
    inputs[0].set_data_from_numpy(data0, binary_data=binary)
    inputs[1].set_data_from_numpy(data1, binary_data=binary)
    return inputs


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_simple_string_infer(client, binary):
    # As in Triton's simple_http_string_infer_client.py, plus negatives and a batch of 2.
    in0 = np.arange(0, 32, dtype=np.int32).reshape(2, 16) - 10
    in1 = np.ones((2, 16), dtype=np.int32) * np.array([[1], [-25]], dtype=np.int32)
    result = client.infer(
        "simple_string",
        string_inputs(in0, in1, binary),
        outputs=[
            httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
            httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary),
        ],
    )
    out0 = result.as_numpy("OUTPUT0")
    out1 = result.as_numpy("OUTPUT1")
    assert out0.shape == (2, 16) and out1.shape == (2, 16)
    for o in result.get_response()["outputs"]:
        assert o["datatype"] == "BYTES"
    for b in range(2):
        for i in range(16):
            assert int(as_bytes(out0[b][i]).decode()) == in0[b][i] + in1[b][i]
            assert int(as_bytes(out1[b][i]).decode()) == in0[b][i] - in1[b][i]


# ---------------------------------------------------------------- 4. simple_identity


IDENTITY_ELEMENTS = ["héllo wörld", "", "日本語テキスト", "emoji 🚀", "", "plain ascii"]


def identity_infer(client, data, binary, **kwargs):
    inp = httpclient.InferInput("INPUT0", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data, binary_data=binary)
    return client.infer(
        "simple_identity",
        [inp],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)],
        **kwargs,
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_identity_utf8_and_empty(client, binary):
    data = np.array([[s.encode("utf-8") for s in IDENTITY_ELEMENTS]], dtype=np.object_)
    result = identity_infer(client, data, binary)
    out = result.as_numpy("OUTPUT0")
    assert out.shape == data.shape
    assert [as_bytes(x) for x in out.reshape(-1)] == [s.encode("utf-8") for s in IDENTITY_ELEMENTS]
    (meta,) = result.get_response()["outputs"]
    assert meta["datatype"] == "BYTES" and meta["shape"] == list(data.shape)


def test_identity_arbitrary_bytes_binary(client):
    """BYTES tensors are byte strings: non-UTF-8 bytes and NULs survive the binary extension."""
    elements = [b"\xff\xfe\x00\x01", b"", b"\x00", bytes(range(256))]
    data = np.array([elements, elements[::-1]], dtype=np.object_)
    result = identity_infer(client, data, binary=True)
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (2, 4)
    assert [bytes(x) for x in out.reshape(-1)] == elements + elements[::-1]


def test_identity_echoes_parameters(client):
    data = np.array([[b"a", b"b"]], dtype=np.object_)
    result = identity_infer(client, data, binary=True, parameters={"my_key": "v", "n": 3, "flag": True})
    params = result.get_response()["parameters"]
    assert params["my_key"] == "v"
    assert params["n"] == 3 and not isinstance(params["n"], bool)
    assert params["flag"] is True
    assert [bytes(x) for x in result.as_numpy("OUTPUT0").reshape(-1)] == [b"a", b"b"]


# ---------------------------------------------------------------- 5. metadata, config, stats


def test_model_metadata(client):
    meta = client.get_model_metadata("simple")
    assert meta["name"] == "simple"
    assert "1" in meta["versions"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("OUTPUT0", "INT32", [-1, 16]),
        ("OUTPUT1", "INT32", [-1, 16]),
    ]
    assert client.get_model_metadata("simple", model_version="1")["name"] == "simple"

    ident = client.get_model_metadata("simple_identity")
    assert [(t["name"], t["datatype"], t["shape"]) for t in ident["inputs"]] == [("INPUT0", "BYTES", [-1, -1])]


def test_model_config(client):
    config = client.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["max_batch_size"] == 8
    assert config["backend"] == "wasm"
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("INPUT0", "TYPE_INT32", [16]),
        ("INPUT1", "TYPE_INT32", [16]),
    ]
    assert [(t["name"], t["data_type"]) for t in config["output"]] == [
        ("OUTPUT0", "TYPE_INT32"),
        ("OUTPUT1", "TYPE_INT32"),
    ]
    groups = config["instance_group"]
    assert sum(int(g["count"]) for g in groups) == 2
    assert all(g["kind"] == "KIND_CPU" for g in groups)

    string_config = client.get_model_config("simple_string")
    assert [t["data_type"] for t in string_config["input"]] == ["TYPE_STRING", "TYPE_STRING"]


def test_model_ready(client):
    for model in ("simple", "simple_string", "simple_identity"):
        assert client.is_model_ready(model) is True
    assert client.is_model_ready("simple", model_version="1") is True
    assert client.is_model_ready("simple", model_version="2") is False
    assert client.is_model_ready("no_such_model") is False


def test_statistics_after_infers(client):
    before = stats_for(client, "simple")
    batch_sizes = [1, 3, 2, 1, 8]
    rng = np.random.default_rng(11)
    for n in batch_sizes:
        in0 = random_int32(rng, (n, 16))
        in1 = random_int32(rng, (n, 16))
        assert_simple_result(client.infer("simple", simple_inputs(in0, in1), outputs=simple_outputs()), in0, in1)
    after = stats_for(client, "simple")

    def success(s):
        return int(s["inference_stats"]["success"]["count"])

    assert after["version"] == "1"
    assert success(after) - success(before) == len(batch_sizes)
    assert success(after) >= len(batch_sizes)
    assert int(after["inference_count"]) - int(before["inference_count"]) == sum(batch_sizes)
    assert int(after["inference_count"]) >= sum(batch_sizes)
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert 1 <= executions <= len(batch_sizes)
    assert int(after["last_inference"]) > 0
    assert int(after["inference_stats"]["success"]["ns"]) > int(before["inference_stats"]["success"]["ns"])
    batches = {int(b["batch_size"]): b for b in after["batch_stats"]}
    for n in set(batch_sizes):
        assert n in batches, after["batch_stats"]
        assert int(batches[n]["compute_infer"]["count"]) >= 1

    all_stats = client.get_inference_statistics()
    names = {s["name"] for s in all_stats["model_stats"]}
    assert names == DEFAULT_MODELS


def test_statistics_count_failures(client):
    before = stats_for(client, "simple")
    bad = httpclient.InferInput("INPUT0", [1, 16], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    with pytest.raises(InferenceServerException):
        client.infer("simple", [bad])  # INPUT1 missing
    after = stats_for(client, "simple")
    assert int(after["inference_stats"]["success"]["count"]) == int(before["inference_stats"]["success"]["count"])


# ---------------------------------------------------------------- 6. errors


def test_unknown_model(client):
    in0 = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("no_such_model_xyz", simple_inputs(in0, in0))
    # Triton's answer, which its examples check (simple_http_infer_client.py and others).
    assert exc.value.message() == "Request for unknown model: 'no_such_model_xyz' is not found"
    assert exc.value.status() == "400"

    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("no_such_model_xyz")
    assert exc.value.message().startswith("Request for unknown model")
    assert exc.value.status() == "400"


def test_wrong_shape(client):
    in0 = np.zeros((1, 15), dtype=np.int32)
    in1 = np.zeros((1, 16), dtype=np.int32)
    for binary in (True, False):
        with pytest.raises(InferenceServerException) as exc:
            client.infer("simple", simple_inputs(in0, in1, binary), outputs=simple_outputs(binary))
        assert "INPUT0" in exc.value.message()
        assert exc.value.status() == "400"


def test_batch_too_large(client):
    in0 = np.zeros((9, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("simple", simple_inputs(in0, in0))
    assert exc.value.status() == "400"


def test_wrong_datatype(client):
    in0 = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    in0.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    in1 = httpclient.InferInput("INPUT1", [1, 16], "INT32")
    in1.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("simple", [in0, in1])
    assert "FP32" in exc.value.message()
    assert exc.value.status() == "400"


def test_unknown_output(client):
    in0 = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("simple", simple_inputs(in0, in0), outputs=[httpclient.InferRequestedOutput("OUTPUT9")])
    assert "OUTPUT9" in exc.value.message()
    assert exc.value.status() == "400"


def test_load_rejected_in_none_mode(client):
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("simple")
    assert exc.value.status() == "503"
    assert "explicit" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.unload_model("simple")
    assert exc.value.status() == "503"
    assert client.is_model_ready("simple") is True


# ---------------------------------------------------------------- 7. repository (explicit mode)


def index_by_name(client):
    index = client.get_model_repository_index()
    assert isinstance(index, list), index
    by_name = {}
    for entry in index:
        by_name.setdefault(entry["name"], []).append(entry)
    return by_name


def is_ready(entries):
    return any(e.get("state") == "READY" for e in entries)


def test_repository_index_explicit(explicit_client):
    by_name = index_by_name(explicit_client)
    assert set(by_name) == DEFAULT_MODELS
    assert is_ready(by_name["simple"])
    assert [e.get("version") for e in by_name["simple"] if e.get("state") == "READY"] == ["1"]
    assert not is_ready(by_name["simple_string"])
    assert not is_ready(by_name["simple_identity"])
    assert explicit_client.is_model_ready("simple") is True
    assert explicit_client.is_model_ready("simple_string") is False


def test_repository_load_infer_unload(explicit_client):
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.full((1, 16), 3, dtype=np.int32)

    with pytest.raises(InferenceServerException):
        explicit_client.infer("simple_string", string_inputs(in0, in1, True))

    explicit_client.load_model("simple_string")
    assert explicit_client.is_model_ready("simple_string") is True
    assert is_ready(index_by_name(explicit_client)["simple_string"])
    result = explicit_client.infer("simple_string", string_inputs(in0, in1, True))
    out0 = result.as_numpy("OUTPUT0")
    assert [int(as_bytes(x)) for x in out0.reshape(-1)] == list((in0 + in1).reshape(-1))

    explicit_client.unload_model("simple_string")
    assert explicit_client.is_model_ready("simple_string") is False
    assert not is_ready(index_by_name(explicit_client)["simple_string"])
    with pytest.raises(InferenceServerException) as exc:
        explicit_client.infer("simple_string", string_inputs(in0, in1, True))
    assert "simple_string" in exc.value.message()
    assert exc.value.status() in ("503", "404")

    # The other model kept serving throughout.
    assert_simple_result(
        explicit_client.infer("simple", simple_inputs(in0, in1), outputs=simple_outputs()), in0, in1
    )


def test_repository_reload_after_unload(explicit_client):
    explicit_client.load_model("simple_identity")
    explicit_client.unload_model("simple_identity")
    explicit_client.load_model("simple_identity")
    try:
        data = np.array([[b"again"]], dtype=np.object_)
        out = identity_infer(explicit_client, data, binary=True).as_numpy("OUTPUT0")
        assert bytes(out[0][0]) == b"again"
    finally:
        explicit_client.unload_model("simple_identity")
    assert explicit_client.is_model_ready("simple_identity") is False


def test_repository_load_missing_model(explicit_client):
    with pytest.raises(InferenceServerException) as exc:
        explicit_client.load_model("does_not_exist")
    assert "does_not_exist" in exc.value.message()
    assert "does_not_exist" not in index_by_name(explicit_client)


def test_load_with_a_config_override_like_tritons_model_control_example(explicit_client):
    """simple_http_model_control.py's flow: a malformed override fails with "failed to
    load", a valid one changes max_batch_size, a plain load goes back to config.toml."""
    client = explicit_client
    client.load_model("simple")
    assert client.is_model_ready("simple")
    with pytest.raises(InferenceServerException) as e:
        client.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert "failed to load" in e.value.message() and "not valid JSON" in e.value.message()
    assert client.is_model_ready("simple"), "a failed override leaves the model serving"
    client.load_model("simple", config='{"max_batch_size":"16"}')
    assert client.get_model_config("simple")["max_batch_size"] == 16
    in0 = np.arange(16 * 16, dtype=np.int32).reshape(16, 16)
    in1 = np.ones((16, 16), dtype=np.int32)
    result = client.infer("simple", simple_inputs(in0, in1), outputs=simple_outputs())
    assert_simple_result(result, in0, in1)
    with pytest.raises(InferenceServerException) as e:
        client.load_model("simple", config='{"model_warmup": []}')
    assert "'model_warmup' is not supported" in e.value.message()
    client.load_model("simple")
    assert client.get_model_config("simple")["max_batch_size"] == 8
    with pytest.raises(InferenceServerException) as e:
        client.load_model("wrong_model_name")
    assert "failed to load" in e.value.message()


# ---------------------------------------------------------------- system shared memory


@pytest.fixture
def shm_regions(client):
    """Creates POSIX shared-memory regions and removes them (and their registrations)."""
    import tritonclient.utils.shared_memory as shm

    made = []

    def make(name, key, byte_size):
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        return handle

    yield make
    client.unregister_system_shared_memory()
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_system_shared_memory_like_tritons_shm_client(client, shm_regions):
    """simple_http_shm_client.py's flow: both inputs in one region, each output in its
    own, the response without data; status, then unregister."""
    import tritonclient.utils.shared_memory as shm

    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    size = in0.nbytes
    ip = shm_regions("input_data", "/wisp_test_input_simple", size * 2)
    op0 = shm_regions("output0_data", "/wisp_test_output0_simple", size)
    op1 = shm_regions("output1_data", "/wisp_test_output1_simple", size)
    shm.set_shared_memory_region(ip, [in0, in1])
    client.register_system_shared_memory("input_data", "/wisp_test_input_simple", size * 2)
    client.register_system_shared_memory("output0_data", "/wisp_test_output0_simple", size)
    client.register_system_shared_memory("output1_data", "/wisp_test_output1_simple", size)
    status = {r["name"]: r for r in client.get_system_shared_memory_status()}
    assert status["input_data"] == {
        "name": "input_data", "key": "/wisp_test_input_simple", "offset": 0, "byte_size": size * 2,
    }
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"),
              httpclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_shared_memory("input_data", size)
    inputs[1].set_shared_memory("input_data", size, offset=size)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
    outputs[0].set_shared_memory("output0_data", size)
    outputs[1].set_shared_memory("output1_data", size)
    result = client.infer("simple", inputs, outputs=outputs)
    for name, handle, want in (("OUTPUT0", op0, in0 + in1), ("OUTPUT1", op1, in0 - in1)):
        output = result.get_output(name)
        assert "data" not in output and output["parameters"]["shared_memory_region"]
        got = shm.get_contents_as_numpy(handle, np.int32, output["shape"])
        np.testing.assert_array_equal(got, want)
    client.unregister_system_shared_memory("output1_data")
    assert {r["name"] for r in client.get_system_shared_memory_status()} == {"input_data", "output0_data"}


def test_bytes_in_shared_memory_like_tritons_shm_string_client(client, shm_regions):
    """simple_http_shm_string_client.py's flow: BYTES tensors serialized into regions,
    simple_string's outputs written back serialized."""
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import serialize_byte_tensor, serialized_byte_size, deserialize_bytes_tensor

    in0 = np.array([str(x).encode() for x in range(16)], dtype=np.object_).reshape(1, 16)
    in1 = np.array([b"1"] * 16, dtype=np.object_).reshape(1, 16)
    s0, s1 = serialize_byte_tensor(in0), serialize_byte_tensor(in1)
    size0, size1 = serialized_byte_size(s0), serialized_byte_size(s1)
    ip = shm_regions("s_input", "/wisp_test_s_input", size0 + size1)
    out_size = 64 * 16  # room for each serialized output string
    op = shm_regions("s_output", "/wisp_test_s_output", 2 * out_size)
    shm.set_shared_memory_region(ip, [s0])
    shm.set_shared_memory_region(ip, [s1], offset=size0)
    client.register_system_shared_memory("s_input", "/wisp_test_s_input", size0 + size1)
    client.register_system_shared_memory("s_output", "/wisp_test_s_output", 2 * out_size)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"),
              httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_shared_memory("s_input", size0)
    inputs[1].set_shared_memory("s_input", size1, offset=size0)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=True)]
    outputs[0].set_shared_memory("s_output", out_size)
    outputs[1].set_shared_memory("s_output", out_size, offset=out_size)
    result = client.infer("simple_string", inputs, outputs=outputs)
    out0 = result.get_output("OUTPUT0")
    written = out0["parameters"]["shared_memory_byte_size"]
    raw = shm.get_contents_as_numpy(op, np.uint8, [written]).tobytes()
    sums = deserialize_bytes_tensor(raw)
    assert [int(x) for x in sums] == [x + 1 for x in range(16)]


def test_shared_memory_bounds_and_names_are_checked(client, shm_regions):
    import tritonclient.utils.shared_memory as shm

    handle = shm_regions("small", "/wisp_test_small", 64)
    shm.set_shared_memory_region(handle, [np.zeros(16, dtype=np.int32)])
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory("small", "/wisp_test_small", 128)
    assert "has 64 bytes; region 'small' asks for 128 bytes" in e.value.message()
    client.register_system_shared_memory("small", "/wisp_test_small", 64)
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory("small", "/wisp_test_small", 64)
    assert "already registered" in e.value.message()
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"),
              httpclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_shared_memory("small", 64)
    inputs[1].set_shared_memory("small", 64, offset=32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple", inputs)
    assert "outside shared memory region 'small' (64 bytes)" in e.value.message()
    inputs[1].set_shared_memory("nowhere", 64)
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple", inputs)
    assert "Unable to find system shared memory region: 'nowhere'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status("nowhere")
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.register_cuda_shared_memory("gpu", b"handle", 0, 64)
    assert "CUDA shared memory is not supported" in e.value.message()
    assert client.get_cuda_shared_memory_status() == []


def test_shared_memory_is_off_unless_allowed(explicit_client):
    with pytest.raises(InferenceServerException) as e:
        explicit_client.register_system_shared_memory("r", "/wisp_test_off", 64)
    assert "--allow-client-shm true" in e.value.message() and e.value.status() == "400"


# ---------------------------------------------------------------- 8. Triton's client examples


def test_triton_simple_http_infer_client_example(wisp_server):
    """The flow of Triton's src/python/examples/simple_http_infer_client.py."""
    triton_client = httpclient.InferenceServerClient(
        url=wisp_server.url, verbose=False, connection_timeout=10.0, network_timeout=10.0
    )
    model_name = "simple"

    def run_infer(input0_data, input1_data, outputs_wanted=True, **kwargs):
        inputs = []
        outputs = []
        inputs.append(httpclient.InferInput("INPUT0", [1, 16], "INT32"))
        inputs.append(httpclient.InferInput("INPUT1", [1, 16], "INT32"))
        # Initialize the data
        inputs[0].set_data_from_numpy(input0_data, binary_data=False)
        inputs[1].set_data_from_numpy(input1_data, binary_data=True)
        outputs.append(httpclient.InferRequestedOutput("OUTPUT0", binary_data=True))
        outputs.append(httpclient.InferRequestedOutput("OUTPUT1", binary_data=False))
        query_params = {"test_1": 1, "test_2": 2}
        return triton_client.infer(
            model_name,
            inputs,
            outputs=outputs if outputs_wanted else None,
            query_params=query_params,
            **kwargs,
        )

    # Create the data for the two input tensors. Initialize the first
    # to unique integers and the second to all ones.
    input0_data = np.arange(start=0, stop=16, dtype=np.int32)
    input0_data = np.expand_dims(input0_data, axis=0)
    input1_data = np.ones(shape=(1, 16), dtype=np.int32)

    for kwargs in (
        {},
        {"headers": {"test": "1"}},
        {"request_compression_algorithm": "gzip", "response_compression_algorithm": "gzip"},
    ):
        for outputs_wanted in (True, False):
            results = run_infer(input0_data, input1_data, outputs_wanted, **kwargs)
            statistics = triton_client.get_inference_statistics(model_name=model_name)
            assert len(statistics["model_stats"]) == 1, statistics
            output0_data = results.as_numpy("OUTPUT0")
            output1_data = results.as_numpy("OUTPUT1")
            for i in range(16):
                assert input0_data[0][i] + input1_data[0][i] == output0_data[0][i]
                assert input0_data[0][i] - input1_data[0][i] == output1_data[0][i]
    triton_client.close()


def test_triton_simple_http_async_infer_client_example(wisp_server):
    """The flow of Triton's simple_http_async_infer_client.py: several async_infer in flight."""
    request_count = 6
    triton_client = httpclient.InferenceServerClient(
        url=wisp_server.url, concurrency=request_count, connection_timeout=10.0, network_timeout=10.0
    )
    model_name = "simple"
    rng = np.random.default_rng(21)
    datas = []
    async_requests = []
    for _ in range(request_count):
        input0_data = random_int32(rng, (1, 16))
        input1_data = random_int32(rng, (1, 16))
        inputs = [
            httpclient.InferInput("INPUT0", [1, 16], "INT32"),
            httpclient.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(input0_data, binary_data=False)
        inputs[1].set_data_from_numpy(input1_data, binary_data=True)
        outputs = [
            httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
            httpclient.InferRequestedOutput("OUTPUT1", binary_data=True),
        ]
        async_requests.append(triton_client.async_infer(model_name, inputs, outputs=outputs))
        datas.append((input0_data, input1_data))

    for async_request, (input0_data, input1_data) in zip(async_requests, datas):
        result = async_request.get_result(block=True, timeout=10)
        assert_simple_result(result, input0_data, input1_data)
    triton_client.close()


def test_triton_simple_http_string_infer_client_example(wisp_server):
    """The flow of Triton's simple_http_string_infer_client.py."""
    triton_client = httpclient.InferenceServerClient(
        url=wisp_server.url, connection_timeout=10.0, network_timeout=10.0
    )
    model_name = "simple_string"

    in0 = np.arange(start=0, stop=16, dtype=np.int32)
    in0 = np.expand_dims(in0, axis=0)
    in1 = np.ones(shape=(1, 16), dtype=np.int32)
    expected_sum = np.add(in0, in1)
    expected_diff = np.subtract(in0, in1)

    in0n = np.array([str(x).encode("utf-8") for x in in0.reshape(in0.size)], dtype=np.object_)
    input0_data = in0n.reshape(in0.shape)
    in1n = np.array([str(x).encode("utf-8") for x in in1.reshape(in1.size)], dtype=np.object_)
    input1_data = in1n.reshape(in1.shape)

    inputs = [
        httpclient.InferInput("INPUT0", input0_data.shape, "BYTES"),
        httpclient.InferInput("INPUT1", input1_data.shape, "BYTES"),
    ]
    inputs[0].set_data_from_numpy(input0_data, binary_data=True)
    inputs[1].set_data_from_numpy(input1_data, binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=True),
    ]
    results = triton_client.infer(model_name, inputs, outputs=outputs)

    output0_data = results.as_numpy("OUTPUT0")
    output1_data = results.as_numpy("OUTPUT1")
    for i in range(16):
        r0 = output0_data[0][i].decode("utf-8")
        r1 = output1_data[0][i].decode("utf-8")
        assert expected_sum[0][i] == int(r0)
        assert expected_diff[0][i] == int(r1)
    triton_client.close()


def test_triton_simple_http_health_metadata_example(wisp_server):
    """The flow of Triton's simple_http_health_metadata.py (the parts wisp implements)."""
    triton_client = httpclient.InferenceServerClient(
        url=wisp_server.url, connection_timeout=10.0, network_timeout=10.0
    )
    assert triton_client.is_server_live(headers={"test": "1", "dummy": "2"})
    assert triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "wisp"
    metadata = triton_client.get_model_metadata("simple")
    assert metadata["name"] == "simple"
    assert triton_client.is_model_ready("simple")
    with pytest.raises(InferenceServerException):
        triton_client.get_model_metadata("wrong_model_name")
    triton_client.close()


def test_ensemble_add_sub(client):
    """The two-step ensemble in the default repository doubles both inputs."""
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.full((1, 16), -5, dtype=np.int32)
    inputs = simple_inputs(in0, in1)
    result = client.infer("ensemble_add_sub", inputs, outputs=simple_outputs())
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 * 2)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), in1 * 2)
    config = client.get_model_config("ensemble_add_sub")
    assert config["platform"] == "ensemble"
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["simple", "simple"]


@pytest.mark.parametrize("dyna", [False, True])
def test_sequences_like_tritons_sequence_sync_client(client, dyna):
    """simple_http_sequence_sync_infer_client.py's flow: three whole sequences, one
    after the other (two numeric ids, one string id), over HTTP."""
    plan = sequence_plan(dyna)
    for (model, sid, inputs), expected in zip(plan, expected_sequence_outputs(dyna, plan)):
        got = []
        for i, value in enumerate(inputs):
            inp = httpclient.InferInput("INPUT", [1, 1], "INT32")
            inp.set_data_from_numpy(np.full((1, 1), value, dtype=np.int32))
            result = client.infer(
                model,
                [inp],
                outputs=[httpclient.InferRequestedOutput("OUTPUT")],
                sequence_id=sid,
                sequence_start=(i == 0),
                sequence_end=(i == len(inputs) - 1),
            )
            got.append(int(result.as_numpy("OUTPUT")[0][0]))
        assert got == expected, (model, sid)


def test_the_string_dyna_model_keeps_each_sequence_on_its_instance(client):
    """Interleaved sequences of the accumulating model keep their own sums: a
    sequence's state lives in the one instance that serves it."""
    ids = [str(2000 + k) for k in range(6)]
    sums = dict.fromkeys(ids, 0)
    for i in range(5):
        for k, sid in enumerate(ids):
            inp = httpclient.InferInput("INPUT", [1, 1], "INT32")
            inp.set_data_from_numpy(np.full((1, 1), k + 1, dtype=np.int32))
            result = client.infer(
                "simple_string_dyna_sequence", [inp], sequence_id=sid,
                sequence_start=(i == 0), sequence_end=(i == 4),
            )
            sums[sid] += k + 1
            want = sums[sid] + (int(sid) if i == 4 else 0)
            assert int(result.as_numpy("OUTPUT")[0][0]) == want


def test_log_settings(client):
    """Triton's logging extension: read, change, and a bad setting named."""
    assert "logging" in client.get_server_metadata()["extensions"]
    settings = client.get_log_settings()
    assert settings["log_info"] is True and settings["log_verbose_level"] == 0
    updated = client.update_log_settings({"log_verbose_level": 2, "log_info": False})
    assert updated["log_verbose_level"] == 2 and updated["log_info"] is False
    with pytest.raises(InferenceServerException) as e:
        client.update_log_settings({"log_colour": True})
    assert "log_colour" in e.value.message() and e.value.status() == "400"
    client.update_log_settings({"log_verbose_level": 0, "log_info": True})
    assert client.get_log_settings()["log_info"] is True


def test_trace_settings(client):
    """Triton's trace extension with tritonclient's own calls: a model's settings over
    the global ones, cleared with None; bad settings refused by name."""
    assert "trace" in client.get_server_metadata()["extensions"]
    settings = client.get_trace_settings()
    assert settings["trace_level"] == ["OFF"] and settings["trace_mode"] == "opentelemetry"
    updated = client.update_trace_settings(
        model_name="simple_identity", settings={"trace_rate": "7", "trace_count": "3"}
    )
    assert updated["trace_rate"] == "7" and updated["trace_count"] == "3"
    assert client.get_trace_settings()["trace_rate"] == settings["trace_rate"]
    with pytest.raises(InferenceServerException) as e:
        client.update_trace_settings(settings={"trace_level": ["SOMETIMES"]})
    assert "SOMETIMES" in e.value.message() and e.value.status() == "400"
    cleared = client.update_trace_settings(
        model_name="simple_identity", settings={"trace_rate": None, "trace_count": None}
    )
    assert cleared == settings


def test_asyncio_client_like_tritons_http_aio_examples(wisp_server):
    """The simple_http_aio_* examples: health, metadata, inference, strings and a
    sequence with tritonclient.http.aio (aiohttp)."""
    import asyncio

    import tritonclient.http.aio as aioclient

    async def run():
        client = aioclient.InferenceServerClient(wisp_server.url)
        assert await client.is_server_live() and await client.is_server_ready()
        assert (await client.get_model_metadata("simple"))["name"] == "simple"
        in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
        in1 = np.ones((1, 16), dtype=np.int32)
        inputs = [aioclient.InferInput("INPUT0", [1, 16], "INT32"),
                  aioclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_data_from_numpy(in0)
        inputs[1].set_data_from_numpy(in1, binary_data=False)
        result = await client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 + in1)

        strings = np.array([[str(v).encode() for v in range(16)]], dtype=np.object_)
        ones = np.array([[b"1"] * 16], dtype=np.object_)
        inputs = [aioclient.InferInput("INPUT0", [1, 16], "BYTES"),
                  aioclient.InferInput("INPUT1", [1, 16], "BYTES")]
        inputs[0].set_data_from_numpy(strings)
        inputs[1].set_data_from_numpy(ones)
        result = await client.infer("simple_string", inputs)
        assert [int(v) for v in result.as_numpy("OUTPUT0")[0]] == [v + 1 for v in range(16)]

        got = []
        for i, value in enumerate([0, 11, 7]):
            inp = aioclient.InferInput("INPUT", [1, 1], "INT32")
            inp.set_data_from_numpy(np.full((1, 1), value, dtype=np.int32))
            result = await client.infer("simple_sequence", [inp], sequence_id=4242,
                                        sequence_start=i == 0, sequence_end=i == 2)
            got.append(int(result.as_numpy("OUTPUT")[0][0]))
        assert got == [1, 11, 7]  # simple_sequence: INPUT + START
        await client.close()

    asyncio.run(run())
