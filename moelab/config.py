"""Typed run configuration: one dataclass tree, YAML in/out, dotted overrides, strict validation.

Resolution order for `moelab train`: preset -> YAML file -> command-line overrides. Derived values
(head_dim, n_kv_heads, vocab size from the tokenizer) are filled in one place, `Config.resolve`.
Every unknown key is an error naming its dotted path and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import UserError, first_line


MAX_DIM = 2**31 - 1  # the largest size of a model dimension (torch indexes many kernels in 32 bits)
MAX_LAYERS = 16384  # over 50 times the deepest published LMs; a model's layers are built one by one
MAX_INT = 2**62  # any other integer setting: torch, NumPy and deque sizes take 64-bit integers


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: take the tokenizer's vocabulary size
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    max_seq_len: int = 128  # longest context the model takes (raised to train.seq_len where shorter)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output head shares the input embedding's weights
    init_std: float = 0.02  # standard deviation of the normal initialisation of weight matrices
    # ---- attention ----
    attention: str = "gqa"  # gqa (MHA when n_kv_heads == n_heads) | mla (DeepSeek latent attention)
    n_heads: int = 4  # query heads
    n_kv_heads: int = 0  # 0: same as n_heads (MHA); fewer gives GQA. Ignored by MLA.
    head_dim: int = 0  # 0: d_model // n_heads. Ignored by MLA.
    qk_norm: str = "none"  # none | head (RMSNorm per head: Qwen3, GLM4) | full (over all heads: OLMoE)
    qkv_bias: bool = False  # biases on the q/k/v projections (GLM4-MoE)
    out_bias: bool = False  # bias on the output projection
    # attention's output times sigmoid(gate_proj(x)), element by element, before o_proj (gated
    # attention: MiniCPM5-MoE, Qwen3-Next); gate_proj has the q/k/v projections' bias setting
    attn_gate: bool = False
    q_lora_rank: int = 0  # MLA: 0 = full-rank query projection, else low-rank with its own norm
    kv_lora_rank: int = 64  # MLA: width of the compressed key/value latent
    qk_nope_head_dim: int = 32  # MLA: per-head query/key dims without RoPE
    qk_rope_head_dim: int = 16  # MLA: per-head query/key dims with RoPE (the key part is shared)
    v_head_dim: int = 32  # MLA: per-head value dim
    # ---- rotary position embedding ----
    # Granite's muP-style multipliers (1 / 0: off): the embedding's output times embed_scale; each
    # attention and feed-forward output times residual_scale before it joins the residual stream;
    # attention scores times attn_scale instead of head_dim ** -0.5; the logits divided by logits_divisor
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    attn_scale: float = 0.0
    logits_divisor: float = 1.0
    rope_theta: float = 10000.0  # RoPE base (wavelengths up to 2*pi*theta)
    partial_rotary: float = 1.0  # share of each head's dims that is rotated (GLM4: 0.5)
    rope_interleave: bool = False  # rotate (x0,x1),(x2,x3).. pairs (DeepSeek) instead of halves
    rope_scaling: str = "none"  # none | linear | yarn | llama3
    rope_factor: float = 1.0  # context extension factor (linear, yarn, llama3)
    rope_original_max_len: int = 0  # yarn, llama3: pre-extension context length
    yarn_beta_fast: float = 32.0  # yarn: rotations per context above which a dim is kept as is
    yarn_beta_slow: float = 1.0  # yarn: rotations per context below which a dim is interpolated
    yarn_mscale: float = 0.0  # 0: unset (attention factor from rope_factor alone)
    yarn_mscale_all_dim: float = 0.0  # 0: unset; with MLA also scales the softmax (DeepSeek-V3)
    # llama3 (Llama 3.1+): wavelengths over original/low_freq_factor are stretched by rope_factor, those
    # under original/high_freq_factor kept, those between blended
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    # ---- feed-forward ----
    ffn_act: str = "silu"  # silu | gelu (tanh approximation)
    ffn_glu: bool = True  # gated act(gate(x)) * up(x) (SwiGLU) or plain act(up(x))
    dense_dim: int = 0  # hidden width of dense layers; 0: 4 * d_model
    first_k_dense: int = 0  # the first k layers use a dense MLP instead of an MoE
    n_experts: int = 4  # routed experts per MoE layer; 0 makes every layer dense
    top_k: int = 2  # routed experts per token
    expert_dim: int = 256  # hidden width of each routed expert
    n_shared_experts: int = 0  # always-on experts added to the routed output (DeepSeek, GLM4)
    shared_expert_dim: int = 0  # hidden width of each shared expert; 0: expert_dim
    # scale the shared experts' output per token by sigmoid(w . x), a learned gate (Qwen1.5/Qwen2-MoE)
    shared_expert_gate: bool = False
    # ---- router ----
    router: str = "softmax"  # softmax (then top-k) | topk_softmax | sigmoid (+bias, groups) | switch
    norm_topk_prob: bool = True  # renormalise the chosen k weights to sum to 1 (softmax, sigmoid)
    routed_scaling: float = 1.0  # multiplies the routed weights (DeepSeek-V3: 2.5)
    n_group: int = 1  # group-limited routing: experts split into n_group groups...
    topk_group: int = 1  # ...and each token may only use experts of its best topk_group groups
    # a group's score: the sum of its best group_score_top experts' scores (DeepSeek-V3: 2; V2: 1, its best)
    group_score_top: int = 2
    capacity_factor: float = 0.0  # 0: dropless; > 0: ceil(cf*T*K/E) slots per expert, rest dropped
    noisy_gating: bool = False  # Shazeer et al. 2017: learned Gaussian noise on logits in training
    router_init_std: float = 0.02  # standard deviation of the router weights' initialisation
    # ---- load balancing (each coefficient 0 disables it) ----
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss, averaged over MoE layers
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss, averaged over layers
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE), averaged over MoE layers
    bias_update_rate: float = 0.0  # aux-loss-free balancing: selection-bias step after each update
    expert_backend: str = "auto"  # auto | grouped | padded | loop (loop is the slow reference)

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i >= self.first_k_dense

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def shared_text(self) -> str:
        """', N shared x width W' (', gated' with a shared-expert gate) for a model summary; '' without."""
        if not (self.n_experts and self.n_shared_experts):
            return ""
        return (f", {self.n_shared_experts} shared x width {self.shared_expert_dim}"
                + (", gated" if self.shared_expert_gate else ""))


TOKENIZER_SAMPLE = 64_000_000  # default BPE training sample (characters of the training split)
SHARD_TOKENS = 1 << 27  # tokens per prepared shard file: 128M, 256 MB of uint16


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (embedded default corpus), or a text/JSONL/Parquet file or directory
    text_field: str = "text"  # the text field of JSONL records / Parquet column
    # PDF segments (paragraphs) outside these bounds of characters and words are dropped
    pdf_min_chars: int = 50
    pdf_max_chars: int = 800
    pdf_min_words: int = 10
    pdf_max_words: int = 150
    pdf_ascii_only: bool = False  # drop PDF segments with any non-ASCII character
    # a directory made by `moelab data prepare`; when set, source/split/tokenizer settings come from its manifest
    path: str = ""
    val_fraction: float = 0.05  # share of documents (not windows) held out for validation
    split_salt: str = "moelab"  # changes which documents land in validation
    near_dup_split: bool = True  # near-copies (MinHash Jaccard >= 0.5) go to the same split; exact copies always
    max_docs: int = 0  # 0: all documents
    # texts longer than this are cut at line breaks into documents of at most about this many characters
    # (one long file: a book, a log, a corpus in one .txt), so it can be split; 0: off
    doc_chars: int = 0
    tokenizer: str = ""  # "": train BPE on the training split; else tokenizer.json or HF dir
    vocab_size: int = 8192  # for BPE training
    # BPE trains on a hash-ordered sample of this many characters of the training split (0: all of it);
    # bounds BPE time on large corpora
    tokenizer_train_bytes: int = TOKENIZER_SAMPLE


@dataclass
class OptimConfig:
    mode: str = "hybrid"  # hybrid (Muon on hidden matrices, AdamW on the rest) | muon | adamw
    muon_lr: float = 3e-3  # LR of Muon (2-D hidden matrices and expert matrices); mode=muon: all
    adamw_lr: float = 3e-3  # LR of AdamW (embeddings, head, norms, router); mode=adamw: all
    weight_decay: float = 0.01  # decoupled; matrices only (not norms or biases)
    momentum: float = 0.95  # Muon momentum (Nesterov)
    ns_steps: int = 5  # Newton-Schulz iterations
    ns_dtype: str = "auto"  # auto (bf16 where bf16 matmuls beat fp32: CUDA, AMX CPUs; else fp32) | bf16 | fp32
    muon_scale: str = "match_adamw"  # match_adamw (Moonlight: 0.2*sqrt(max dim)) | spectral
    # AdamW's betas and epsilon
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup: int = 50  # optimizer updates
    schedule: str = "cosine"  # cosine | linear | wsd (warmup-stable-decay) | constant
    min_lr_ratio: float = 0.1  # the LR at the last update, as a share of the base LR
    decay_frac: float = 0.2  # wsd: share of all updates spent decaying at the end


@dataclass
class TrainConfig:
    steps: int = 600  # optimizer updates (not micro-batches)
    seq_len: int = 128  # tokens per training window
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer update
    grad_clip: float = 1.0  # 0 disables
    eval_every: int = 100  # updates between validation evaluations (and early-stopping checks)
    eval_windows: int = 128  # windows for periodic evaluation (0: all); the final one: final_eval_windows
    log_every: int = 20  # updates between log lines and metrics.jsonl records
    save_every: int = 200  # updates between checkpoints (one is always saved at the end)
    seed: int = 1234  # weight initialisation and data order
    # start from these weights (a run, a checkpoint or a Hugging Face directory): its model settings and
    # tokenizer are the base that model.* and data.tokenizer change; optimizer, schedule and data start fresh
    init_from: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler); weights stay fp32
    threads: int = 0  # torch intra-op threads, at most the usable cores; 0 leaves torch's default
    # CPU on glibc: freed memory stays in the process for the next step instead of going back to
    # the kernel (fewer page faults; bit-identical results; moelab/train/host.py)
    keep_freed_memory: bool = True
    # CPU: fp32 matrix products through oneDNN instead of the default BLAS where a start-up check
    # finds that path exact to fp32 and faster on this machine, for models not too small to gain
    # (moelab/hardware.py); a resume keeps its run's path
    fast_fp32_matmul: bool = True
    activation_checkpointing: bool = False  # recompute each block in backward (saves activation memory)
    compile: bool = False  # torch.compile the model for training
    final_eval_windows: int = 0  # windows for the final evaluation; 0: the whole validation split
    choice_tasks: str = ""  # comma-separated multiple-choice JSONL files (or hub names), scored at the end
    choice_every: int = 0  # also every N updates (0: only at the end)
    choice_limit: int = 0  # first N items of each task (0: all)
    # ---- checkpoints and stopping ----
    keep_last: int = 0  # keep the newest N step checkpoints (0: all); `best` is kept apart
    keep_best: bool = True  # save checkpoints/best whenever validation loss improves
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    min_delta: float = 0.0  # an improvement must lower validation loss by more than this
    # ---- guards ----
    nonfinite: str = "skip"  # skip | raise: a NaN/Inf loss or gradient norm never reaches the weights
    spike_sigma: float = 6.0  # skip updates whose loss exceeds recent mean + this many std (0: off)
    spike_window: int = 50  # accepted updates the spike statistics look back over
    spike_max_consecutive: int = 10  # this many spike skips in a row stop the run
    # ---- logging ----
    tensorboard: bool = False  # also write RUN/tensorboard (pip install 'moelab[tensorboard]')
    wandb: str = ""  # a Weights & Biases project name to log to (pip install 'moelab[wandb]')
    peak_tflops: float = 0.0  # accelerator peak for MFU; 0: datasheet value of a known GPU
    plot: bool = True  # write RUN/curves.png at each evaluation and at the end
    report: bool = True  # write RUN/report.md and RUN/report.html at the end (moelab report RUN)


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived values, computed here only ----
    def resolve(self, vocab_size: int | None = None) -> "Config":
        m = self.model
        if vocab_size is not None:
            m.vocab_size = vocab_size
        if m.n_kv_heads == 0:
            m.n_kv_heads = m.n_heads
        if m.head_dim == 0 and m.n_heads > 0:
            m.head_dim = m.d_model // m.n_heads
        if m.dense_dim == 0:
            m.dense_dim = 4 * m.d_model
        if m.shared_expert_dim == 0:
            m.shared_expert_dim = m.expert_dim
        m.max_seq_len = max(m.max_seq_len, self.train.seq_len)
        self.validate()
        return self

    def validate(self) -> None:
        self._check_ranges()  # first: the checks below divide by some of these sizes
        m, t, o, d = self.model, self.train, self.optim, self.data
        checks = [
            (m.n_experts == 0 or 1 <= m.top_k <= m.n_experts,
             f"model.top_k must be between 1 and model.n_experts (got {m.top_k} and {m.n_experts})"),
            (0 <= m.first_k_dense <= m.n_layers,
             f"model.first_k_dense must be in [0, model.n_layers] (got {m.first_k_dense} and {m.n_layers})"),
            (m.attention in ("gqa", "mla"), f"model.attention must be gqa or mla (got {m.attention!r})"),
            (m.n_kv_heads == 0 or m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads must be a multiple of model.n_kv_heads (got {m.n_heads} and {m.n_kv_heads})"),
            (m.head_dim != 0 or m.d_model % m.n_heads == 0,
             f"model.d_model must be divisible by model.n_heads (got {m.d_model} and {m.n_heads}), "
             "or set model.head_dim"),
            (m.qk_norm in ("none", "head", "full"), f"model.qk_norm must be none, head or full (got {m.qk_norm!r})"),
            (m.attention == "gqa" or m.qk_norm == "none",
             "model.qk_norm applies to attention=gqa (MLA has its own latent norms)"),
            (m.attention == "gqa" or not (m.qkv_bias or m.out_bias),
             "model.qkv_bias/out_bias are not supported with attention=mla"),
            (m.attention == "gqa" or m.partial_rotary == 1.0,
             "with attention=mla set the rotated width with model.qk_rope_head_dim, not partial_rotary"),
            (m.attention == "gqa" or not m.attn_gate, "model.attn_gate applies to attention=gqa"),
            (m.attention == "gqa" or m.attn_scale == 0,
             "model.attn_scale applies to attention=gqa (MLA's scale follows its head dims and yarn)"),
            (0.0 < m.partial_rotary <= 1.0, f"model.partial_rotary must be in (0, 1] (got {m.partial_rotary})"),
            (m.attention == "mla" or int(m.head_dim * m.partial_rotary) % 2 == 0,
             f"model.head_dim * model.partial_rotary must be even for RoPE (got {m.head_dim} * {m.partial_rotary})"),
            (m.attention == "gqa" or (m.kv_lora_rank > 0 and m.qk_rope_head_dim > 0
                                      and m.qk_rope_head_dim % 2 == 0 and m.v_head_dim > 0
                                      and m.qk_nope_head_dim >= 0 and m.q_lora_rank >= 0),
             "MLA needs kv_lora_rank > 0, an even qk_rope_head_dim > 0 and v_head_dim > 0"),
            (m.rope_scaling in ("none", "linear", "yarn", "llama3"),
             f"model.rope_scaling must be none, linear, yarn or llama3 (got {m.rope_scaling!r})"),
            (m.rope_scaling == "none" or m.rope_factor >= 1.0, f"model.rope_factor must be >= 1 (got {m.rope_factor})"),
            (m.rope_scaling not in ("yarn", "llama3") or m.rope_original_max_len > 0,
             f"rope_scaling={m.rope_scaling} needs model.rope_original_max_len, the pre-extension context "
             f"(got {m.rope_original_max_len})"),
            (m.rope_scaling != "llama3" or m.llama3_high_freq_factor > m.llama3_low_freq_factor,
             f"model.llama3_high_freq_factor must exceed model.llama3_low_freq_factor "
             f"(got {m.llama3_high_freq_factor} and {m.llama3_low_freq_factor})"),
            (m.ffn_act in ("silu", "gelu"), f"model.ffn_act must be silu or gelu (got {m.ffn_act!r})"),
            (m.router in ("softmax", "topk_softmax", "sigmoid", "switch"),
             f"model.router must be softmax, topk_softmax, sigmoid or switch (got {m.router!r})"),
            (m.router != "switch" or m.n_experts == 0 or (m.top_k == 1 and m.capacity_factor > 0),
             "router=switch is top-1 with a capacity: set model.top_k=1 and model.capacity_factor "
             "(Switch used 1.0-1.25)"),
            (m.topk_group <= m.n_group and (m.n_experts == 0 or m.n_experts % m.n_group == 0),
             f"model.n_group must divide model.n_experts, and model.topk_group <= model.n_group "
             f"(got n_group {m.n_group}, n_experts {m.n_experts}, topk_group {m.topk_group})"),
            (m.n_group == 1 or m.n_experts == 0 or m.top_k <= m.topk_group * (m.n_experts // m.n_group),
             f"model.top_k ({m.top_k}) exceeds the experts reachable in model.topk_group groups "
             f"({m.topk_group} x {m.n_experts // max(m.n_group, 1)} experts per group)"),
            (m.expert_backend in ("auto", "grouped", "padded", "loop"),
             f"model.expert_backend must be auto, grouped, padded or loop (got {m.expert_backend!r})"),
            (bool(d.source.strip() or d.path), "data.source is empty: give stdlib, a file, a folder, a glob "
                                                "or hf:NAME (an empty path would read the current folder)"),
            (0.0 < d.val_fraction < 1.0, f"data.val_fraction must be between 0 and 1 (got {d.val_fraction})"),
            (d.vocab_size >= 260, f"data.vocab_size must be at least 260, 256 bytes + specials (got {d.vocab_size})"),
            (t.precision in ("fp32", "bf16", "fp16"),
             f"train.precision must be fp32, bf16 or fp16 (got {t.precision!r})"),
            (t.nonfinite in ("skip", "raise"), f"train.nonfinite must be skip or raise (got {t.nonfinite!r})"),
            (o.schedule in ("cosine", "linear", "wsd", "constant"),
             f"optim.schedule must be cosine, linear, wsd or constant (got {o.schedule!r})"),
            (o.mode in ("hybrid", "muon", "adamw"), f"optim.mode must be hybrid, muon or adamw (got {o.mode!r})"),
            (0.0 < o.decay_frac <= 1.0, f"optim.decay_frac must be in (0, 1] (got {o.decay_frac})"),
            (o.muon_scale in ("match_adamw", "spectral"),
             f"optim.muon_scale must be match_adamw or spectral (got {o.muon_scale!r})"),
            (o.ns_dtype in ("auto", "bf16", "fp32"), f"optim.ns_dtype must be auto, bf16 or fp32 (got {o.ns_dtype!r})"),
            (0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1] (got {o.min_lr_ratio})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"invalid config: {msg}")

    def _check_ranges(self) -> None:
        """Each remaining number within the range where it means something: a negative size, std,
        clip or sample would otherwise crash deep in torch, or silently train something else
        (train.grad_clip=-1 flips every gradient's sign)."""
        m, t, o, d = self.model, self.train, self.optim, self.data
        at_least = [  # (key, value, lowest valid value); 0 is 'auto' or 'off' where the key allows
            ("model.d_model", m.d_model, 1), ("model.n_layers", m.n_layers, 1), ("model.n_heads", m.n_heads, 1),
            ("model.n_experts", m.n_experts, 0), ("model.n_shared_experts", m.n_shared_experts, 0),
            ("model.n_group", m.n_group, 1), ("model.topk_group", m.topk_group, 1),
            ("model.group_score_top", m.group_score_top, 1),
            ("model.capacity_factor", m.capacity_factor, 0), ("model.aux_loss_coef", m.aux_loss_coef, 0),
            ("model.seq_aux_loss_coef", m.seq_aux_loss_coef, 0), ("model.z_loss_coef", m.z_loss_coef, 0),
            ("model.bias_update_rate", m.bias_update_rate, 0), ("model.attn_scale", m.attn_scale, 0),
            ("train.steps", t.steps, 1), ("train.batch_size", t.batch_size, 1), ("train.grad_accum", t.grad_accum, 1),
            ("train.seq_len", t.seq_len, 2), ("train.eval_every", t.eval_every, 1),
            ("train.log_every", t.log_every, 1), ("train.save_every", t.save_every, 1),
            ("train.choice_every", t.choice_every, 0), ("train.choice_limit", t.choice_limit, 0),
            ("train.keep_last", t.keep_last, 0), ("train.patience", t.patience, 0),
            ("train.spike_window", t.spike_window, 2), ("train.spike_max_consecutive", t.spike_max_consecutive, 1),
            ("model.max_seq_len", m.max_seq_len, 0), ("model.n_kv_heads", m.n_kv_heads, 0),
            ("model.head_dim", m.head_dim, 0), ("model.dense_dim", m.dense_dim, 0),
            ("model.shared_expert_dim", m.shared_expert_dim, 0), ("model.init_std", m.init_std, 0),
            ("model.router_init_std", m.router_init_std, 0), ("model.norm_eps", m.norm_eps, 0),
            ("model.rope_original_max_len", m.rope_original_max_len, 0),
            ("model.yarn_mscale", m.yarn_mscale, 0), ("model.yarn_mscale_all_dim", m.yarn_mscale_all_dim, 0),
            ("optim.warmup", o.warmup, 0), ("optim.weight_decay", o.weight_decay, 0),
            ("optim.ns_steps", o.ns_steps, 0), ("optim.eps", o.eps, 0),
            ("train.grad_clip", t.grad_clip, 0), ("train.eval_windows", t.eval_windows, 0),
            ("train.final_eval_windows", t.final_eval_windows, 0), ("train.threads", t.threads, 0),
            ("train.spike_sigma", t.spike_sigma, 0), ("train.min_delta", t.min_delta, 0),
            ("train.peak_tflops", t.peak_tflops, 0), ("data.max_docs", d.max_docs, 0),
            ("data.tokenizer_train_bytes", d.tokenizer_train_bytes, 0), ("data.doc_chars", d.doc_chars, 0),
            ("data.pdf_min_chars", d.pdf_min_chars, 0), ("data.pdf_min_words", d.pdf_min_words, 0),
        ]
        if m.n_experts:
            at_least.append(("model.expert_dim", m.expert_dim, 1))
        at_least.append(("model.vocab_size", m.vocab_size, 0))
        for key, value, low in at_least:
            if value < low:
                raise UserError(f"invalid config: {key} must be >= {low} (got {value})")
        # sizes that become tensor dimensions (or a layer count that is built one by one): beyond
        # these, torch overflows its 64-bit sizes with a traceback, or building never ends
        at_most = [(f"model.{f.name}", getattr(m, f.name), MAX_LAYERS if f.name == "n_layers" else MAX_DIM)
                   for f in dataclasses.fields(m) if f.type in (int, "int")]
        at_most += [("train.seq_len", t.seq_len, MAX_DIM), ("train.batch_size", t.batch_size, MAX_DIM),
                    ("train.grad_accum", t.grad_accum, MAX_DIM), ("data.vocab_size", d.vocab_size, MAX_DIM),
                    ("optim.ns_steps", o.ns_steps, 100)]  # iterations in every update (5 converge)
        at_most += [(f"{name}.{f.name}", getattr(sec, f.name), MAX_INT)  # any other count: a 64-bit integer
                    for name, sec in (("data", d), ("optim", o), ("train", t))
                    for f in dataclasses.fields(sec) if f.type in (int, "int")]
        for key, value, high in at_most:
            if value > high:
                raise UserError(f"invalid config: {key} must be <= {high:,} (got {value:,})" if value < 10**15
                                else f"invalid config: {key} must be <= {high:,} (got {value:.3g})")
        below_one = [("optim.momentum", o.momentum), ("optim.beta1", o.beta1), ("optim.beta2", o.beta2)]
        for key, value in below_one:
            if not 0 <= value < 1:
                raise UserError(f"invalid config: {key} must be in [0, 1) (got {value})")
        above_zero = [("model.routed_scaling", m.routed_scaling), ("model.rope_theta", m.rope_theta),
                      ("model.embed_scale", m.embed_scale), ("model.residual_scale", m.residual_scale),
                      ("model.logits_divisor", m.logits_divisor),
                      ("model.yarn_beta_fast", m.yarn_beta_fast), ("model.yarn_beta_slow", m.yarn_beta_slow),
                      ("model.llama3_low_freq_factor", m.llama3_low_freq_factor),
                      ("model.llama3_high_freq_factor", m.llama3_high_freq_factor),
                      ("optim.muon_lr", o.muon_lr), ("optim.adamw_lr", o.adamw_lr)]
        for key, value in above_zero:
            if not value > 0:
                raise UserError(f"invalid config: {key} must be > 0 (got {value})")
        if d.pdf_min_chars > d.pdf_max_chars or d.pdf_min_words > d.pdf_max_words:
            raise UserError(f"invalid config: data.pdf_min_chars/pdf_min_words must not exceed "
                            f"data.pdf_max_chars/pdf_max_words (got {d.pdf_min_chars}/{d.pdf_min_words} and "
                            f"{d.pdf_max_chars}/{d.pdf_max_words})")

    def check_new_run(self) -> None:
        """Settings a new run may not have, though a saved run's config with them still loads: each
        leaves part of the model config without effect."""
        m = self.model
        if m.n_experts == 0 and m.n_shared_experts:
            raise UserError("invalid config: model.n_shared_experts needs routed experts (model.n_experts > 0); "
                            "a dense model's MLP width is model.dense_dim")
        if m.shared_expert_gate and not (m.n_experts and m.n_shared_experts):
            raise UserError("invalid config: model.shared_expert_gate gates the shared experts, and this model has "
                            "none: set model.n_shared_experts (and model.n_experts) > 0, or shared_expert_gate=false")
        if m.n_experts and m.first_k_dense >= m.n_layers:
            raise UserError("invalid config: model.first_k_dense leaves no MoE layer; for a dense model set "
                            "model.n_experts=0")

    # ---- dict / YAML ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, comments: bool = False) -> str:
        """YAML that `from_dict(load_yaml(...))` reads back. `comments`: each setting with its
        documentation (`field_notes`), as `moelab train --print-config` shows it."""
        import yaml

        if not comments:
            return yaml.safe_dump(self.to_dict(), sort_keys=False)
        lines = []
        for key, value in self.to_dict().items():
            section = getattr(self, key)
            if not dataclasses.is_dataclass(section):
                lines += yaml.safe_dump({key: value}, sort_keys=False).splitlines()
                continue
            lines.append(f"{key}:")
            notes = field_notes(type(section))
            for name, v in value.items():
                above, after = notes.get(name, ([], ""))
                one = yaml.safe_dump({name: v}, sort_keys=False, width=1 << 30).splitlines()
                if after and len(one) > 1:  # a value over several lines: its note goes above it
                    above, after = [*above, after], ""
                lines += [f"  # {c}".rstrip() for c in above]
                lines += [f"  {one[0]}" + (f"  # {after}" if after else ""), *(f"  {ln}" for ln in one[1:])]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, data: dict, base: "Config | None" = None) -> "Config":
        cfg = base if base is not None else cls()
        apply_mapping(cfg, data, "")
        return cfg

    @classmethod
    def from_yaml_file(cls, path: "str | Path") -> "Config":
        """A config a run saved (RUN/config.yaml, or a checkpoint's), as written by `to_yaml`; a
        damaged one is a one-line error naming the file."""
        return cls.from_dict(load_yaml(path))


def field_notes(cls) -> dict[str, tuple[list[str], str]]:
    """The documentation of each field of a config section, read from this file's source: the
    comment lines just above the field (a section heading, or a note too long for one line) and the
    comment after it on its line. Empty where the source cannot be read (a build without .py files)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(src).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return {}
    comments = {t.start[0]: (t.string[1:].strip(), not t.line[:t.start[1]].strip())
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    notes, prev = {}, tree.lineno
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [comments[n][0] for n in range(prev + 1, node.lineno) if n in comments and comments[n][1]]
            after = comments.get(node.end_lineno, ("", True))
            notes[node.target.id] = (above, "" if after[1] else after[0])
        prev = node.end_lineno
    return notes


def _field_types(obj) -> dict[str, type]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def all_keys(obj=None, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, for error suggestions."""
    obj = obj if obj is not None else Config()
    keys = []
    for name, tp in _field_types(obj).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


# names other toolkits (transformers configs, nanoGPT, Megatron) use for a moelab setting
_ALIASES = {
    "lr": ("optim.muon_lr", "optim.adamw_lr"), "learning_rate": ("optim.muon_lr", "optim.adamw_lr"),
    "max_steps": ("train.steps",), "train_steps": ("train.steps",), "num_steps": ("train.steps",),
    "warmup_steps": ("optim.warmup",), "micro_batch_size": ("train.batch_size",),
    "gradient_accumulation_steps": ("train.grad_accum",), "block_size": ("train.seq_len",),
    "context_length": ("train.seq_len",), "hidden_size": ("model.d_model",), "n_embd": ("model.d_model",),
    "num_hidden_layers": ("model.n_layers",), "n_layer": ("model.n_layers",),
    "num_attention_heads": ("model.n_heads",), "n_head": ("model.n_heads",),
    "num_key_value_heads": ("model.n_kv_heads",), "num_experts": ("model.n_experts",),
    "n_routed_experts": ("model.n_experts",), "num_local_experts": ("model.n_experts",),
    "num_experts_per_tok": ("model.top_k",), "moe_intermediate_size": ("model.expert_dim",),
    "intermediate_size": ("model.dense_dim", "model.expert_dim"), "n_shared_expert": ("model.n_shared_experts",),
    "router_aux_loss_coef": ("model.aux_loss_coef",), "max_position_embeddings": ("model.max_seq_len",),
    "tie_word_embeddings": ("model.tie_embeddings",), "dtype": ("train.precision",),
}


def _unknown_key(path: str, obj, prefix: str, rest: str = "") -> UserError:
    """`path` is the first unknown component (with its prefix); `rest` what followed it. The
    suggestion: a known synonym (`train.lr`), the same name in another section (`model.seed`), a
    close name in the same section, then the closest whole dotted key."""
    names = [f.name for f in dataclasses.fields(obj)]
    leaf = path.rsplit(".", 1)[-1]
    keys = all_keys()
    if not rest and leaf.lower() in _ALIASES:
        close = list(_ALIASES[leaf.lower()])
    else:
        close = [k for k in keys if not rest and "." in k and k.rsplit(".", 1)[1] == leaf][:2]
        close = close or [f"{prefix}{c}{rest}" for c in difflib.get_close_matches(leaf, names, n=1, cutoff=0.5)]
        if close and rest and close[0] not in keys:
            close = []  # the rest is misspelt too: match the whole dotted path instead
        close = close or difflib.get_close_matches(path + rest, keys, n=1, cutoff=0.5)
    hint = "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?" if close else ""
    return UserError(f"unknown config key '{path}{rest}'{hint}")


def _coerce(value, tp, path: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # train.steps=1e4 (YAML reads it as a string)
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):  # nan slips past every range check; inf trains into nan
                raise UserError(f"config key '{path}' expects a finite number, got {value!r}")
            return float(number)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    raise UserError(f"config key '{path}' expects {tp.__name__}, got {value!r}")


def apply_mapping(obj, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    types = _field_types(obj)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in types:
            raise _unknown_key(path, obj, prefix)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(value, types[key], path))


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3e-3, true, 8 work)."""
    import yaml

    if "=" not in item:
        hint = ""
        if Path(item).expanduser().exists():  # data.source=*.pdf unquoted: the shell expanded the glob
            hint = "; it is a path: if the shell expanded a glob, quote it (\"data.source=papers/*.pdf\")"
        raise UserError(f"override '{item}' must look like key=value, e.g. train.steps=40{hint}")
    path, raw = item.split("=", 1)
    path = path.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) or value is None:
        value = raw  # keep strings verbatim (paths with colons, leading zeros)
    parts = path.split(".")
    nested: dict = {}
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    obj = cfg
    for i, part in enumerate(parts[:-1]):  # fail early on a path through a leaf
        if not hasattr(obj, part) or not dataclasses.is_dataclass(getattr(obj, part)):
            prefix = ".".join(parts[:i]) + "." if i else ""
            raise _unknown_key(".".join(parts[: i + 1]), obj, prefix, "." + ".".join(parts[i + 1:]))
        obj = getattr(obj, part)
    if isinstance(value, (dict, list)) and _field_types(obj).get(parts[-1]) is str:
        node[parts[-1]] = raw  # data.source=hf: read as YAML is {'hf': None}: "expects str, got {'hf': None}"
    apply_mapping(cfg, nested, "")


def _unique_key_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping: plain PyYAML keeps the last
    silently, so a setting added at the end of a long config overrode the one above without a word."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {seen[key] + 1}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a directory; give the YAML file inside it")
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        if mark is not None and problem:  # where and what, not the parser's state ("while parsing a ...")
            first = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        else:
            first = first_line(exc, 1000)
        raise UserError(f"config file {p} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must contain a mapping of sections")
    return data


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset -> YAML file -> dotted overrides, then validation."""
    from moelab.models.presets import get_preset

    data = load_yaml(config_file) if config_file else {}
    if config_file and not data:  # a wrong file given, or one whose every line is commented out
        raise UserError(f"config file {config_file} holds no settings (empty, or only comments); give the file "
                        "you meant, or drop --config for the preset's settings")
    own = data.pop("preset", None)
    if preset and own and preset != own:  # which base was meant is not for moelab to guess
        raise UserError(f"--preset {preset} and {config_file}'s preset: {own} differ; give one of them (drop "
                        "--preset, or change or remove the file's preset line)")
    name = preset or own or "tiny"

    def assemble(cfg: Config) -> Config:
        apply_mapping(cfg, data, "")
        for item in overrides:
            apply_override(cfg, item)
        return cfg

    cfg = assemble(get_preset(name))
    if cfg.train.init_from:  # the source's model and tokenizer replace the preset's, under the same changes
        from moelab.train.checkpoint import init_source

        base = get_preset(name)
        base.model, tokenizer = init_source(cfg.train.init_from)
        base.data.tokenizer = str(tokenizer or "")
        # within the context it was trained for, unless train.seq_len says otherwise
        base.train.seq_len = min(base.train.seq_len, base.model.max_seq_len)
        cfg = assemble(base)
    cfg.validate()
    cfg.check_new_run()
    return cfg
