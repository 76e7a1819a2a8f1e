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
