"""BPE is trained on the training split only; byte lengths support exact bits per byte."""

from moelab.data.tokenizer import EOS, load_tokenizer, train_bpe


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
    from moelab.data.sources import files_corpus

    docs = files_corpus(str(text_corpus)).documents
    _, val = split_documents(docs, 0.2)
    for d in val:  # plant a long, frequent word in validation documents only
        (text_corpus / d.name).write_text(d.text + " zyzzyvaquux" * 300)
    ds = build_dataset(DataConfig(source=str(text_corpus), val_fraction=0.2, vocab_size=600),
                       seq_len=32, run_dir=tmp_path / "run")
    assert ds.tokenizer.tk.token_to_id("Ġzyzzyvaquux") is None
    assert len(ds.tokenizer.encode(" zyzzyvaquux")) > 2
