"""3-D rotary positions (mRoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL): packed rows with `VarlenCollator(mrope=True)`
give each sample the logits and gradients it gets alone through `sdpa`, in float64; without the
option such a model is refused in one line, and a sample's own positions are never dropped."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import varlen.hf  # noqa: E402
from varlen.hf import PackingRefused, VarlenCollator  # noqa: E402


TEXT = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=256)
VISION = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=64)
FAMILIES = {  # name -> (config, model, text config, vision config): tiny, random
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                 {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
                 dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64)),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                   {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}, VISION),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
                 {**TEXT, "head_dim": 16,
                  "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}},
                 {**VISION, "deepstack_visual_indexes": []}),
}


def _models(family="qwen2_vl"):
    config, model, text, vision = FAMILIES[family]
    cfg = getattr(transformers, config)(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    eager = getattr(transformers, model)(cfg).double().eval()
    eager.set_attn_implementation("sdpa")  # float64 throughout (eager softmaxes in float32)
    packed = copy.deepcopy(eager)
    packed.set_attn_implementation("varlen")
    varlen.hf.use("auto", packed)
    return eager, packed


def _grid_positions(n: int) -> torch.Tensor:
    """mRoPE positions of a sample whose middle is a 2 x 3 image: temporal, height, width differ there."""
    t = torch.arange(n).expand(3, n).clone()
    img = slice(2, 8)
    t[0, img] = 2
    t[1, img] = 2 + torch.arange(6) // 3
    t[2, img] = 2 + torch.arange(6) % 3
    t[:, 8:] -= 3  # text after the image continues from the grid's largest position + 1
    return t


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("lengths", [[5, 11, 1], [1], [12, 9, 10, 1, 3]])
def test_mrope_rows_pack_exactly(family, lengths):
    eager, packed = _models(family)
    g = torch.Generator().manual_seed(len(lengths))
    samples = [{"input_ids": torch.randint(1, 200, (n,), generator=g)} for n in lengths]
    if lengths[0] >= 10:
        samples[0]["position_ids"] = _grid_positions(lengths[0])
    batch = VarlenCollator(mrope=True)(samples)
    assert batch["position_ids"].shape == (4, 1, sum(lengths))
    out = packed(input_ids=batch["input_ids"], position_ids=batch["position_ids"], varlen_info=batch["varlen_info"],
                 use_cache=False).logits[0]
    alone = []
    for s in samples:
        pos = s.get("position_ids", torch.arange(len(s["input_ids"])).expand(3, -1))[:, None]
        alone.append(eager(input_ids=s["input_ids"][None], position_ids=pos, use_cache=False).logits[0])
    ref = torch.cat(alone)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10), (out - ref).abs().max()
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for (name, a), b in zip(packed.named_parameters(), eager.parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-9, rtol=1e-9), name


def test_mrope_model_without_text_positions_is_refused():
    _, packed = _models()
    batch = VarlenCollator()([{"input_ids": torch.randint(1, 200, (n,))} for n in (4, 6)])
    with pytest.raises(PackingRefused, match=r"mrope=True"):
        packed(**batch, use_cache=False)


def test_a_samples_own_positions_are_never_dropped():
    sample = {"input_ids": torch.arange(1, 11), "position_ids": _grid_positions(10)}
    with pytest.raises(ValueError, match=r"sample 0 carries position_ids of shape \(3, 10\).*mrope=True"):
        VarlenCollator()([sample])
    VarlenCollator()([{"input_ids": torch.arange(1, 5), "position_ids": torch.arange(4)}])  # 0..n-1: the same
    with pytest.raises(ValueError, match=r"sample 1: mRoPE position_ids must be \[3, 4\]"):
        VarlenCollator(mrope=True)([{"input_ids": torch.arange(1, 4)},
                                    {"input_ids": torch.arange(1, 5), "position_ids": torch.zeros(2, 4)}])
