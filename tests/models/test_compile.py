"""The grouped expert path compiles as one graph (torch.compile, fullgraph) and equals eager."""

import pytest
import torch

from moelab.config import ModelConfig
from moelab.models.moe import MoE


@pytest.mark.slow
@pytest.mark.parametrize("kind", [dict(router="softmax"),
                                  dict(router="sigmoid", n_group=4, topk_group=2, n_shared_experts=1,
                                       capacity_factor=1.0)])
def test_moe_layer_under_torch_compile_equals_eager(kind):
    cfg = ModelConfig(d_model=32, n_heads=4, n_experts=8, top_k=2, expert_dim=32, shared_expert_dim=32, **kind)
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.experts.reset_parameters(0.1, 0.1)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(2, 16, 32)
    y, r = moe(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    torch._dynamo.reset()
    y2, r2 = torch.compile(moe, fullgraph=True)(x)  # fullgraph: a graph break would raise
    y2.square().sum().backward()
    assert torch.equal(r.idx_TK, r2.idx_TK)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    for (name, p), g in zip(moe.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_bf16_bucketed_experts_under_torch_compile_match_fp32():
    """On CPU in bf16 the expert rows are bucketed; under torch.compile with a static row count
    whose tail no matmul writes. Compiled and eager bf16 both stay within bf16 error of fp32, in
    outputs and in every gradient."""
    from moelab.models import experts as ex

    cfg = ModelConfig(d_model=32, n_heads=4, n_experts=4, top_k=2, expert_dim=64)
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.experts.reset_parameters(0.1, 0.1)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(3, 67, 32)
    g = torch.randn(3, 67, 32)
    runs = {}
    for name, fn, dtype in [("fp32", moe, None), ("eager bf16", moe, torch.bfloat16),
                            ("compiled bf16", torch.compile(moe, fullgraph=True), torch.bfloat16)]:
        moe.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y, r = fn(x)
        (y.float() * g).sum().backward()
        runs[name] = (y.detach().float(), r.idx_TK, [p.grad.clone() for p in moe.parameters()])
    y_ref, idx_ref, g_ref = runs.pop("fp32")
    counts = torch.bincount(idx_ref.flatten(), minlength=4)
    assert not torch.equal(ex.bucket_rows(counts), counts)  # padding rows were in play
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    for name, (y, idx, grads) in runs.items():
        assert torch.equal(idx, idx_ref), name
        assert rel(y, y_ref) < 1e-2, name
        for (pname, _), a, b in zip(moe.named_parameters(), grads, g_ref):
            assert rel(a, b) < 2e-2, f"{name}: {pname}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mla-yarn-dense-first", "gqa"])
def test_compiled_model_takes_changing_sequence_lengths(variant):
    """A compiled model called with a second sequence length recompiles with the length dynamic:
    attention then stays causal (it asked SDPA for is_causal=S > 1, a SymBool, and failed), and
    each length's loss and gradients equal eager's."""
    from tests.models.variants import tiny_model

    model = tiny_model(variant).train()
    compiled = torch.compile(model, fullgraph=True)
    for S in (20, 12, 9):
        x, y = torch.randint(0, 97, (3, S)), torch.randint(0, 97, (3, S))
        runs = []
        for fn in (model, compiled):
            model.zero_grad()
            out = fn(x, targets=y)
            out.loss.backward()
            runs.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (ref, ref_grads), (got, grads) = runs
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
