"""The host's tokenize import from Python: TEXT (and PAIR) → padded ids, masks, type ids,
character offsets and words, and each text decoded back. With the request parameter
`padded`, the ids, masks and type ids come from encode_tensors (the host's layout)."""

import wisp_plugin
from wisp_plugin import Tensor


class Tokenize(wisp_plugin.Model):
    def initialize(self, info):
        self.tokenizer = wisp_plugin.Tokenizer("tokenizer.json", int(info.parameters["max_length"]))

    def execute(self, request):
        text = request.input("TEXT")
        texts = text.to_strings()
        pairs = request.inputs["PAIR"].to_strings() if "PAIR" in request.inputs else None
        encodings = self.tokenizer.encode(texts, pairs, spans=True)
        width, ids, mask, types = wisp_plugin.pad(encodings, self.tokenizer.token_to_id("[PAD]") or 0)
        offsets, words = [], []
        for e in encodings:
            gap = width - len(e.ids)
            offsets += [v for start_end in e.offsets for v in start_end] + [0, 0] * gap
            words += e.word_ids + [-1] * gap
        rows = len(encodings)
        if request.parameters.get("padded"):
            # The host lays out the tensors (encode-padded).
            pad_id = self.tokenizer.token_to_id("[PAD]") or 0
            tensors = self.tokenizer.encode_tensors(texts, pairs, pad_id=pad_id)
        else:
            tensors = [Tensor.from_list("input_ids", "INT64", [rows, width], ids),
                       Tensor.from_list("attention_mask", "INT64", [rows, width], mask),
                       Tensor.from_list("token_type_ids", "INT64", [rows, width], types)]
        return tensors + [
            Tensor.from_list("offsets", "INT64", [rows, width, 2], offsets),
            Tensor.from_list("word_ids", "INT64", [rows, width], words),
            Tensor.from_strings("decoded", [rows], [self.tokenizer.decode(e.ids) for e in encodings]),
        ]


Model = wisp_plugin.export(Tokenize)
