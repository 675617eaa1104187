"""A hostile Python plugin for the sandbox tests: the request parameter `attack` picks what it
tries (a loop, a memory bomb, reading /etc/passwd, opening a socket, raising); without one it
echoes TEXT."""

import socket

import wisp_plugin
from wisp_plugin import Tensor


class Hostile(wisp_plugin.Model):
    def initialize(self, info):
        if info.parameters.get("fail_init"):
            raise RuntimeError("init refuses on purpose")

    def execute(self, request):
        attack = request.parameters.get("attack")
        text = request.input("TEXT")
        if attack == "loop":
            while True:
                pass
        if attack == "memory":
            hoard = []
            while True:
                hoard.append(bytearray(16 << 20))
        if attack == "passwd":
            with open("/etc/passwd") as f:
                return [Tensor.from_strings("OUT", text.shape, [f.read()[:100]])]
        if attack == "socket":
            s = socket.create_connection(("127.0.0.1", 22), timeout=1)
            s.close()
            return [Tensor.from_strings("OUT", text.shape, ["connected"])]
        if attack == "raise":
            raise ValueError("bad luck")
        return [Tensor.from_strings("OUT", text.shape, text.to_strings())]


Model = wisp_plugin.export(Hostile)
