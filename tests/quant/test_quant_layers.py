"""Quantised linear layers: what loads where under tensor parallelism, pre-quantised block
scales kept exactly, and clear errors instead of a silently different model."""

from __future__ import annotations

import pytest
import torch

from minivllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from minivllm.layers.quantization.formats import FP8_E4M3, INT8, quantize_blockwise
from minivllm.layers.quantization.fp8 import Fp8LinearMethod
from minivllm.layers.quantization.int8 import Int8LinearMethod

CPU = torch.device("cpu")
HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTER = 256, 64, 4, 2, 512


class _Rank:
    """One rank of a tensor-parallel group, in one process: loading needs only rank/size; the
    test sums row-parallel partial outputs itself, so all_reduce returns its input."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _methods():
    return {"fp8": Fp8LinearMethod(CPU), "int8": Int8LinearMethod(CPU),
            "fp8-block": Fp8LinearMethod(CPU, (128, 128)), "int8-q8_0": Int8LinearMethod(CPU, (1, 32))}


def _checkpoint(method, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a checkpoint would hold: dense weights, or codes + block scales (pre-quantised)."""
    if method.checkpoint_block is None:
        return dense
    out = {}
    for name, w in dense.items():
        q, s = quantize_blockwise(w, method.fmt, *method.checkpoint_block)
        out[name], out[name + "_scale"] = q, s
    return out


def _load(layer, ckpt, parts):
    for i, name in enumerate(parts):
        shard = i if len(parts) > 1 else None
        layer.load_weight("weight", ckpt[name], shard)
        if name + "_scale" in ckpt:
            layer.load_weight("weight_scale", ckpt[name + "_scale"], shard)


def _dense(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (HEADS * HEAD_DIM, HIDDEN), "k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "v": (KV_HEADS * HEAD_DIM, HIDDEN), "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN),
              "down": (HIDDEN, INTER)}
    return {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}


@pytest.mark.parametrize("kind", ["fp8", "int8", "fp8-block", "int8-q8_0"])
def test_tensor_parallel_shards_compute_the_tp1_layer(kind):
    method = _methods()[kind]
    ckpt = _checkpoint(method, _dense())
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    h = torch.randn(5, INTER, generator=torch.Generator().manual_seed(2))

    def build(group):
        qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, group, method)
        mlp = MergedColumnParallelLinear.even(HIDDEN, [INTER, INTER], False, group, method)
        down = RowParallelLinear(INTER, HIDDEN, False, group, method)
        _load(qkv, ckpt, ["q", "k", "v"])
        _load(mlp, ckpt, ["gate", "up"])
        _load(down, ckpt, ["down"])
        return qkv, mlp, down

    full = build(None)
    ranks = [build(_Rank(r, 2)) for r in range(2)]
    for layer in (*full, *(l for r in ranks for l in r)):
        assert not torch.isnan(layer.weight_scale).any(), "a scale was never loaded"
    # Column-parallel: rank r holds rows of each part; scales travel with their rows, so the
    # numbers are exactly the TP=1 layer's.
    q_out = [r[0](x).split([HEADS // 2 * HEAD_DIM, KV_HEADS // 2 * HEAD_DIM, KV_HEADS // 2 * HEAD_DIM], -1)
             for r in ranks]
    want = full[0](x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
    for part in range(3):
        torch.testing.assert_close(torch.cat([q[part] for q in q_out], -1), want[part], rtol=0, atol=1e-5)
    gate_up = [r[1](x).chunk(2, -1) for r in ranks]
    for part, w in enumerate(full[1](x).chunk(2, -1)):
        torch.testing.assert_close(torch.cat([g[part] for g in gate_up], -1), w, rtol=0, atol=1e-5)
    # Row-parallel: partial sums add up to the TP=1 output. Pre-quantised blocks are the same
    # numbers; load-time per-channel scales are computed per shard (each rank's own row
    # absmax), so those agree only to within the quantisation error.
    summed = sum(r[2](h.chunk(2, -1)[i]) for i, r in enumerate(ranks))
    tol = 1e-5 if method.checkpoint_block else 0.05 * full[2](h).abs().max().item()
    torch.testing.assert_close(summed, full[2](h), rtol=0, atol=tol)


def test_unaligned_parts_store_block_scales_per_row():
    # TP=2 leaves each rank 64 rows of k and v: half a 128-row block. The scales are then
    # stored per row (the same numbers, repeated) instead of refusing the layout.
    method = Fp8LinearMethod(CPU, (128, 128))
    qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, _Rank(1, 2), method)
    assert qkv.scale_block == (1, 128) and qkv.weight_scale.shape == (256, 2)
    mlp = MergedColumnParallelLinear.even(HIDDEN, [INTER, INTER], False, _Rank(1, 2), method)
    assert mlp.scale_block == (128, 128) and mlp.weight_scale.shape == (4, 2)


def test_row_shard_that_splits_a_checkpoint_block_is_refused():
    with pytest.raises(ValueError, match="quantisation block"):
        RowParallelLinear(384, HIDDEN, False, _Rank(1, 2), Fp8LinearMethod(CPU, (128, 128)))


def test_prequantised_codes_and_scales_are_kept_bit_exact():
    method = Fp8LinearMethod(CPU, (128, 128))
    w = _dense()["down"]
    q, s = quantize_blockwise(w, FP8_E4M3, 128, 128)
    layer = RowParallelLinear(INTER, HIDDEN, False, None, method)
    layer.load_weight("weight", q)
    layer.load_weight("weight_scale", s)
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.weight_scale, s)


def test_codes_without_scales_in_config_are_refused():
    # An fp8 tensor in a checkpoint whose config.json declares no quantisation: refusing is
    # the only safe answer (loading the codes as values would be a silently different model).
    q, _ = quantize_blockwise(_dense()["down"], INT8, 1, INTER)
    layer = RowParallelLinear(INTER, HIDDEN, False, None, Int8LinearMethod(CPU))
    with pytest.raises(ValueError, match="quantization_config"):
        layer.load_weight("weight", q)
    with pytest.raises(ValueError, match="unexpected"):
        layer.load_weight("weight_scale", torch.ones(HIDDEN, 1))
    dense = RowParallelLinear(INTER, HIDDEN, False, None)  # no quantisation requested at all
    with pytest.raises(ValueError, match="quantization_config"):
        dense.load_weight("weight", q)


def test_load_time_quantisation_stores_what_quantize_blockwise_gives():
    w = _dense()["gate"]
    for method, fmt in ((Fp8LinearMethod(CPU), FP8_E4M3), (Int8LinearMethod(CPU), INT8)):
        layer = MergedColumnParallelLinear.even(HIDDEN, [INTER], False, None, method)
        layer.load_weight("weight", w)
        q, s = quantize_blockwise(w, fmt, 1, HIDDEN)
        assert layer.weight.dtype == fmt.dtype
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(layer.weight_scale, s)
