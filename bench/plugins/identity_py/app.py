"""The no-op for bench/plugin_call_cost.sh: OUTPUT0 is INPUT0, as plugins/identity (Rust)."""

import wisp_plugin
from wisp_plugin import Tensor


class Identity(wisp_plugin.Model):
    def execute(self, request):
        data = request.input("INPUT0")
        return [Tensor("OUTPUT0", data.datatype, data.shape, data.data)]


Model = wisp_plugin.export(Identity)
