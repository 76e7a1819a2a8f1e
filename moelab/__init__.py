"""moelab: train, evaluate and diagnose Mixture-of-Experts language models.

Imports are lazy so that `moelab --help` does not pay for importing torch.
"""

__version__ = "0.1.0"
__all__ = ["load", "load_model", "Config", "__version__"]


def __getattr__(name):
    if name == "load":  # load(path, device="cpu", dtype=None) -> .model (eval mode), .tokenizer, .run_dir, .cfg
        from moelab.eval.target import load_target

        return load_target
    if name == "load_model":
        from moelab.train.checkpoint import load_model

        return load_model
    if name == "Config":
        from moelab.config import Config

        return Config
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")
