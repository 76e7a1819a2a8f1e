#!/usr/bin/env bash
# The GPU checks and figures in one go, on a machine with a CUDA GPU (CI has none).
# Usage: bash benchmarks/gpu.sh [STAGES] [LOG_DIR]   STAGES: all (default) or a comma list of:
#   tests  the CUDA tests (expert paths in fp32/bf16/fp16 vs float64, compile, checkpointing, CLI)
#   layer  benchmarks/moe_layer.py in bf16 at exp3 size and at a GPU-filling size
#   train  benchmarks/train_throughput.py in bf16 at exp3 size, also compiled (tokens/s, ratio, MFU)
#   big    the same (sdpa only) at a GPU-filling size (677M parameters, 192M active; 16x1024 tokens)
#   loop   `moelab train` on the embedded corpus for 300 updates (the real loop's tokens/s and MFU)
#   decode benchmarks/generate.py: one prompt, then 16 decoded together, fp32 and bf16 weights,
#          against transformers' generate (same tokens?)
#   cpu    the CPU targets of issues 3 and 5 (exp3, bf16) on this machine's host CPU, the GPU hidden;
#          its CPU flags (AMX?) first. Not in `all`: name it.
# Each stage's output is also written to LOG_DIR (default gpu-logs).
set -uo pipefail
stage=${1:-all}
log=${2:-gpu-logs}
mkdir -p "$log"
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}  # the interpreter that holds torch (PYTHON= to override)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# A GPU-filling DeepSeek-V3-style size (MLA, sigmoid router, one shared expert).
BIG=(model.d_model=1024 model.n_layers=8 model.n_heads=16 model.q_lora_rank=384 model.kv_lora_rank=256
     model.qk_nope_head_dim=64 model.qk_rope_head_dim=32 model.v_head_dim=64 model.n_experts=16
     model.top_k=2 model.expert_dim=1408 model.max_seq_len=2048 train.seq_len=1024 train.batch_size=16
     data.vocab_size=32000)

run() { echo "+ $*"; "$@"; }
want() { [[ $stage == all && $1 != cpu || ",$stage," == *",$1,"* ]]; }

"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name())" | tee "$log/versions.txt"
if want tests; then
  "$PY" - <<'EOF' 2>&1 | tee "$log/grouped_mm.txt"
import torch
for dt in (torch.float32, torch.bfloat16, torch.float16):
    x, w = torch.randn(64, 32, device="cuda", dtype=dt), torch.randn(4, 32, 48, device="cuda", dtype=dt)
    offs = torch.tensor([16, 16, 40, 64], device="cuda", dtype=torch.int32)
    try:
        y = torch._grouped_mm(x, w, offs=offs)
        ref = torch.cat([x[a:b].double() @ w[e].double() for e, (a, b) in enumerate(zip([0, 16, 16, 40], offs.tolist()))])
        print(f"torch._grouped_mm on CUDA {dt}: runs, rel err {float((y.double() - ref).norm() / ref.norm()):.1e}")
    except Exception as exc:
        print(f"torch._grouped_mm on CUDA {dt}: {type(exc).__name__}: {str(exc)[:100]}")
EOF
  run "$PY" -m pytest -q tests/models/test_cuda.py 2>&1 | tee "$log/tests.txt"
fi
if want layer; then
  for arch in mixtral deepseek_v3; do
    run "$PY" benchmarks/moe_layer.py --dtype bf16 --arch $arch 2>&1 | tee -a "$log/moe_layer.txt"
  done
  run "$PY" benchmarks/moe_layer.py --dtype bf16 --arch qwen3_moe --set model.d_model=1024 \
    model.n_experts=64 model.top_k=8 model.expert_dim=512 train.seq_len=1024 2>&1 | tee -a "$log/moe_layer.txt"
fi
if want train; then
  run "$PY" benchmarks/train_throughput.py --dtype bf16 --compile 2>&1 | tee "$log/train_throughput.txt"
fi
if want big; then
  run "$PY" benchmarks/train_throughput.py --dtype bf16 --iters 5 --compile --hf-attn sdpa --set "${BIG[@]}" \
    2>&1 | tee "$log/train_big.txt"
fi
if want loop; then
  rm -rf /tmp/moelab-gpu-run
  run "$PY" -m moelab train --preset exp3 --device cuda --out /tmp/moelab-gpu-run train.precision=bf16 \
    train.steps=300 train.eval_every=100 train.log_every=50 train.save_every=300 train.report=false \
    2>&1 | tee "$log/loop.txt"
  cp /tmp/moelab-gpu-run/metrics.jsonl "$log/loop_metrics.jsonl"
fi
if want decode; then
  for dtype in fp32 bf16; do
    run "$PY" benchmarks/generate.py --dtype $dtype 2>&1 | tee -a "$log/generate.txt"
    run "$PY" benchmarks/generate.py --dtype $dtype --batch 16 --new 64 2>&1 | tee -a "$log/generate.txt"
  done
fi
if want cpu; then
  { nproc; grep -m1 'model name' /proc/cpuinfo; grep -m1 -o -w 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u; } \
    2>&1 | tee "$log/cpu.txt"
  export CUDA_VISIBLE_DEVICES=
  run "$PY" benchmarks/moe_layer.py --dtype bf16 --rounds 3 2>&1 | tee -a "$log/cpu.txt"
  run "$PY" benchmarks/train_throughput.py --dtype bf16 --hf-attn sdpa --rounds 3 2>&1 | tee -a "$log/cpu.txt"
fi
