// Sentence splitting before an encoder, as a JavaScript plugin: each text becomes its
// sentences (a JSON array of strings), split after ., ! or ? (and their full-width and
// Devanagari forms) followed by a space or the end, not after common abbreviations or
// initials. Input TEXT (BYTES), output SENTENCES (BYTES, the same shape). Parameter
// `max_sentences` (default 256) bounds what one text may give.

const ABBREVIATIONS = new Set(["mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "inc", "ltd"]);
// Western and Devanagari terminators end a sentence before a space or the end; CJK full-width
// ones (no spaces between sentences) wherever they are. Closing quotes and brackets stay with it.
const END = /[.!?\u0964]+["')\]]*(?=\s|$)|[\u3002\uff01\uff1f]+[\u300d\u300f"')\]]*/g;

function split(text, max) {
  const sentences = [];
  let start = 0;
  for (const match of text.matchAll(END)) {
    const end = match.index + match[0].length;
    const before = text.slice(start, match.index).split(/\s+/).pop().toLowerCase();
    // "Dr." and "J." do not end a sentence. (No Unicode property escapes: the engine has no
    // ICU. A one-character word with case is a letter.)
    const initial = before.length === 1 && before.toUpperCase() !== before.toLowerCase();
    if (match[0].startsWith(".") && !match[0].startsWith("..") && (ABBREVIATIONS.has(before) || initial)) continue;
    const sentence = text.slice(start, end).trim();
    if (sentence) sentences.push(sentence);
    start = end;
    if (sentences.length > max) throw new InvalidInput(`a text has more than max_sentences = ${max} sentences`);
  }
  const rest = text.slice(start).trim();
  if (rest) sentences.push(rest);
  if (sentences.length > max) throw new InvalidInput(`a text has more than max_sentences = ${max} sentences`);
  return sentences;
}

class SentenceSplit extends WispModel {
  initialize(info) {
    this.max = info.parameters.max_sentences ?? 256;
    if (!Number.isInteger(this.max) || this.max < 1) {
      throw new InvalidInput(`parameter 'max_sentences' must be a positive integer, got ${this.max}`);
    }
  }

  execute(request) {
    const text = request.input("TEXT");
    return [Tensor.fromStrings("SENTENCES", text.shape, text.toStrings().map((t) => JSON.stringify(split(t, this.max))))];
  }
}

export const model = exportModel(SentenceSplit);
