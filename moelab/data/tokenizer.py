"""Tokenizers: byte-level BPE trained with `tokenizers` on the training split only, or loaded.

`TextTokenizer` wraps a `tokenizers.Tokenizer` with what training needs: an end-of-document id
and each token's length in UTF-8 bytes (for bits per byte).

Fast encoding: a plain byte-level BPE (what `train_bpe` makes, and GPT-2-style tokenizers) is
encoded with `tiktoken`'s BPE core, about 4x faster per core than `tokenizers`' encoder, with the same
ids: same pre-tokenizer regex, merges ranked by the id of the token they make (the ids increase
in merge order), the same added tokens split out of the text. Anything else (a normalizer, another
pre-tokenizer, BPE dropout, unknown-token handling, non-monotone ids) stays on `tokenizers`, and so
does every tokenizer whose fast encoder disagrees with `tokenizers` on a probe (mixed text and
every token's own text); `data prepare` also compares both on a sample of its documents.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from moelab.errors import UserError

EOS = "<|endoftext|>"
# The Hugging Face files that go with a tokenizer.json and the weights: its settings and special
# tokens, its chat template, and the generation defaults (the end-of-text ids `generate` stops at,
# sampling settings). A tokenizer read from a folder that has them saves them along; a converted
# run keeps them in its tokenizer/ and an export writes them beside the weights.
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")
EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class TextTokenizer:
    def __init__(self, tokenizer, eos_token: str | None = None):
        self.tk = tokenizer
        eos = eos_token or next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if eos_token and tokenizer.token_to_id(eos_token) is None:  # a tokenizer_config.json naming another
            raise UserError(f"the tokenizer's end-of-text token {eos_token!r} (its tokenizer_config.json's eos_token) "
                            "is not in its vocabulary; fix eos_token, or use the model's own tokenizer files")
        if eos is None:
            raise UserError("tokenizer has no end-of-text token (looked for "
                            + ", ".join(EOS_CANDIDATES) + "); add one or train a new tokenizer")
        self.eos_token, self.eos_id = eos, tokenizer.token_to_id(eos)
        self.end_ids = frozenset({self.eos_id})  # generation stops at any (see load_tokenizer)
        self.origin: Path | None = None  # the folder it was read from, whose HF_SIDE_FILES `save` copies
        self._fast = None  # tiktoken encoder, built on first use (False: not applicable)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def fast(self):
        """The tiktoken encoder with ids equal to this tokenizer's, or None where none applies."""
        if self._fast is None:
            self._fast = _fast_encoder(self.tk) or False
        return self._fast or None

    def verify_fast(self, texts: list[str], budget: int = 1 << 16) -> bool:
        """Compare the fast encoder with `tokenizers` on up to `budget` characters of `texts`; on any
        difference switch the fast encoder off for good. True when the fast encoder stays on."""
        if self.fast is None:
            return False
        sample, size = [], 0
        for t in texts:
            sample.append(t[: budget - size])
            size += len(sample[-1])
            if size >= budget:
                break
        if [self.fast.encode(t, allowed_special="all") for t in sample] != self.encode_batch_slow(sample):
            self._fast = False
        return self.fast is not None

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text, allowed_special="all")
        return self.tk.encode(text, add_special_tokens=False).ids

    @property
    def doc_prefix(self) -> list[int]:
        """The special tokens the tokenizer's post-processor puts before a text (Llama's and
        Mixtral's `<s>`; none for a tokenizer trained here), found once on a probe text."""
        if not hasattr(self, "_doc_prefix"):
            ids = self.tk.encode("a", add_special_tokens=True).ids
            plain = self.tk.encode("a", add_special_tokens=False).ids
            start = next((i for i in range(len(ids) - len(plain) + 1) if ids[i:i + len(plain)] == plain), 0)
            self._doc_prefix = ids[:start]
        return self._doc_prefix

    def encode_prompt(self, text: str) -> list[int]:
        """A text as transformers' `tokenizer(text)` and lm_eval's transformers backend encode it:
        after the tokens the tokenizer puts before a text (doc_prefix), as the model saw its
        documents begin. Not those it puts after (an `</s>` some tokenizers append): a prompt that
        ended its document would have the model start another."""
        return self.doc_prefix + self.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation (`{"role", "content"}` dicts) as the model's chat template renders it,
        ending with the opening of the assistant's turn: transformers' `apply_chat_template(messages,
        add_generation_prompt=True)`, run by transformers on the tokenizer's own folder (its
        chat_template.jinja, or tokenizer_config.json's chat_template)."""
        where = self.origin or "this tokenizer"
        if not hasattr(self, "_chat"):  # read once, for every prompt
            try:
                from transformers import PreTrainedTokenizerFast
            except ImportError:
                raise UserError("--chat renders the model's chat template with transformers: "
                                "pip install 'moelab[hf]'") from None
            self._chat = PreTrainedTokenizerFast.from_pretrained(str(self.origin)) if self.origin else None
        hf = self._chat
        if hf is None or not hf.chat_template:
            raise UserError(f"{where} has no chat template (chat_template.jinja, or chat_template in "
                            "tokenizer_config.json), so --chat cannot lay out the messages; give the prompt as "
                            "plain text without --chat, or use a chat model's tokenizer files")
        from jinja2 import TemplateError

        try:
            ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except TemplateError as e:  # a template's own raise_exception(...), a syntax error, or jinja2's own
            raise UserError(f"the chat template of {where} failed on these messages: "
                            f"{type(e).__name__}: {e}") from None
        return list(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            return [a.tolist() for a in self.encode_arrays(texts)]
        return self.encode_batch_slow(texts)

    def encode_batch_slow(self, texts: list[str]) -> list[list[int]]:
        """Always through `tokenizers` (the reference the fast path is checked against)."""
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str], threads: int | None = None) -> list[np.ndarray]:
        """One uint32 array per text, encoded on `threads` threads (default: every usable core)."""
        if self.fast is None:
            return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch_slow(texts)]
        from moelab.data.parallel import thread_map

        enc = self.fast
        return thread_map(lambda t: enc.encode_to_numpy(t, allowed_special="all"), texts, threads or 0)

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each token stands for (a byte-level or byte-fallback token may hold part
        of a character); b"" for special tokens. Three vocabularies are read token by token:
        byte-level BPE (GPT-2's alphabet, one symbol per byte); SentencePiece-style pieces (Llama,
        Mistral, Mixtral: "▁" stands for a space, `<0xNN>` for one byte), where decoding a
        piece alone would drop its leading space and turn a partial character into U+FFFD; any
        other token is decoded. SentencePiece also writes a space before each document's first
        word that the text does not have: at most one byte per document is counted in excess."""
        import re

        specials = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}
        byte_level, space, fallback = _vocabulary_kind(self.tk)
        symbol_byte = _byte_level_symbols() if byte_level or not space else {}
        byte_piece = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        table = []
        for i in range(self.vocab_size):
            s = self.tk.id_to_token(i)
            if s is not None and fallback and (m := byte_piece.fullmatch(s)):
                table.append(bytes([int(m[1], 16)]))
            elif s is None or s in specials:
                table.append(b"")
            elif symbol_byte and all(ch in symbol_byte for ch in s):  # byte-level: one symbol per byte
                table.append(bytes(symbol_byte[ch] for ch in s))
            elif space:
                table.append(s.replace(space, " ").encode("utf-8"))
            else:
                table.append(self.tk.decode([i]).encode("utf-8"))
        return table

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token stands for; 0 for special tokens."""
        return [len(b) for b in self.token_bytes()]

    def save(self, directory: Path) -> Path:
        """tokenizer.json, and the HF_SIDE_FILES of the folder it was read from (a fine-tuned
        model keeps its base's chat template and end ids), else a tokenizer_config.json naming
        the end-of-text token."""
        import shutil

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        self.tk.save(str(path))
        side = [self.origin / f for f in HF_SIDE_FILES if self.origin is not None and (self.origin / f).is_file()]
        for f in side:
            if f.resolve() != (directory / f.name).resolve():
                shutil.copy2(f, directory / f.name)
        if not any(f.name == "tokenizer_config.json" for f in side):
            (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": self.eos_token}))
        return path


def _vocabulary_kind(tk) -> tuple[bool, str | None, bool]:
    """(byte-level: a ByteLevel pre-tokenizer or decoder; the symbol that stands for a space in
    SentencePiece-style token strings, or None: a Metaspace pre-tokenizer or decoder, or a decoder
    that replaces a symbol by a space, as in Llama's and Mistral's tokenizer.json; whether
    `<0xNN>` tokens are single bytes: BPE byte fallback), read from the tokenizer's JSON."""
    spec = json.loads(tk.to_str())
    byte_level, space = False, None
    parts = []
    for key in ("pre_tokenizer", "decoder"):
        node = spec.get(key) or {}
        parts += node.get("pretokenizers") or node.get("decoders") or [node]
    for part in parts:
        if part.get("type") == "ByteLevel":
            byte_level = True
        elif part.get("type") == "Metaspace":
            space = part.get("replacement") or "\u2581"
        elif part.get("type") == "Replace" and part.get("content") == " ":
            space = (part.get("pattern") or {}).get("String") or space
    return byte_level, None if byte_level else space, bool((spec.get("model") or {}).get("byte_fallback"))


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


# tokenizers' ByteLevel pre-tokenizer (use_regex=True): the GPT-2 pattern.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE = ("def f(x):\n\treturn x  # café naïve\r\n\n    \u00a0 it's 3.14e-5 don't\n"
         "中文字符 😀 ﬁ <|endoftext|> 'll 'S Ωmega  \t\n\n\nend")


def _fast_encoder(tk):
    """A tiktoken Encoding giving the same ids as `tk`, or None (see the module docstring)."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tk.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain = (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
             and not pre.get("add_prefix_space") and pre.get("use_regex", True)
             and model.get("type") == "BPE" and model.get("dropout") in (None, 0.0)
             and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
             and not model.get("byte_fallback") and not model.get("ignore_merges"))
    if not plain:
        return None
    symbols = _byte_level_symbols()
    specials = {}
    for t in spec.get("added_tokens") or []:
        if t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return None
        specials[t["content"]] = t["id"]
    ranks = {}
    for s, i in model["vocab"].items():
        if s in specials:
            continue
        if not all(c in symbols for c in s):
            return None
        ranks[bytes(symbols[c] for c in s)] = i
    if sum(len(b) == 1 for b in ranks) != 256:
        return None
    # Every multi-byte token is made by exactly one merge, and the ids grow in merge order: then the
    # lowest-ranked pair rule (tokenizers) and the lowest-id mergeable pair (tiktoken) agree.
    last = -1
    made = set()
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = model["vocab"].get(a + b)
        if i is None or i <= last or a + b in made:
            return None
        made.add(a + b)
        last = i
    if len(made) != len(ranks) - 256:
        return None
    try:
        enc = tiktoken.Encoding("moelab", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks,
                                special_tokens=specials)
    except Exception:  # tiktoken refuses the table (e.g. a gap it does not allow)
        return None
    # Probe: mixed text, and every token's own text. A token only reachable through a merge that
    # `tokenizers` never fires, but that tiktoken's rank rule would take, shows up here.
    texts = [PROBE]
    for s in model["vocab"]:
        if s not in specials:
            try:
                texts.append(bytes(symbols[c] for c in s).decode("utf-8"))
            except UnicodeDecodeError:  # part of a character
                pass
    fast = [enc.encode(t, allowed_special="all") for t in texts]
    if fast != [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]:
        return None
    return enc


LONG_RUN = 1000  # characters without whitespace that BPE training takes as one piece
_LONG_RUN = re.compile(r"\S{%d,}" % LONG_RUN)


def bounded_runs(texts: Iterable[str]) -> Iterator[str]:
    """The texts, with every run of LONG_RUN or more characters without whitespace passed on in
    pieces of LONG_RUN (each its own text: no character is added). tokenizers' BPE trainer takes
    time quadratic in the length of one pre-tokenized word: a single 200,000-character line of
    '=' or 'x' (a separator, a padding run, a PDF's garbage) took 15 s of a 0.2 MB corpus, and
    2 MB would take 25 minutes. Text without such runs is passed on unchanged, so its tokenizer
    is the same; a long run's merges are learnt from its pieces."""
    for text in texts:
        if len(text) < LONG_RUN or _LONG_RUN.search(text) is None:
            yield text
            continue
        start = 0
        for m in _LONG_RUN.finditer(text):
            yield text[start:m.start()]
            yield from (text[i:i + LONG_RUN] for i in range(m.start(), m.end(), LONG_RUN))
            start = m.end()
        yield text[start:]


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(bounded_runs(texts), trainer=trainer)
    return TextTokenizer(tk, EOS)


def fewer_tokens_note(learnt: int, asked: str) -> str:
    """A BPE tokenizer trained on text with fewer distinct merges than the vocabulary asked for."""
    return (f"note: the BPE tokenizer has {learnt} tokens, fewer than {asked}: its training text had no more "
            "pairs to merge (more or more varied text gives more)")


def read_tokenizer_file(file: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json; a damaged one is a one-line UserError."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise UserError(f"cannot read tokenizer {file}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """From a tokenizer.json file, or a directory holding one (a Hugging Face tokenizer dir)."""
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"tokenizer not found: {path} (give a tokenizer.json or a directory with one)")
    tk = read_tokenizer_file(file)
    eos = None
    cfg_file = file.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            eos = json.loads(cfg_file.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        except (json.JSONDecodeError, AttributeError):
            eos = None
    tok = TextTokenizer(tk, eos if isinstance(eos, str) else None)  # (a number was a traceback in tokenizers)
    tok.end_ids |= _generation_end_ids(file.parent / "generation_config.json", tok.vocab_size)
    tok.origin = file.parent
    return tok


def _generation_end_ids(file: Path, vocab_size: int) -> frozenset[int]:
    """The end-of-text ids of a Hugging Face generation_config.json beside the tokenizer (an
    instruction-tuned model ends a turn with one token and a document with another); none for a
    file that is absent or unreadable."""
    try:
        ids = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return frozenset()
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size)
