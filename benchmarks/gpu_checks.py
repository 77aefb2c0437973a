"""Correctness of the shared-prefix attention on the device, before any timing.

Against a float64 reference of softmax attention over [prefix keys ; own keys] (the prefix broadcast to every
row), on fresh random inputs with grouped-query heads, left padding (rows whose first positions see no own key)
and several sizes: the flash-attention part (half precision on CUDA), the explicit part, and the whole
function. Reports ||out - ref|| / ||ref|| and whether the flash kernel with log-sum-exp ran. Exit code 1 on a
failure.

    python -m benchmarks.gpu_checks --out $OUT/checks.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import environment, write_json
from harness import attention


class _Module:
    """Stands in for a transformers attention module (only ``layer_idx`` and ``training`` are read)."""

    layer_idx, training = 0, False


def reference(q, pk, pv, k, v, allowed, scale):
    """float64 attention over [prefix ; own]: q [B,H,L,D], pk/pv [1,Hkv,P,D], k/v [B,Hkv,Lk,D], allowed [B,L,Lk]."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2).double().repeat_interleave(G, dim=1)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2).double().repeat_interleave(G, dim=1)
    s = q.double() @ keys.transpose(-1, -2) * scale  # [B, H, L, P+Lk]
    full = torch.cat([torch.ones(B, L, pk.shape[2], dtype=torch.bool, device=q.device), allowed], dim=-1)
    s = s.masked_fill(~full[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ vals  # [B, H, L, D]


def case(B, H, Hkv, L, P, D, dtype, device, gen, causal: bool = False) -> dict:
    """One random case; ``causal``: no padding and no mask (the right-padded query forward, flash on CUDA)."""
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    q, pk, pv, k, v = r(B, H, L, D), r(1, Hkv, P, D), r(1, Hkv, P, D), r(B, Hkv, L, D), r(B, Hkv, L, D)
    pads = torch.randint(0, L // 2 + 1, (B,), generator=gen, device=device)  # left padding per row
    pads = pads * 0 if causal else pads
    pos = torch.arange(L, device=device)
    real = pos[None, :] >= pads[:, None]  # [B, Lk]
    allowed = (pos[None, :, None] >= pos[None, None, :]) & real[:, None, :]  # [B, L, Lk]
    scale = D ** -0.5
    ref = reference(q, pk, pv, k, v, allowed, scale)
    out, _ = attention.attention_forward(_Module(), q, k, v, None if causal else allowed[:, None], scaling=scale,
                                         shared_prefix=attention.SharedPrefix([pk], [pv]))
    out = out.transpose(1, 2).double()  # [B, H, L, D]
    keep = real[:, None, :, None]  # compare real query positions only (padded ones are never read)
    err = float(((out - ref) * keep).norm() / (ref * keep).norm())
    flash = None
    if device.type == "cuda" and dtype != torch.float32:
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q[:1, :Hkv].contiguous(), pk, pv, 0.0, False,
                                                                     False, scale=scale)
            flash = tuple(res[1].shape) == (1, Hkv, L)
        except Exception as exc:  # noqa: BLE001 - report what the device lacks
            flash = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    return {"causal_no_mask": causal, "B": B, "H": H, "Hkv": Hkv, "L": L, "P": P, "D": D, "dtype": str(dtype).removeprefix("torch."),
            "rel_err": err, "bound": bound, "ok": err < bound, "flash_lse": flash}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/checks.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(1234)
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
    shapes = [(3, 8, 2, 17, 50, 64), (16, 32, 8, 70, 3000, 64), (5, 14, 2, 9, 1, 64), (64, 9, 3, 33, 700, 64)]
    rows = [case(*s, dt, device, gen, causal) for dt in dtypes for s in shapes for causal in (False, True)]
    for r in rows:
        print(r, flush=True)
    write_json(args.out, {"env": environment(device), "checks": rows})
    if not all(r["ok"] for r in rows):
        print("FAILED", file=sys.stderr)
        sys.exit(1)
    print("all attention checks passed", flush=True)


if __name__ == "__main__":
    main()
