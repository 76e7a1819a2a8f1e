"""BPE is trained on the training split only; byte lengths support exact bits per byte."""

import pytest

from moelab.data.tokenizer import EOS, LONG_RUN, PROBE, bounded_runs, load_tokenizer, train_bpe


def test_bpe_round_trip_byte_lengths_and_reload(tmp_path):
    texts = ["def f(x):\n    return x * 2  # café ünïcode\n"] * 50 + ["class A:\n    pass\n"] * 50
    tok = train_bpe(texts, vocab_size=300)
    assert tok.vocab_size <= 300 and tok.eos_token == EOS
    sample = "def g(y):\n    return café + 1\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    lengths = tok.token_byte_lengths()
    assert sum(lengths[i] for i in ids) == len(sample.encode("utf-8"))
    assert lengths[tok.eos_id] == 0
    tok.save(tmp_path / "tk")
    again = load_tokenizer(tmp_path / "tk")
    assert again.encode(sample) == ids and again.eos_id == tok.eos_id


def test_tokenizer_sees_only_training_documents(text_corpus, tmp_path):
    """A word that appears many times only in validation must not become a single token."""
    from moelab.config import DataConfig
    from moelab.data.pipeline import build_dataset
    from moelab.data.split import split_documents
    from moelab.data.sources import load_corpus

    docs = load_corpus(str(text_corpus)).documents
    _, val = split_documents(docs, 0.2)
    for d in val:  # plant a long, frequent word in validation documents only
        (text_corpus / d.name).write_text(d.text + " zyzzyvaquux" * 300)
    ds = build_dataset(DataConfig(source=str(text_corpus), val_fraction=0.2, vocab_size=600),
                       seq_len=32, run_dir=tmp_path / "run")
    assert ds.tokenizer.tk.token_to_id("Ġzyzzyvaquux") is None
    assert len(ds.tokenizer.encode(" zyzzyvaquux")) > 2


def _byte_level_bpe(merges, **model_kw):
    """A byte-level BPE from explicit merges: ids 0 = EOS, 1..256 the bytes, then one per merge."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOS: 0}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab, merges, **model_kw))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOS])
    return tk


def test_fast_encoder_is_used_only_where_it_gives_the_same_ids():
    """The fast (tiktoken) encoder runs for plain byte-level BPE; a tokenizer where tiktoken's
    rank rule would take a merge `tokenizers` never fires (abc made from ab+c, with bc merged first),
    or one with a normalizer or dropout, stays on `tokenizers`; ids equal `tokenizers` either way."""
    from tokenizers import normalizers

    from moelab.data.tokenizer import TextTokenizer

    text = "abc abcabc bcab aab <|endoftext|> xyz"
    plain = TextTokenizer(_byte_level_bpe([("a", "b"), ("ab", "c"), ("Ġ", "abc")]))
    assert plain.fast is not None
    assert plain.encode(text) == plain.tk.encode(text, add_special_tokens=False).ids
    assert plain.encode(text).count(plain.eos_id) == 1  # added tokens are split out as tokenizers does
    trap = TextTokenizer(_byte_level_bpe([("b", "c"), ("a", "b"), ("ab", "c")]))
    assert trap.tk.encode("abc", add_special_tokens=False).ids != [trap.tk.token_to_id("abc")]
    assert trap.fast is None and trap.encode_batch([text]) == trap.encode_batch_slow([text])
    lowered = _byte_level_bpe([("a", "b")])
    lowered.normalizer = normalizers.Lowercase()
    dropout = _byte_level_bpe([("a", "b")], dropout=0.5)
    for tk in (lowered, dropout):
        assert TextTokenizer(tk).fast is None
    assert TextTokenizer(lowered).encode("ABC") == lowered.encode("ABC", add_special_tokens=False).ids


def test_verify_fast_switches_off_on_a_disagreement():
    from moelab.data.tokenizer import TextTokenizer

    tok = TextTokenizer(_byte_level_bpe([("a", "b"), ("ab", "c")]))
    assert tok.verify_fast(["abc " * 100]) and tok.fast is not None
    # force a disagreement: the fast encoder maps "abc" to another id than tokenizers
    import tiktoken

    ranks = dict(tok.fast._mergeable_ranks)
    ranks[b"abc"], ranks[b"ab"] = ranks[b"ab"], ranks[b"abc"]
    tok._fast = tiktoken.Encoding("x", pat_str=tok.fast._pat_str, mergeable_ranks=ranks,
                                  special_tokens=tok.fast._special_tokens)
    assert not tok.verify_fast(["abc " * 100]) and tok.fast is None
    assert tok.encode("abc") == tok.tk.encode("abc", add_special_tokens=False).ids


@pytest.mark.slow
def test_fast_encoder_equals_tokenizers_on_the_stdlib():
    """The default tokenizer (8192 merges on the embedded corpus), every document: same ids."""
    from moelab.data.sources import load_corpus

    docs = [d.text for d in load_corpus("stdlib").documents]
    tok = train_bpe(docs[::3], 8192)
    assert tok.fast is not None
    arrays = tok.encode_arrays(docs + [PROBE])
    assert [a.tolist() for a in arrays] == tok.encode_batch_slow(docs + [PROBE])


def test_bpe_training_takes_long_runs_without_whitespace_in_pieces():
    """One 200,000-character run (a separator line, padding, a PDF's garbage) took BPE training
    15 s on a 0.2 MB corpus, quadratic in the run. The trainer now gets it in pieces of LONG_RUN
    characters, nothing added or lost; text without such runs reaches it unchanged."""
    import re

    normal = [PROBE, "word " * 5000, "x" * (LONG_RUN - 1) + " end"]
    assert list(bounded_runs(normal)) == normal
    text = "head = " + "=" * 200_000 + "\ntail " + "ab" * 1500 + " done"
    pieces = list(bounded_runs([text]))
    assert "".join(pieces) == text and len(pieces) > 200
    assert max(len(m) for p in pieces for m in re.findall(r"\S+", p)) == LONG_RUN
    tok = train_bpe([PROBE * 20, text], 300)  # learnt from the pieces; encodes the whole run losslessly
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text) / 4
