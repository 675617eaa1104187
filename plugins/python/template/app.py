"""Template for a wisp model plugin in Python: copy this folder and replace `Scale` with your
model. It scales an FP32 tensor by the `factor` parameter of config.toml (beside this file).

    wisp plugin build plugins/python/template --install model_repository/scale
"""

import os

import wisp_plugin
from wisp_plugin import InvalidInput, Tensor


class Scale(wisp_plugin.Model):
    def initialize(self, info):
        # Parameters come from `[parameters]` in config.toml; anything expensive (a vocabulary
        # from the version folder, say) belongs here: it runs once per instance.
        factor = info.parameters.get("factor", 1.0)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            raise InvalidInput(f"parameter 'factor' must be a number, got {factor!r}")
        self.factor = float(factor)
        # The version folder is readable as "."; nothing else is.
        wisp_plugin.log("info", f"{info.name} v{info.version} ready: factor {self.factor}, "
                                f"{len(os.listdir('.'))} files")

    def execute(self, request):
        # The host has already checked names, datatypes and shapes against config.toml; with
        # max_batch_size > 0 the first dimension is the batch.
        data = request.input("INPUT0")
        scaled = [v * self.factor for v in data.to_list()]
        return [Tensor.from_list("OUTPUT0", "FP32", data.shape, scaled)]


Model = wisp_plugin.export(Scale)
