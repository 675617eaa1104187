"""End-to-end tests of wisp's gRPC front with the real `tritonclient[grpc]` package.

The flows are those of Triton's gRPC client examples (simple_grpc_infer_client.py,
simple_grpc_string_infer_client.py, simple_grpc_async_infer_client.py,
simple_grpc_sequence_stream_infer_client.py, simple_grpc_health_metadata.py,
simple_grpc_model_control.py), written for wisp's models and run against the real binary
(see conftest.py).
"""

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sequence_examples import expected_sequence_outputs, sequence_plan


@pytest.fixture(scope="module")
def gclient(wisp_server):
    c = wisp_server.grpc_client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def explicit_gclient(explicit_server):
    c = explicit_server.grpc_client()
    yield c
    c.close()


def simple_inputs(in0, in1):
    inputs = [
        grpcclient.InferInput("INPUT0", list(in0.shape), "INT32"),
        grpcclient.InferInput("INPUT1", list(in1.shape), "INT32"),
    ]
    inputs[0].set_data_from_numpy(in0)
    inputs[1].set_data_from_numpy(in1)
    return inputs


def simple_data(batch=1):
    in0 = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    in1 = np.full((batch, 16), 3, dtype=np.int32) - in0 // 2
    return in0, in1


def test_health_and_metadata(gclient):
    assert gclient.is_server_live()
    assert gclient.is_server_ready()
    assert gclient.is_model_ready("simple")
    assert not gclient.is_model_ready("no_such_model")
    meta = gclient.get_server_metadata(as_json=True)
    assert meta["name"] == "wisp"
    assert "binary_tensor_data" in meta["extensions"]
    model = gclient.get_model_metadata("simple", as_json=True)
    assert model["name"] == "simple"
    assert model["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("INPUT0", "INT32", ["-1", "16"]),
        ("INPUT1", "INT32", ["-1", "16"]),
    ]


def test_model_config_is_a_real_model_config(gclient):
    config = gclient.get_model_config("simple").config
    assert config.name == "simple"
    assert config.max_batch_size > 0
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert list(config.input[0].dims) == [16]
    # An enum of the protocol, not a string: the message was decoded as Triton's ModelConfig.
    assert config.input[0].data_type == grpcclient.model_config_pb2.TYPE_INT32


@pytest.mark.parametrize("batch", [1, 3])
def test_simple_infer(gclient, batch):
    in0, in1 = simple_data(batch)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = gclient.infer("simple", simple_inputs(in0, in1), outputs=outputs, request_id="req-1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 + in1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), in0 - in1)
    response = result.get_response()
    assert response.id == "req-1"
    assert response.model_name == "simple" and response.model_version == "1"


def test_simple_infer_one_output_and_gzip(gclient):
    in0, in1 = simple_data()
    result = gclient.infer(
        "simple",
        simple_inputs(in0, in1),
        outputs=[grpcclient.InferRequestedOutput("OUTPUT1")],
        compression_algorithm="gzip",
    )
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), in0 - in1)


def test_simple_string_infer(gclient):
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16) - 4
    in1 = np.ones((1, 16), dtype=np.int32) * 7
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "BYTES"),
        grpcclient.InferInput("INPUT1", [1, 16], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(np.array([str(x).encode() for x in in0.flatten()], dtype=np.object_).reshape(1, 16))
    inputs[1].set_data_from_numpy(np.array([str(x).encode() for x in in1.flatten()], dtype=np.object_).reshape(1, 16))
    result = gclient.infer("simple_string", inputs)
    out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    for i in range(16):
        assert int(out0[0][i]) == in0[0][i] + in1[0][i]
        assert int(out1[0][i]) == in0[0][i] - in1[0][i]


def test_async_infer(gclient):
    in0, in1 = simple_data()
    done = queue.Queue()
    gclient.async_infer("simple", simple_inputs(in0, in1), callback=lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=10)
    assert error is None, error
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 + in1)


def test_stream_infer_in_order_with_errors_in_the_stream(wisp_server):
    client = wisp_server.grpc_client()
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(20):
            in0 = np.full((1, 16), i, dtype=np.int32)
            in1 = np.ones((1, 16), dtype=np.int32)
            client.async_stream_infer("simple", simple_inputs(in0, in1), request_id=str(i))
        # A bad request answers with an error in the stream; the stream goes on.
        bad = grpcclient.InferInput("INPUT0", [1, 3], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.int32))
        client.async_stream_infer("simple", [bad], request_id="bad")
        in0, in1 = simple_data()
        client.async_stream_infer("simple", simple_inputs(in0, in1), request_id="after")
        seen = [results.get(timeout=10) for _ in range(22)]
    finally:
        client.stop_stream()
        client.close()
    for i, (result, error) in enumerate(seen[:20]):
        assert error is None, error
        assert result.get_response().id == str(i)
        assert int(result.as_numpy("OUTPUT0")[0][0]) == i + 1
    result, error = seen[20]
    assert error is not None and "INPUT0" in str(error), error
    result, error = seen[21]
    assert error is None and result.get_response().id == "after"


@pytest.mark.parametrize("dyna", [False, True])
def test_sequences_over_a_stream(wisp_server, dyna):
    """simple_grpc_sequence_stream_infer_client.py's flow: three sequences sent on one
    stream, request ids "<sequence id>_<step>", responses matched by that id."""
    plan = sequence_plan(dyna)
    client = wisp_server.grpc_client()
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for model, sid, inputs in plan:
            for i, value in enumerate(inputs):
                inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
                inp.set_data_from_numpy(np.full((1, 1), value, dtype=np.int32))
                client.async_stream_infer(
                    model,
                    [inp],
                    outputs=[grpcclient.InferRequestedOutput("OUTPUT")],
                    request_id=f"{sid}_{i + 1}",
                    sequence_id=sid,
                    sequence_start=(i == 0),
                    sequence_end=(i == len(inputs) - 1),
                )
        seen = [results.get(timeout=10) for _ in range(sum(len(p[2]) for p in plan))]
    finally:
        client.stop_stream()
        client.close()
    got = {str(sid): [] for _, sid, _ in plan}
    for result, error in seen:
        assert error is None, error
        got[result.get_response().id.split("_")[0]].append(int(result.as_numpy("OUTPUT")[0][0]))
    for (model, sid, _), expected in zip(plan, expected_sequence_outputs(dyna, plan)):
        assert got[str(sid)] == expected, (model, sid)


def test_errors_carry_grpc_codes_and_name_the_problem(gclient):
    in0, in1 = simple_data()
    with pytest.raises(InferenceServerException) as e:
        gclient.infer("no_such_model", simple_inputs(in0, in1))
    assert e.value.message() == "Request for unknown model: 'no_such_model' is not found"
    assert e.value.status() == "StatusCode.NOT_FOUND"
    bad = grpcclient.InferInput("INPUT0", [1, 3], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.int32))
    with pytest.raises(InferenceServerException) as e:
        gclient.infer("simple", [bad, simple_inputs(in0, in1)[1]])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in e.value.message()
    assert gclient.get_cuda_shared_memory_status(as_json=True) == {}


def test_statistics_count_grpc_requests(gclient):
    before = gclient.get_inference_statistics("simple", as_json=True)["model_stats"][0]
    in0, in1 = simple_data()
    for _ in range(3):
        gclient.infer("simple", simple_inputs(in0, in1))
    stats = gclient.get_inference_statistics("simple", as_json=True)["model_stats"][0]
    assert stats["name"] == "simple" and stats["version"] == "1"
    assert int(stats["inference_count"]) >= int(before.get("inference_count", 0)) + 3
    assert int(stats["inference_stats"]["success"]["count"]) >= 3


def test_system_shared_memory_like_tritons_grpc_shm_client(gclient):
    """simple_grpc_shm_client.py's flow over gRPC: inputs and outputs in regions."""
    import tritonclient.utils.shared_memory as shm

    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.full((1, 16), 3, dtype=np.int32)
    size = in0.nbytes
    handles = []
    try:
        ip = shm.create_shared_memory_region("g_input", "/wisp_test_g_input", size * 2)
        op = shm.create_shared_memory_region("g_output", "/wisp_test_g_output", size * 2)
        handles += [ip, op]
        shm.set_shared_memory_region(ip, [in0, in1])
        gclient.register_system_shared_memory("g_input", "/wisp_test_g_input", size * 2)
        gclient.register_system_shared_memory("g_output", "/wisp_test_g_output", size * 2)
        status = gclient.get_system_shared_memory_status(as_json=True)["regions"]
        assert status["g_input"]["key"] == "/wisp_test_g_input"
        assert int(status["g_output"]["byte_size"]) == size * 2
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
                  grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_shared_memory("g_input", size)
        inputs[1].set_shared_memory("g_input", size, offset=size)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0"),
                   grpcclient.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("g_output", size)
        outputs[1].set_shared_memory("g_output", size, offset=size)
        result = gclient.infer("simple", inputs, outputs=outputs)
        out1 = result.get_output("OUTPUT1")
        assert out1.parameters["shared_memory_region"].string_param == "g_output"
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(op, np.int32, [1, 16]), in0 + in1)
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(op, np.int32, [1, 16], offset=size), in0 - in1)
        # One input inline, one in shared memory: raw_input_contents holds only the first.
        mixed = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
                 grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        mixed[0].set_data_from_numpy(in0)
        mixed[1].set_shared_memory("g_input", size, offset=size)
        np.testing.assert_array_equal(gclient.infer("simple", mixed).as_numpy("OUTPUT0"), in0 + in1)
        with pytest.raises(InferenceServerException) as e:
            gclient.register_cuda_shared_memory("gpu", b"aGFuZGxl", 0, 64)
        assert "CUDA shared memory is not supported" in e.value.message()
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as e:
            gclient.get_system_shared_memory_status("nowhere")
        assert e.value.status() == "StatusCode.NOT_FOUND"
    finally:
        gclient.unregister_system_shared_memory()
        for handle in handles:
            shm.destroy_shared_memory_region(handle)
    assert gclient.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}


def test_bytes_in_shared_memory_like_tritons_grpc_shm_string_client(gclient):
    """simple_grpc_shm_string_client.py's flow: serialized BYTES in regions, simple_string's
    outputs written back serialized, their written size in the response's parameters."""
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import (deserialize_bytes_tensor, serialize_byte_tensor,
                                    serialized_byte_size)

    in0 = np.array([str(x).encode() for x in range(16)], dtype=np.object_).reshape(1, 16)
    in1 = np.array([b"1"] * 16, dtype=np.object_).reshape(1, 16)
    s0, s1 = serialize_byte_tensor(in0), serialize_byte_tensor(in1)
    size0, size1 = serialized_byte_size(s0), serialized_byte_size(s1)
    out_size = 64 * 16
    handles = []
    try:
        ip = shm.create_shared_memory_region("gs_input", "/wisp_test_gs_input", size0 + size1)
        op = shm.create_shared_memory_region("gs_output", "/wisp_test_gs_output", 2 * out_size)
        handles += [ip, op]
        shm.set_shared_memory_region(ip, [s0])
        shm.set_shared_memory_region(ip, [s1], offset=size0)
        gclient.register_system_shared_memory("gs_input", "/wisp_test_gs_input", size0 + size1)
        gclient.register_system_shared_memory("gs_output", "/wisp_test_gs_output", 2 * out_size)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "BYTES"),
                  grpcclient.InferInput("INPUT1", [1, 16], "BYTES")]
        inputs[0].set_shared_memory("gs_input", size0)
        inputs[1].set_shared_memory("gs_input", size1, offset=size0)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0"),
                   grpcclient.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("gs_output", out_size)
        outputs[1].set_shared_memory("gs_output", out_size, offset=out_size)
        result = gclient.infer("simple_string", inputs, outputs=outputs)
        for k, (name, want) in enumerate((("OUTPUT0", 1), ("OUTPUT1", -1))):
            written = result.get_output(name).parameters["shared_memory_byte_size"].int64_param
            raw = shm.get_contents_as_numpy(op, np.uint8, [written], offset=k * out_size).tobytes()
            assert [int(x) for x in deserialize_bytes_tensor(raw)] == [x + want for x in range(16)]
    finally:
        gclient.unregister_system_shared_memory()
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def test_load_with_a_config_override(explicit_gclient):
    """simple_grpc_model_control.py's override: max_batch_size 8 -> 16, then back."""
    explicit_gclient.load_model("simple")
    with pytest.raises(InferenceServerException) as e:
        explicit_gclient.load_model("simple", config='{"max_batch_size": "sixteen"}')
    assert "failed to load" in e.value.message() and "max_batch_size" in e.value.message()
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    explicit_gclient.load_model("simple", config='{"max_batch_size":"16"}')
    config = explicit_gclient.get_model_config("simple", as_json=True)["config"]
    assert int(config["max_batch_size"]) == 16
    with pytest.raises(InferenceServerException) as e:
        explicit_gclient.load_model(
            "simple", config='{"max_batch_size": 4}', files={"file:1/model.wasm": b"\0asm"}
        )
    assert "file overrides ('file:1/model.wasm') are not supported" in e.value.message()
    explicit_gclient.load_model("simple")
    config = explicit_gclient.get_model_config("simple", as_json=True)["config"]
    assert int(config["max_batch_size"]) == 8


def test_repository_index_and_model_control(explicit_gclient):
    index = explicit_gclient.get_model_repository_index(as_json=True)["models"]
    states = {m["name"]: m.get("state") for m in index}
    assert states["simple"] == "READY"
    assert not explicit_gclient.is_model_ready("simple_identity")
    explicit_gclient.load_model("simple_identity")
    assert explicit_gclient.is_model_ready("simple_identity")
    explicit_gclient.unload_model("simple_identity")
    assert not explicit_gclient.is_model_ready("simple_identity")
    with pytest.raises(InferenceServerException) as e:
        explicit_gclient.load_model("no_such_model")
    assert e.value.message().startswith("failed to load 'no_such_model'")


def test_grpc_health_v1(wisp_server):
    with grpc.insecure_channel(wisp_server.grpc_url) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        # HealthCheckResponse{status: SERVING (1)} is the bytes 08 01.
        assert check(b"", timeout=10) == b"\x08\x01"
        # service = "nope": an unknown service is NOT_FOUND.
        with pytest.raises(grpc.RpcError) as e:
            check(b"\x0a\x04nope", timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_log_settings(gclient):
    settings = gclient.get_log_settings(as_json=True)["settings"]
    assert settings["log_info"]["bool_param"] is True
    assert settings["log_format"]["string_param"] == "ISO8601"
    updated = gclient.update_log_settings({"log_verbose_level": 1, "log_warning": True}, as_json=True)
    assert updated["settings"]["log_verbose_level"]["uint32_param"] == 1
    with pytest.raises(InferenceServerException) as e:
        gclient.update_log_settings({"log_file": "/tmp/elsewhere.log"})
    assert "log_file" in e.value.message()
    gclient.update_log_settings({"log_verbose_level": 0})


def test_trace_settings(gclient):
    settings = gclient.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"]["value"] == ["OFF"]
    updated = gclient.update_trace_settings(
        model_name="simple_identity", settings={"trace_rate": "7"}, as_json=True
    )
    assert updated["settings"]["trace_rate"]["value"] == ["7"]
    with pytest.raises(InferenceServerException) as e:
        gclient.update_trace_settings(settings={"trace_count": "-5"})
    assert "trace_count" in e.value.message()
    cleared = gclient.update_trace_settings(
        model_name="simple_identity", settings={"trace_rate": None}, as_json=True
    )
    assert cleared["settings"] == settings


# ------------------------------------------------ Triton's gRPC examples, by what they do


def test_explicit_contents_like_tritons_grpc_explicit_content_clients(wisp_server):
    """grpc_explicit_int_content_client.py and grpc_explicit_byte_content_client.py: the
    generated stubs, typed `contents` in, raw outputs back; mixing typed and raw contents
    and a malformed version are refused in Triton's words."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import deserialize_bytes_tensor

    with grpc.insecure_channel(wisp_server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def request(model, datatype, values0, values1):
            r = service_pb2.ModelInferRequest(model_name=model)
            for name, values in (("INPUT0", values0), ("INPUT1", values1)):
                tensor = service_pb2.ModelInferRequest.InferInputTensor(
                    name=name, datatype=datatype, shape=[1, 16])
                if datatype == "BYTES":
                    tensor.contents.bytes_contents.extend(values)
                else:
                    tensor.contents.int_contents.extend(values)
                r.inputs.append(tensor)
            for name in ("OUTPUT0", "OUTPUT1"):
                r.outputs.append(service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name))
            return r

        a = list(range(16))
        r = request("simple", "INT32", a, [1] * 16)
        response = stub.ModelInfer(r)
        sums = np.frombuffer(response.raw_output_contents[0], dtype=np.int32)
        diffs = np.frombuffer(response.raw_output_contents[1], dtype=np.int32)
        assert list(sums) == [v + 1 for v in a] and list(diffs) == [v - 1 for v in a]
        assert [list(o.shape) for o in response.outputs] == [[1, 16], [1, 16]]

        r.raw_input_contents.append(np.array(a[:8], dtype=np.int32).tobytes())
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(r)
        assert ("contents field must not be specified when using raw_input_contents "
                "for 'INPUT0' for model 'simple'") in e.value.details()

        strings = [str(v).encode() for v in a]
        response = stub.ModelInfer(request("simple_string", "BYTES", strings, [b"1"] * 16))
        sums = deserialize_bytes_tensor(response.raw_output_contents[0])
        diffs = deserialize_bytes_tensor(response.raw_output_contents[1])
        assert [int(s) for s in sums] == [v + 1 for v in a]
        assert [int(d) for d in diffs] == [v - 1 for v in a]

        r = request("simple", "INT32", a, [1] * 16)
        r.model_version = "wrong_specification"
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(r)
        assert ("failed to get model version from specified version string "
                "'wrong_specification'") in e.value.details()


@pytest.mark.parametrize("dyna", [False, True])
def test_interleaved_sequences_like_tritons_grpc_sequence_sync_client(gclient, dyna):
    """simple_grpc_sequence_sync_infer_client.py's flow: the sequences' steps interleaved,
    each a unary ModelInfer carrying its sequence id, start and end."""
    plan = sequence_plan(dyna)
    expected = expected_sequence_outputs(dyna, plan)
    got = [[] for _ in plan]
    for step in range(max(len(inputs) for _, _, inputs in plan)):
        for k, (model, sid, inputs) in enumerate(plan):
            if step >= len(inputs):
                continue
            inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
            inp.set_data_from_numpy(np.full((1, 1), inputs[step], dtype=np.int32))
            result = gclient.infer(model, [inp], sequence_id=sid,
                                   sequence_start=(step == 0),
                                   sequence_end=(step == len(inputs) - 1))
            got[k].append(int(result.as_numpy("OUTPUT")[0][0]))
    assert got == expected


def test_keepalive_and_channel_args_like_tritons_grpc_examples(wisp_server):
    """simple_grpc_keepalive_client.py and simple_grpc_custom_args_client.py: the client's
    keepalive options and custom channel arguments work against the server."""
    keepalive = grpcclient.KeepAliveOptions(
        keepalive_time_ms=2**31 - 1, keepalive_timeout_ms=20000,
        keepalive_permit_without_calls=False, http2_max_pings_without_data=2)
    args = [("grpc.max_send_message_length", 1 << 20),
            ("grpc.max_receive_message_length", 1 << 20),
            ("grpc.primary_user_agent", "wisp-tests")]
    for client in (grpcclient.InferenceServerClient(wisp_server.grpc_url, keepalive_options=keepalive),
                   grpcclient.InferenceServerClient(wisp_server.grpc_url, channel_args=args)):
        in0, in1 = simple_data()
        result = client.infer("simple", simple_inputs(in0, in1))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 + in1)
        client.close()


def test_asyncio_client_like_tritons_grpc_aio_examples(wisp_server):
    """The simple_grpc_aio_* examples: health, metadata, inference and a sequence over a
    stream with tritonclient.grpc.aio."""
    import asyncio

    import tritonclient.grpc.aio as aioclient

    async def run():
        client = aioclient.InferenceServerClient(wisp_server.grpc_url)
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("simple")
        metadata = await client.get_model_metadata("simple", as_json=True)
        assert [i["name"] for i in metadata["inputs"]] == ["INPUT0", "INPUT1"]
        in0, in1 = simple_data()
        inputs = [aioclient.InferInput("INPUT0", [1, 16], "INT32"),
                  aioclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_data_from_numpy(in0)
        inputs[1].set_data_from_numpy(in1)
        result = await client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), in0 - in1)

        values = [0, 11, 7, 5]

        async def requests():
            for i, v in enumerate(values):
                inp = aioclient.InferInput("INPUT", [1, 1], "INT32")
                inp.set_data_from_numpy(np.full((1, 1), v, dtype=np.int32))
                yield {"model_name": "simple_dyna_sequence", "inputs": [inp],
                       "sequence_id": 77, "sequence_start": i == 0,
                       "sequence_end": i == len(values) - 1}

        got = []
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            got.append(int(result.as_numpy("OUTPUT")[0][0]))
        # simple_dyna_sequence: INPUT + START, and the id added at the end.
        assert got == [1, 11, 7, 5 + 77]
        await client.close()

    asyncio.run(run())
