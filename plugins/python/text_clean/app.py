"""Text clean-up before an encoder, as a Python plugin: Unicode normalisation (NFKC), control
characters removed, whitespace collapsed, and personal data masked: e-mail addresses, URLs,
phone numbers and card numbers (13-19 digits passing the Luhn check) become [EMAIL], [URL],
[PHONE] and [CARD].

Input TEXT (BYTES), output CLEAN (BYTES, the same shape). Parameters (config.toml, or per
request): `mask_pii` (default true), `lowercase` (default false).
"""

import re
import unicodedata

import wisp_plugin
from wisp_plugin import InvalidInput, Tensor

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"]+", re.IGNORECASE)
# A run of digits, spaces and dashes that may be a card number (checked with Luhn).
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# Phone numbers: international (+CC and groups of digits), (area) 123-4567, or 123-456-7890;
# not dates or bare digit runs.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)[\s.-]?\d{3}[\s.-]?\d{4}"
    r"|\d{3}[\s.-]\d{3}[\s.-]\d{4})(?!\w)")
SPACE = re.compile(r"\s+")


def luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def mask_card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn(digits) else match.group()


def clean(text: str, mask_pii: bool, lowercase: bool) -> str:
    text = unicodedata.normalize("NFKC", text)
    # Control and format characters (zero-width spaces, BOMs) go; line breaks become spaces.
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    if mask_pii:
        text = EMAIL.sub("[EMAIL]", text)
        text = URL.sub("[URL]", text)
        text = CARD.sub(mask_card, text)
        text = PHONE.sub("[PHONE]", text)
    text = SPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text


def flag(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter '{name}' must be true or false, got {value!r}")
    return value


class TextClean(wisp_plugin.Model):
    def initialize(self, info):
        self.mask_pii = flag(info.parameters, "mask_pii", True)
        self.lowercase = flag(info.parameters, "lowercase", False)

    def execute(self, request):
        mask_pii = flag(request.parameters, "mask_pii", self.mask_pii)
        lowercase = flag(request.parameters, "lowercase", self.lowercase)
        text = request.input("TEXT")
        cleaned = [clean(t, mask_pii, lowercase) for t in text.to_strings()]
        return [Tensor.from_strings("CLEAN", text.shape, cleaned)]


Model = wisp_plugin.export(TextClean)
