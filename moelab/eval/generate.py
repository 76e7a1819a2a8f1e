"""Text generation: greedy or sampled (temperature, top-k, top-p), with or without a KV cache.

The cached path feeds the prompt once, then one token per step; the uncached path re-runs the whole
sequence every step. Both give the same tokens (a test checks every attention type). Several
prompts decode together in one batch, left-padded (`generate_batch`): each gets the tokens it gets
alone, and one that is done leaves the batch. On a CPU a decoding step is bound by reading the
weights, so a batch of prompts takes little longer per step than one.

Sampling draws from a seeded CPU generator over fp32 probabilities, so a seed gives the same text
on any device. Capacity-limited routers route without a capacity while generating: which tokens
an expert drops depends on how many tokens share a forward, which differs between a full forward
and one-token steps, and dropping a prompt token for lack of room helps no one at inference.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from moelab.errors import UserError


@contextlib.contextmanager
def inference_routing(model):
    """Eval mode (no router noise) and no expert capacity, restored afterwards."""
    was_training = model.training
    routers = getattr(model, "routers", [])
    saved = [r.capacity_factor for r in routers]
    model.eval()
    for r in routers:
        r.capacity_factor = 0.0
    try:
        yield model
    finally:
        for r, cf in zip(routers, saved):
            r.capacity_factor = cf
        model.train(was_training)


def next_token_probs(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution over the vocabulary after temperature, top-k and top-p (nucleus: the
    smallest set of most likely tokens whose probability reaches top_p)."""
    logits_V = logits_V.float()
    # shifted so the top logit is 0 before dividing: a tiny temperature then sends the others to -inf,
    # not every logit to +-inf (softmax of inf is nan, and multinomial raised)
    # (a temperature below float32's smallest normal number was 0 in float32: 0/0 is nan)
    logits_V = (logits_V - logits_V.max()) / max(temperature, torch.finfo(torch.float32).tiny)
    if 0 < top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = logits_V.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs_V.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the more likely tokens
        drop = before >= top_p
        drop[0] = False
        probs_V = probs_V.clone()
        probs_V[order[drop]] = 0.0
        probs_V = probs_V / probs_V.sum()
    return probs_V


SEED_MIN, SEED_MAX = -2**63, 2**64 - 1


@dataclass
class Sampler:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self):
        # nan fails both; an infinite temperature drew uniformly from every token
        if not 0 <= self.temperature < math.inf or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError(f"bad sampling settings: temperature {self.temperature} (>= 0, finite), top-k "
                            f"{self.top_k} (>= 0), top-p {self.top_p} (in (0, 1])")
        if not SEED_MIN <= self.seed <= SEED_MAX:  # torch's generator takes a 64-bit seed
            raise UserError(f"seed {self.seed} is out of range; give a whole number from {SEED_MIN} to {SEED_MAX}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def fresh(self, seed: int | None = None) -> "Sampler":
        """These settings, with a generator of its own at `seed` (default: this sampler's; one past
        the 64-bit range wraps around, as torch's generator takes it)."""
        seed = self.seed if seed is None else seed if seed <= SEED_MAX else seed - 2**64
        return Sampler(self.temperature, self.top_k, self.top_p, seed)

    def __call__(self, logits_V: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits_V.argmax())
        probs_V = next_token_probs(logits_V.cpu(), self.temperature, self.top_k, self.top_p)
        return int(torch.multinomial(probs_V, 1, generator=self.generator))


def check_prompt(model, prompt_ids: list[int]) -> int:
    """Refuse a prompt generation cannot continue; returns the model's context length."""
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token of text")
    max_len = model.rope_cos.shape[0]
    if len(prompt_ids) >= max_len:
        raise UserError(f"prompt has {len(prompt_ids)} tokens; the model's context is {max_len}")
    return max_len


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler | None = None,
                 eos_id: int | Iterable[int] | None = None, use_cache: bool = True, stop=None,
                 vocab: int | None = None) -> tuple[list[int], str]:
    """New token ids after `prompt_ids` and why generation stopped ('eos', 'stop', 'length' or
    'context' when model.max_seq_len is reached). `eos_id`: the end-of-text id, or several.
    `stop(new_ids)` -> True ends generation. `vocab`:
    only ids below it are drawn (a tokenizer's size, where the model's vocabulary is padded past it:
    those rows were never a target, and no text decodes from them)."""
    new, why, _ = generate_batch(model, [prompt_ids], max_new_tokens, [sampler or Sampler()], eos_id, use_cache,
                                 [stop], vocab)[0]
    return new, why


# Prompt tokens (all rows together) one prefill forward takes: longer prompts are read into the cache in
# chunks of positions. In one pass a batch of long prompts held a (B, S, S) attention mask and every
# prompt token's expert activations at once: 8 prompts of 32K tokens, an 8.6 GB mask alone.
PREFILL_TOKENS = 8192


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, samplers: list[Sampler] | None = None,
                   eos_id: int | Iterable[int] | None = None, use_cache: bool = True, stops: list | None = None,
                   vocab: int | None = None, on_token=None,
                   prefill_tokens: int = PREFILL_TOKENS) -> list[tuple[list[int], str, float]]:
    """`generate_ids` for several prompts decoded together, as one batch (left-padded; see
    moelab.models.kvcache): for each, its new ids, why it stopped and the seconds from the start
    until it did. Each prompt's tokens are those it gets alone, up to floating-point rounding of the
    batched products. `samplers[i]` and `stops[i]` are prompt i's; a finished prompt leaves the batch,
    so the others run on without its rows. Without the cache the prompts run one after another.
    `on_token(i, new_ids)` is called with prompt i's new ids after each one it draws. With the cache,
    the prompts are read in chunks of about `prefill_tokens` tokens in all (a position range of every
    row at a time), each attending to the cache so far: the memory of a prefill is bounded whatever
    the prompts' length."""
    if not prompts:
        return []
    samplers = samplers or [Sampler() for _ in prompts]
    stops = stops or [None] * len(prompts)
    ends = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    max_len = max(check_prompt(model, p) for p in prompts)
    if max_new_tokens < 0:
        raise UserError(f"max new tokens is {max_new_tokens}; give 0 or more")
    if not use_cache and len(prompts) > 1:
        return [generate_batch(model, [p], max_new_tokens, [s], eos_id, False, [st], vocab,
                               on_token and (lambda _, new, i=i: on_token(i, new)))[0]
                for i, (p, s, st) in enumerate(zip(prompts, samplers, stops))]
    start = time.perf_counter()
    if max_new_tokens == 0:
        return [([], "length", 0.0) for _ in prompts]
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    done: list = [None] * len(prompts)
    new: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompt of each batch row
    with inference_routing(model):
        cache = None
        if use_cache:
            cache = model.new_cache(width + max_new_tokens, torch.tensor([width - len(p) for p in prompts],
                                                                         device=device))
        chunk = max(1, prefill_tokens // len(prompts)) if use_cache else width
        for s in range(0, width, chunk):
            out = model(ids[:, s:s + chunk], cache=cache, logits=False)  # each prompt's last position only
        logits_BV = out.project(out.hidden[:, -1])
        while True:
            going = []
            for j, (i, tok) in enumerate(zip(rows, _draw(logits_BV, [samplers[i] for i in rows], vocab))):
                new[i].append(tok)
                if on_token is not None:
                    on_token(i, new[i])
                why = ("eos" if tok in ends else "stop" if stops[i] is not None and stops[i](new[i])
                       else "length" if len(new[i]) >= max_new_tokens
                       else "context" if len(prompts[i]) + len(new[i]) >= max_len else None)
                if why is None:
                    going.append(j)
                else:
                    done[i] = (new[i], why, time.perf_counter() - start)
            if not going:
                return done
            if len(going) < len(rows):
                rows = [rows[j] for j in going]
                if cache is not None:
                    cache.keep(going)
            next_B1 = torch.tensor([[new[i][-1]] for i in rows], device=device)
            if use_cache:
                logits_BV = model(next_B1, cache=cache).logits[:, -1]
            else:  # one prompt, no padding
                ids = torch.cat([ids, next_B1], dim=1)
                out = model(ids, logits=False)
                logits_BV = out.project(out.hidden[:, -1])


def _draw(logits_BV: torch.Tensor, samplers: list[Sampler], vocab: int | None) -> list[int]:
    """Each row's next token by its sampler (greedy rows in one argmax)."""
    if all(s.temperature == 0 for s in samplers):
        return logits_BV[:, :vocab].argmax(-1).tolist()
    return [s(row[:vocab]) for s, row in zip(samplers, logits_BV)]


class TextStream:
    """A prompt's new text written as it is decoded, every piece final: a character whose bytes are
    not all drawn yet (a trailing U+FFFD) waits for them, and the last len(longest stop string) - 1
    characters wait in case a stop string starts there (text from the stop string on is cut).
    Called with the new ids after each token, before generation checks its stop strings.
    A decoder that rewrites text already written (none of the byte-level or SentencePiece ones)
    makes the rest wait for the end; should the final text then not continue what was written,
    it is written again whole on a line of its own."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], write):
        self.tokenizer, self.write, self.stops = tokenizer, write, stop_strings
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.written, self.live = "", True

    def update(self, new_ids: list[int]) -> None:
        if not self.live:
            return
        text = self.tokenizer.decode([t for t in new_ids if t not in self.tokenizer.end_ids])
        if found := [text.find(s) for s in self.stops if s in text]:
            text = text[:min(found)]  # the final text: generation stops here
        else:
            text = text.rstrip("\ufffd")
            text = text[:max(len(text) - self.hold, 0)]
        if not text.startswith(self.written):
            self.live = False
        elif len(text) > len(self.written):
            self.write(text[len(self.written):])
            self.written = text

    def finish(self, text: str) -> None:
        self.write(text[len(self.written):] if text.startswith(self.written) else "\n" + text)


def read_prompts(path: str) -> list[str]:
    """The prompts of a file: one per line (blank lines skipped), or for a .jsonl file one JSON object
    per line with a "prompt" string (for prompts with line breaks of their own)."""
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {path} ({e.strerror or e}); give a text or .jsonl file "
                        "of prompts") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if p.suffix.lower() != ".jsonl":
        prompts = [line for _, line in lines]
    else:
        prompts = []
        for n, line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f"{path} line {n}: not a JSON object with a \"prompt\" string; give one "
                                "object per line, e.g. {\"prompt\": \"def parse(\"}")
            prompts.append(record["prompt"])
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts")
    return prompts


def prompt_ids(tokenizer, prompt: str, system: str | None = None, chat: bool = False) -> list[int]:
    """The ids generation starts from: the text as the model saw a document begin, or with `chat`,
    the user message `prompt` (after a `system` one, if given) laid out by the model's chat template
    up to the assistant's reply."""
    if not chat:
        return tokenizer.encode_prompt(prompt)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return tokenizer.encode_chat(messages + [{"role": "user", "content": prompt}])


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, sampler: Sampler | None = None,
                  stop_strings: tuple[str, ...] = (), use_cache: bool = True, ids: list[int] | None = None) -> dict:
    """Continue `prompt` (from `ids` where given: see prompt_ids); see generate_texts."""
    return generate_texts(model, tokenizer, [prompt], max_new_tokens, sampler, stop_strings, use_cache,
                          None if ids is None else [ids])[0]


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, sampler: Sampler | None = None,
                   stop_strings: tuple[str, ...] = (), use_cache: bool = True, ids: list[list[int]] | None = None,
                   batch_size: int = 8, seeds: list[int] | None = None, stream=None) -> list[dict]:
    """Continue each prompt (from ids[i] where given: see prompt_ids), up to `batch_size` of them
    decoded together (longest first, so a batch holds prompts of similar lengths: little padding).
    Each text is cut before the first stop string (which ends generation). Prompt i samples from a
    generator of its own at seeds[i] (default: the sampler's seed + i, so a prompt given twice gets
    two samples), so its text does not depend on the batching. Also returned: the token counts, and
    the seconds from its batch's start until it was done. `stream(text)`, for a single prompt: its
    text written as it is decoded (see TextStream), the pieces adding up to the returned text."""
    if "" in stop_strings:
        raise UserError("an empty stop string ends the text before it starts; give some text")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: give 1 or more prompts per batch")

    def hit(new_ids):
        text = tokenizer.decode(new_ids)
        return any(s in text for s in stop_strings)

    if stream is not None and len(prompts) != 1:
        raise ValueError("stream takes a single prompt's text")
    live = TextStream(tokenizer, stop_strings, stream) if stream is not None else None
    sampler = sampler or Sampler()
    seeds = [sampler.seed + i for i in range(len(prompts))] if seeds is None else seeds
    ids = [tokenizer.encode_prompt(p) for p in prompts] if ids is None else ids
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    out: list = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        results = generate_batch(model, [ids[i] for i in batch], max_new_tokens,
                                 [sampler.fresh(seeds[i]) for i in batch],
                                 tokenizer.end_ids, use_cache, [hit if stop_strings else None] * len(batch),
                                 vocab=tokenizer.vocab_size,
                                 on_token=None if live is None else lambda _, new: live.update(new))
        for i, (new, reason, seconds) in zip(batch, results):
            text = tokenizer.decode([t for t in new if t not in tokenizer.end_ids])
            if reason == "stop":
                text = text[:min(text.find(s) for s in stop_strings if s in text)]
            if live is not None:
                live.finish(text)
            out[i] = {"prompt": prompts[i], "text": text, "new_tokens": len(new), "stop_reason": reason,
                      "prompt_tokens": len(ids[i]), "seconds": seconds}
    return out
