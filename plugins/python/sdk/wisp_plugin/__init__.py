"""wisp's Python plugin SDK: write a model as a Python class, build it into a sandboxed
WebAssembly component with componentize-py against wit/ (`wisp plugin build`).

    import wisp_plugin
    from wisp_plugin import Tensor, InvalidInput

    class Upper(wisp_plugin.Model):
        def initialize(self, info):          # once per instance; info.parameters is a dict
            self.suffix = info.parameters.get("suffix", "")

        def execute(self, request):          # one request; return the output tensors
            texts = request.input("TEXT").to_strings()
            return [Tensor.from_strings("OUT", request.input("TEXT").shape,
                                        [t.upper() + self.suffix for t in texts])]

    Model = wisp_plugin.export(Upper)        # the name componentize-py looks for

Pure Python (the standard library only): tensors are typed views over the protocol's raw bytes
(`to_list`, `from_list`, `to_strings`, `from_strings`); raising `InvalidInput` answers 400,
`Unavailable` 503, any other exception 500 with its message (the traceback goes to the log).

`Tokenizer` is the host's tokenizer (Hugging Face `tokenizers`, run natively on a `tokenizer.json`
from the version folder): open it in `initialize`, then `encode_tensors` texts or pairs straight
into an encoder's input tensors, or `encode` them for ids, offsets and words (and `pad`).
"""

from __future__ import annotations

import array
import struct
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["Model", "Tensor", "Request", "ModelInfo", "InvalidInput", "Unavailable", "Internal",
           "Tokenizer", "Encoding", "pad", "export", "log"]

# Datatype → (array typecode, element size); BOOL, FP16, BF16 and BYTES are handled apart.
_ARRAY = {
    "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q",
    "FP32": "f", "FP64": "d",
}
_SIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2,
         "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}
_LITTLE = sys.byteorder == "little"


class InvalidInput(Exception):
    """The request is wrong: the client gets 400 and this message."""


class Unavailable(Exception):
    """The model cannot serve now: the client gets 503 and this message."""


class Internal(Exception):
    """The model failed: the client gets 500 and this message."""


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= max(int(d), 0)
    return n


@dataclass
class Tensor:
    """A tensor in the protocol's raw layout: row-major, little-endian; BYTES elements each a
    4-byte little-endian length, then the bytes."""

    name: str
    datatype: str
    shape: List[int]
    data: bytes = b""

    def to_list(self) -> list:
        """The elements, flat, as Python numbers (bools for BOOL, bytes for BYTES)."""
        if self.datatype == "BYTES":
            return self.to_bytes_list()
        size = _SIZE.get(self.datatype)
        if size is None:
            raise InvalidInput(f"tensor '{self.name}' has unknown datatype {self.datatype}")
        if len(self.data) != _count(self.shape) * size:
            raise InvalidInput(f"tensor '{self.name}' has {len(self.data)} bytes for shape {self.shape}")
        if self.datatype == "BOOL":
            return [b != 0 for b in self.data]
        if self.datatype == "FP16":
            return list(struct.unpack(f"<{len(self.data) // 2}e", self.data))
        if self.datatype == "BF16":
            halves = struct.unpack(f"<{len(self.data) // 2}H", self.data)
            return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
        values = array.array(_ARRAY[self.datatype])
        values.frombytes(self.data)
        if not _LITTLE:
            values.byteswap()
        return values.tolist()

    def to_bytes_list(self) -> List[bytes]:
        """BYTES elements, each checked against the tensor's end."""
        if self.datatype != "BYTES":
            raise InvalidInput(f"tensor '{self.name}' is {self.datatype}, not BYTES")
        out, data, at = [], self.data, 0
        for i in range(_count(self.shape)):
            if at + 4 > len(data):
                raise InvalidInput(f"tensor '{self.name}': element {i} is missing")
            (length,) = struct.unpack_from("<I", data, at)
            at += 4
            if at + length > len(data):
                raise InvalidInput(f"tensor '{self.name}': element {i} runs past the data")
            out.append(bytes(data[at:at + length]))
            at += length
        if at != len(data):
            raise InvalidInput(f"tensor '{self.name}' has bytes past its last element")
        return out

    def to_strings(self) -> List[str]:
        """BYTES elements as UTF-8 text."""
        out = []
        for i, b in enumerate(self.to_bytes_list()):
            try:
                out.append(b.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InvalidInput(f"tensor '{self.name}': element {i} is not UTF-8 ({e.reason})") from None
        return out

    @staticmethod
    def from_list(name: str, datatype: str, shape: Sequence[int], values: Iterable[Any]) -> "Tensor":
        """A tensor of `values` (flat, row-major) with `shape`."""
        values = list(values)
        shape = [int(d) for d in shape]
        if len(values) != _count(shape):
            raise Internal(f"output '{name}': {len(values)} values for shape {shape}")
        if datatype == "BYTES":
            return Tensor.from_bytes_list(name, shape, values)
        if datatype == "BOOL":
            data = bytes(1 if v else 0 for v in values)
        elif datatype == "FP16":
            data = struct.pack(f"<{len(values)}e", *values)
        elif datatype == "BF16":
            data = b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", v))[0] >> 16)
                            for v in values)
        elif datatype in _ARRAY:
            packed = array.array(_ARRAY[datatype], values)
            if not _LITTLE:
                packed.byteswap()
            data = packed.tobytes()
        else:
            raise Internal(f"output '{name}' has unknown datatype {datatype}")
        return Tensor(name, datatype, shape, data)

    @staticmethod
    def from_bytes_list(name: str, shape: Sequence[int], values: Iterable[bytes]) -> "Tensor":
        parts = []
        for v in values:
            parts.append(struct.pack("<I", len(v)))
            parts.append(bytes(v))
        return Tensor(name, "BYTES", [int(d) for d in shape], b"".join(parts))

    @staticmethod
    def from_strings(name: str, shape: Sequence[int], values: Iterable[str]) -> "Tensor":
        values = [v.encode("utf-8") for v in values]
        if len(values) != _count(shape):
            raise Internal(f"output '{name}': {len(values)} values for shape {list(shape)}")
        return Tensor.from_bytes_list(name, shape, values)


@dataclass
class Request:
    """One inference request: its inputs by name, the outputs it wants (empty: all) and its
    parameters."""

    inputs: Dict[str, Tensor]
    requested_outputs: List[str] = field(default_factory=list)
    parameters: Dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> Tensor:
        try:
            return self.inputs[name]
        except KeyError:
            raise InvalidInput(f"missing input '{name}'") from None

    def wants_output(self, name: str) -> bool:
        return not self.requested_outputs or name in self.requested_outputs


@dataclass
class ModelInfo:
    name: str
    version: int
    max_batch_size: int
    parameters: Dict[str, Any]


class Model:
    """Subclass it: `initialize(info)` once per instance, `execute(request)` for each request,
    returning its output tensors (a list, or a dict of name → Tensor)."""

    def initialize(self, info: ModelInfo) -> None:
        pass

    def execute(self, request: Request):
        raise NotImplementedError("a wisp plugin implements execute(request)")


def log(level: str, message: str) -> None:
    """Writes a line to the server's log: level is trace, debug, info, warn or error."""
    from wit_world.imports import log as wit_log

    wit_log.log(getattr(wit_log.Level, level.upper()), message)


@dataclass
class Encoding:
    """One text (or pair) as tokens, unpadded. `offsets` (character [start, end) in the text the
    token came from, (0, 0) for special tokens), `word_ids` and `sequence_ids` (0: the text,
    1: its pair; -1 for special tokens) are empty unless `spans=True` was asked."""

    ids: List[int]
    type_ids: List[int]
    special_tokens_mask: bytes
    offsets: List[Tuple[int, int]]
    word_ids: List[int]
    sequence_ids: List[int]


class Tokenizer:
    """A `tokenizer.json` of the version folder, run by the host (`wisp:plugin/tokenize`).

    `max_length` > 0 truncates each encoding to that many tokens with its special tokens; 0 keeps
    the file's own truncation. Open it once, in `initialize`: the host parses each file once per
    model, whatever the number of instances."""

    def __init__(self, path: str = "tokenizer.json", max_length: int = 0):
        from componentize_py_types import Err
        from wit_world.imports import tokenize

        try:
            self._handle = tokenize.Tokenizer.open(path, max_length)
        except Err as e:
            raise Unavailable(f"cannot open tokenizer {path!r}: {e.value}") from None

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
               add_special_tokens: bool = True, spans: bool = False) -> List[Encoding]:
        """Encodes each text (with `pairs[i]` as its second segment when pairs are given).
        A text the tokenizer refuses, or more than 1 MiB of text in one call, raises
        InvalidInput."""
        from componentize_py_types import Err

        try:
            encoded = self._handle.encode(list(texts), list(pairs or []), add_special_tokens, spans)
        except Err as e:
            raise InvalidInput(str(e.value)) from None
        return [Encoding(list(e.ids), list(e.type_ids), bytes(e.special_tokens_mask),
                         [tuple(o) for o in e.offsets], list(e.word_ids), list(e.sequence_ids))
                for e in encoded]

    def encode_tensors(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
                       add_special_tokens: bool = True, pad_id: int = 0,
                       names: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids"),
                       ) -> List[Tensor]:
        """The texts as an encoder's INT64 inputs [len(texts), width], right-padded to the
        longest: the host lays the tensors out, so no token passes through Python (the fast way
        to feed an encoder). Returns tensors named `names` (ids, mask, type ids)."""
        from componentize_py_types import Err

        try:
            padded = self._handle.encode_padded(list(texts), list(pairs or []),
                                                add_special_tokens, pad_id)
        except Err as e:
            raise InvalidInput(str(e.value)) from None
        shape = [padded.rows, padded.width]
        return [Tensor(name, "INT64", shape, data) for name, data in
                zip(names, (padded.input_ids, padded.attention_mask, padded.token_type_ids))]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        from componentize_py_types import Err

        try:
            return self._handle.decode(list(ids), skip_special_tokens)
        except Err as e:
            raise Internal(str(e.value)) from None

    def token_to_id(self, token: str) -> Optional[int]:
        return self._handle.token_to_id(token)


def pad(encodings: Sequence[Encoding], pad_id: int = 0):
    """Right-pads encodings to the longest: (width, input_ids, attention_mask, token_type_ids),
    each flat row-major lists of len(encodings) * width, ready for `Tensor.from_list`."""
    width = max((len(e.ids) for e in encodings), default=0)
    ids: List[int] = []
    mask: List[int] = []
    types: List[int] = []
    for e in encodings:
        gap = width - len(e.ids)
        ids += e.ids + [pad_id] * gap
        mask += [1] * len(e.ids) + [0] * gap
        types += e.type_ids + [0] * gap
    return width, ids, mask, types


def export(model_class):
    """The class componentize-py exports (name it `Model` in the app module) for `model_class`."""
    # Imported here: the bindings exist only inside a componentize-py build.
    from componentize_py_types import Err, Ok
    from wit_world import exports
    from wit_world.imports import output, types

    datatype_name = {d: ("BOOL" if d.name == "BOOLEAN" else d.name) for d in types.Datatype}
    datatype_wit = {v: k for k, v in datatype_name.items()}

    def value(p):
        return p.value.value

    def error(e: BaseException):
        if isinstance(e, InvalidInput):
            return types.Error_InvalidInput(str(e))
        if isinstance(e, Unavailable):
            return types.Error_Unavailable(str(e))
        if not isinstance(e, Internal):
            log("error", "".join(traceback.format_exception(e)))
        return types.Error_Internal(f"{type(e).__name__}: {e}" if not isinstance(e, Internal) else str(e))

    class Adapter(exports.Model):
        instance = None

        def init(self, info):
            try:
                instance = model_class()
                instance.initialize(ModelInfo(info.name, info.version, info.max_batch_size,
                                              {p.name: value(p) for p in info.parameters}))
                Adapter.instance = instance
            except BaseException as e:  # noqa: BLE001 - every failure goes to the host
                raise Err(error(e))

        def execute(self, requests):
            results = []
            for index, wire in enumerate(requests):
                try:
                    if Adapter.instance is None:
                        raise Internal("execute called before init")
                    request = Request(
                        {t.name: Tensor(t.name, datatype_name[t.datatype], list(t.shape), t.data)
                         for t in wire.inputs},
                        list(wire.requested_outputs),
                        {p.name: value(p) for p in wire.parameters},
                    )
                    produced = Adapter.instance.execute(request)
                    if isinstance(produced, dict):
                        produced = list(produced.values())
                    for tensor in produced or []:
                        if not request.wants_output(tensor.name):
                            continue
                        try:
                            output.emit(index, types.Tensor(tensor.name, datatype_wit[tensor.datatype],
                                                            list(tensor.shape), bytes(tensor.data)))
                        except Err as e:
                            raise Internal(str(e.value)) from None
                    results.append(Ok(types.Response([])))
                except BaseException as e:  # noqa: BLE001
                    results.append(Err(error(e)))
            return results

    Adapter.__name__ = "Model"
    return Adapter
