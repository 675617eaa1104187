"""TEXT [n, 1] → input_ids, attention_mask, token_type_ids [n, width] with the host's tokenizer."""

import wisp_plugin


class Tokenize(wisp_plugin.Model):
    def initialize(self, info):
        self.tokenizer = wisp_plugin.Tokenizer("tokenizer.json", int(info.parameters["max_length"]))

    def execute(self, request):
        return self.tokenizer.encode_tensors(request.input("TEXT").to_strings())


Model = wisp_plugin.export(Tokenize)
