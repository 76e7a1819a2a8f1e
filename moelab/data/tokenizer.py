"""Tokenizers: byte-level BPE trained with `tokenizers` on the training split only, or loaded.

`TextTokenizer` wraps a `tokenizers.Tokenizer` with what training needs: an end-of-document id
and each token's length in UTF-8 bytes (for bits per byte).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from moelab.errors import UserError

EOS = "<|endoftext|>"
EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class TextTokenizer:
    def __init__(self, tokenizer, eos_token: str | None = None):
        self.tk = tokenizer
        eos = eos_token or next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if eos is None or tokenizer.token_to_id(eos) is None:
            raise UserError("tokenizer has no end-of-text token (looked for "
                            + ", ".join(EOS_CANDIDATES) + "); add one or train a new tokenizer")
        self.eos_token, self.eos_id = eos, tokenizer.token_to_id(eos)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each token stands for (a byte-level token may hold part of a character);
        b"" for special tokens."""
        symbol_byte = _byte_level_symbols()
        specials = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}
        table = []
        for i in range(self.vocab_size):
            s = self.tk.id_to_token(i)
            if s is None or s in specials:
                table.append(b"")
            elif all(ch in symbol_byte for ch in s):  # byte-level: one symbol per byte
                table.append(bytes(symbol_byte[ch] for ch in s))
            else:
                table.append(self.tk.decode([i]).encode("utf-8"))
        return table

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token stands for; 0 for special tokens."""
        return [len(b) for b in self.token_bytes()]

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        self.tk.save(str(path))
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": self.eos_token}))
        return path


def _byte_level_symbols() -> dict[str, int]:
    """The byte-level (GPT-2) alphabet: printable bytes stand for themselves, the other bytes are
    shifted to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    kept = set(keep)
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tk, EOS)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """From a tokenizer.json file, or a directory holding one (a Hugging Face tokenizer dir)."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"tokenizer not found: {path} (give a tokenizer.json or a directory with one)")
    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise UserError(f"cannot read tokenizer {file}: {str(exc).splitlines()[0]}") from None
    eos = None
    cfg_file = file.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            eos = json.loads(cfg_file.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        except (json.JSONDecodeError, AttributeError):
            eos = None
    return TextTokenizer(tk, eos)
