"""Recording: statistics are right, padding never counts, memory stays bounded, bad input is named."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from dynsparse.detection.model import small_detr_config
from dynsparse.gating import record_activations
from dynsparse.gating.analyze import plot, summarize, write_json


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertModel(cfg).eval()


def test_stats_match_direct_computation():
    m = tiny_bert()
    ids = torch.randint(0, 50, (3, 7))
    s = record_activations(m, [{"input_ids": ids}])["encoder.layer.0"]
    captured = {}
    h = m.encoder.layer[0].intermediate.register_forward_hook(lambda mod, i, o: captured.setdefault("a", o))
    with torch.no_grad():
        m(input_ids=ids)
    h.remove()
    a = captured["a"].reshape(-1, 32)
    assert s.n_tokens == 21
    assert torch.equal(s.fire_count, (a > 0).sum(0))
    assert torch.allclose(s.mean_activation.float(), a.mean(0), atol=1e-6)
    assert torch.allclose(s.mean_square_activation.float(), a.square().mean(0), atol=1e-6)
    assert s.sparsity == pytest.approx(1 - (a > 0).float().mean().item())
    assert s.batch_union == pytest.approx((a > 0).any(0).float().mean().item())


def test_padding_is_excluded_by_attention_mask():
    m = tiny_bert()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    padded = record_activations(m, [{"input_ids": ids, "attention_mask": mask}])["encoder.layer.1"]
    # the same real tokens without padding, one sequence at a time
    alone = record_activations(m, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :3]}])["encoder.layer.1"]
    assert padded.n_tokens == 9 == alone.n_tokens
    assert torch.equal(padded.fire_count, alone.fire_count)
    assert torch.allclose(padded.act_sum, alone.act_sum, atol=1e-4)


def test_detr_pixel_mask_excludes_padded_encoder_tokens():
    from transformers import DetrForObjectDetection

    torch.manual_seed(0)
    m = DetrForObjectDetection(small_detr_config({0: "a"}, d_model=32, layers=1, d_ff=64, num_queries=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    pm = torch.ones(2, 64, 64, dtype=torch.long)
    pm[1, :, 32:] = 0  # image 2 is 64x32, padded to 64x64
    s = record_activations(m, [{"pixel_values": x, "pixel_mask": pm}])
    assert s["model.encoder.layers.0.mlp"].n_tokens == 16 + 8  # stride 16: 4x4 + 4x2 real tokens
    assert s["model.decoder.layers.0.mlp"].n_tokens == 2 * 5  # every query is real


def test_reservoir_is_capped_and_rows_are_real_samples():
    m = tiny_bert()
    calib = [{"input_ids": torch.randint(0, 50, (4, 8))} for _ in range(5)]
    s = record_activations(m, calib, max_samples=50)["encoder.layer.0"]
    assert s.samples_x.shape == (50, 16) and s.samples_active.shape == (50, 32)
    assert s.n_tokens == 160
    w1, b1 = m.encoder.layer[0].intermediate.dense.weight, m.encoder.layer[0].intermediate.dense.bias
    with torch.no_grad():
        z = s.samples_x @ w1.t() + b1
    assert torch.equal(z > 0, s.samples_active)  # GELU(z) > 0 iff z > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no recognisable MLP"):
        record_activations(nn.Sequential(nn.Linear(4, 4)), [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="empty"):
        record_activations(tiny_bert(), [])
    with pytest.raises(TypeError, match="calibration batch"):
        record_activations(tiny_bert(), ["not a batch"])


def test_analysis_outputs(tmp_path):
    m = tiny_bert()
    stats = record_activations(m, [{"input_ids": torch.randint(0, 50, (2, 8))}])
    rows = summarize(stats)
    assert [r["layer"] for r in rows] == ["encoder.layer.0", "encoder.layer.1"]
    for r in rows:
        parts = r["never_active"] + r["always_active"] + r["rarely_active"] + r["sometimes_active"]
        assert parts == pytest.approx(1.0)
    write_json(rows, tmp_path / "a.json")
    paths = plot(stats, tmp_path)
    assert (tmp_path / "a.json").stat().st_size > 0 and all(p.stat().st_size > 1000 for p in paths)
