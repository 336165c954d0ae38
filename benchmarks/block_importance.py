"""Benchmark: per-block attention mass over the paged KV cache, Triton kernel vs torch reference.

256 decoding requests, 64 candidate blocks of 16 tokens each, 32 query heads over 32 (MHA) or
8 (GQA) kv heads, head_dim 128, bf16. The floor is reading the candidate keys once (plus the
queries, the LSE and writing the output) at the HBM bandwidth measured in the same run.
"""

from __future__ import annotations

import torch

from asymvlm_vllm.core.block_importance import softmax_lse
from common import device_for, environment, launch_floor_us, measured_bandwidth_gbps, parse_args, time_us, write_rows

FULL = dict(requests=256, candidates=64, block_size=16, heads=32, head_dim=128)
SMOKE = dict(requests=3, candidates=4, block_size=16, heads=4, head_dim=32)


def make_inputs(requests, candidates, block_size, heads, kv_heads, head_dim, device):
    """Every request's candidates are its blocks [start, start + candidates), at shuffled
    physical ids, with the last candidate block partly filled."""
    gen = torch.Generator(device=device).manual_seed(0)
    starts = torch.randint(0, 4, (requests,), generator=gen, device=device, dtype=torch.int32)
    seq_lens = ((starts + candidates) * block_size - block_size // 2).int()
    max_blocks = 4 + candidates
    num_blocks = requests * max_blocks
    block_tables = torch.randperm(num_blocks, generator=gen, device=device).view(requests, max_blocks).int()
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, device=device).bfloat16()
    query = torch.randn(requests, heads, head_dim, generator=gen, device=device).bfloat16()
    scale = head_dim**-0.5
    lse = softmax_lse(query, key_cache, block_tables, seq_lens, scale)
    counts = torch.full((requests,), candidates, dtype=torch.int32, device=device)
    return (query, key_cache, block_tables, seq_lens, lse, scale, starts, counts, candidates)


def main() -> None:
    args = parse_args("block_importance", __doc__.splitlines()[0])
    device = device_for(args)
    from asymvlm_vllm.kernels.block_importance import block_attention_mass_paged, block_attention_mass_paged_reference

    shape = SMOKE if args.smoke else FULL
    env = environment(device)
    hbm_gbps = measured_bandwidth_gbps(device)
    launch_us = launch_floor_us(device, args.rep)
    rows = []
    for kv_heads in (shape["heads"], shape["heads"] // 4):
        inputs = make_inputs(**shape, kv_heads=kv_heads, device=device)
        query, key_cache, _, seq_lens, lse, _, starts, *_ = inputs
        r, c, block_size = shape["requests"], shape["candidates"], shape["block_size"]
        out = torch.empty(r, c, dtype=torch.float32, device=device)
        expected = block_attention_mass_paged_reference(*inputs)
        max_err = (block_attention_mass_paged(*inputs, out=out) - expected).abs().max().item()
        kernel_us = time_us(lambda: block_attention_mass_paged(*inputs, out=out), device, args.rep)
        # The reference loops over requests on the host: fewer repetitions keep the run short.
        reference_us = time_us(lambda: block_attention_mass_paged_reference(*inputs), device, min(args.rep, 20), 3)
        # Only live tokens' keys must be read: the last candidate block is half full.
        live_tokens = (seq_lens - starts * block_size).clamp(max=c * block_size).sum().item()
        key_bytes = live_tokens * kv_heads * shape["head_dim"] * key_cache.element_size()
        nbytes = key_bytes + query.nbytes + lse.nbytes + out.nbytes
        floor_us = nbytes / hbm_gbps / 1e3
        rows.append(
            {
                "kernel": "block_attention_mass_paged",
                **shape,
                "kv_heads": kv_heads,
                "dtype": "bf16",
                "kernel_us": kernel_us,
                "reference_us": reference_us,
                "speedup": reference_us / kernel_us,
                "bytes": nbytes,
                "achieved_gbps": nbytes / kernel_us / 1e3,
                "hbm_gbps": hbm_gbps,
                "bandwidth_floor_us": floor_us,
                "launch_floor_us": launch_us,
                "ratio_to_floor": kernel_us / floor_us,
                "within_2x_of_floor": kernel_us <= 2 * floor_us,
                "max_abs_err": max_err,
                "smoke": args.smoke,
                **env,
            }
        )
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
