"""Data: document sources, document-level split, tokenizer, packing and the resumable loader."""
