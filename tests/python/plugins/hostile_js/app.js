// A hostile JavaScript plugin for the sandbox tests: the request parameter `attack` picks what
// it tries (a loop, a memory bomb, a network fetch, reading /etc/passwd, throwing); without one
// it echoes TEXT.
class Hostile extends WispModel {
  execute(request) {
    const attack = request.parameters.attack;
    const text = request.input("TEXT");
    if (attack === "loop") {
      for (;;) {}
    }
    if (attack === "memory") {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(16 << 20).fill(1));
    }
    if (attack === "fetch") {
      // No wasi:http in the sandbox: the engine's fetch has nothing to call.
      fetch("http://127.0.0.1:22/");
    }
    if (attack === "passwd") {
      // JavaScript has no file API here; the one way to make the host read a file is its
      // tokenizer, which must stay inside the version folder.
      new Tokenizer("/etc/passwd");
    }
    if (attack === "throw") throw new TypeError("bad luck");
    return [Tensor.fromStrings("OUT", text.shape, text.toStrings())];
  }
}

export const model = exportModel(Hostile);
