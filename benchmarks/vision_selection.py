"""Benchmark: fused vision scoring + adaptive top-k (kernels/vision_selection.py).

Issue targets (H200, bf16): one request N=2,500, L=40, D=3,072 at least 5x faster than the
eager torch reference and within 2x of max(launch floor, bytes / measured HBM bandwidth); a
packed batch of 64 such requests within 2x of the bandwidth floor.

    python benchmarks/vision_selection.py            # on a CUDA GPU
    python benchmarks/vision_selection.py --smoke    # CPU code-path check (CI)
"""

from common import device_for, environment, launch_floor_us, measured_bandwidth_gbps, parse_args, time_us, write_rows

args = parse_args("vision_selection", __doc__)

import torch  # noqa: E402  (after parse_args: --smoke sets TRITON_INTERPRET first)

from asymvlm_vllm.core import ThresholdBudget, decide_vision_pruning, score_vision_tokens  # noqa: E402
from asymvlm_vllm.kernels.vision_selection import empty_selection, pack_budget_rules, select_vision_tokens  # noqa: E402

device = device_for(args)
env = environment(device)
bandwidth = measured_bandwidth_gbps(device)
floor_launch = launch_floor_us(device, args.rep)
rule = ThresholdBudget(gap_low=0.171, gap_high=0.265, ratio_conservative=0.5, ratio_moderate=0.35, ratio_aggressive=0.25)
cases = [("single", 1, 2500, 40, 3072), ("batch64", 64, 2500, 40, 3072)]
if args.smoke:
    cases = [("single", 1, 50, 4, 32), ("batch4", 4, 50, 4, 32)]

rows = []
for name, batch, n, l, d in cases:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    vision = torch.randn(batch * n, d, generator=g).to(device, dtype)
    text = torch.randn(batch * l, d, generator=g).to(device, dtype)
    weight = (torch.rand(d, generator=g) * 3).to(device)
    cu_v = torch.arange(0, batch * n + 1, n, dtype=torch.int32, device=device)
    cu_t = torch.arange(0, batch * l + 1, l, dtype=torch.int32, device=device)
    ids, params = pack_budget_rules([rule] * batch, device)
    out = empty_selection(batch, batch * n, device)

    def kernel():
        select_vision_tokens(vision, text, cu_v, cu_t, n, ids, params, 1, weight, out=out)

    def eager():  # the core's torch functions, one request at a time, on the same device
        for b in range(batch):
            s = score_vision_tokens(vision[b * n : (b + 1) * n], text[b * l : (b + 1) * l], weight)
            decide_vision_pruning(s, rule)

    kernel_us = time_us(kernel, device, args.rep)
    eager_us = time_us(eager, device, max(3, args.rep // 10))
    element = vision.element_size()
    # Compulsory traffic: read vision, text and weight once; write scores, mask and indices.
    nbytes = batch * (n + l) * d * element + 4 * d + batch * n * (4 + 1 + 4)
    floor_bw = nbytes / bandwidth / 1e3
    floor = max(floor_launch, floor_bw)
    rows.append({
        **env, "case": name, "requests": batch, "N": n, "L": l, "D": d, "dtype": str(dtype).removeprefix("torch."),
        "kernel_us": kernel_us, "eager_torch_us": eager_us, "speedup_vs_eager": eager_us / kernel_us,
        "bytes": nbytes, "achieved_GBps": nbytes / kernel_us / 1e3, "hbm_GBps": bandwidth,
        "launch_floor_us": floor_launch, "bandwidth_floor_us": floor_bw, "x_floor": kernel_us / floor,
        "target_met": (kernel_us / floor <= 2.0) and (name != "single" or eager_us / kernel_us >= 5.0),
    })
write_rows(args.out, rows)
