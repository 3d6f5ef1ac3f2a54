"""What only the real model shows (SmolLM2-135M, converted once per session by conftest.smollm2): a SiLU
gate's sign is not sparsity, calibrated thresholds hit their target, and skipping by contribution keeps
each block's output closer than skipping by the gate activation (the CATS criterion)."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynsparse import find_mlps
from dynsparse.data.shakespeare import shakespeare_splits
from dynsparse.gating import derive_stats, oracle_mlp, record_activations


def test_smollm2_sign_is_not_sparsity_and_contribution_beats_the_gate_criterion(smollm2):
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(smollm2.dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2.dir)
    text = shakespeare_splits()["train"][0][1]
    ids = tok(text[:20000], return_tensors="pt")["input_ids"][0]
    calib = [{"input_ids": ids[i * 96:(i + 1) * 96].reshape(1, 96)} for i in range(2)]
    held_out = ids[2000:2096].reshape(1, 96)
    blocks = find_mlps(model)
    assert len(blocks) == 30 and all(b.gated and b.d_ff == 1536 for b in blocks.values())
    rows = record_activations(model, calib, max_samples=192, progress=False)
    sign = [s.sparsity for s in rows.values()]  # SiLU's positive branch: a large share, not a sparse set
    assert all(0.2 < v < 0.9 for v in sign) and 0.45 < sum(sign) / len(sign) < 0.8, sign
    stats = derive_stats(blocks, rows, "contribution", [0.5], keep_samples=False, progress=False)[0.5]
    assert all(abs(s.sparsity - 0.5) < 1e-3 for s in stats.values())
    # block by block, on held-out inputs: top-50 % by contribution vs top-50 % by |act(gate)|
    inputs = {}
    handles = [b.owner.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0][0]))
               for n, b in blocks.items()]
    with torch.no_grad():
        model(held_out)
    for h in handles:
        h.remove()
    better = better_than_sign = 0
    with torch.no_grad():
        for name, b in blocks.items():
            x = inputs[name]
            y = b.owner(x)

            def err(mod):
                return ((mod(x) - y).pow(2).sum() / y.pow(2).sum()).item()

            by = {c: err(oracle_mlp(b, "silu", c, 0.5)) for c in ("contribution", "cats")}
            better += by["contribution"] < by["cats"]
            # the negative SiLU branch still matters: the same number of neurons chosen by contribution
            # keeps the output closer than the positive-gate set
            positive = (torch.nn.functional.silu(b.gate_proj(x)) > 0).float().mean().item()
            sign_err = ((b.fc2(torch.nn.functional.silu(b.gate_proj(x)).clamp_min(0) * b.fc1(x)) - y).pow(2).sum()
                        / y.pow(2).sum()).item()
            better_than_sign += err(oracle_mlp(b, "silu", "contribution", 1 - positive)) < sign_err
    assert better >= 27, f"contribution kept the output closer than |act(gate)| in only {better} of 30 layers"
    assert better_than_sign >= 27, f"contribution beat the sign set in only {better_than_sign} of 30 layers"


def test_readme_smollm2_sparsity_commands_run_as_written(smollm2, tmp_path, monkeypatch, capsys):
    """The README's analyze and sparsify lines for SmolLM2, with the built-in calibration text as their
    default and a smaller calibration set than theirs (the only change)."""
    import json
    import re
    import shlex
    from pathlib import Path

    from dynsparse.cli import main

    monkeypatch.setenv("DYNSPARSE_CACHE", str(smollm2.cache.parent))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## A real pretrained LLM", 1)[1].split("\n## ", 1)[0]
    lines = re.findall(r"^dynsparse (analyze|sparsify) +(--model smollm2-135m .*?)\s*(?:#.*)?$", section, flags=re.M)
    assert [c for c, _ in lines] == ["analyze", "sparsify", "sparsify"], lines
    for command, rest in lines:
        argv = [command, *shlex.split(rest.replace("runs/", f"{tmp_path}/"))]
        argv += ["--limit", "8"] if command == "analyze" else ["--calib-limit", "8"]
        assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "MLP activation sparsity of" in out and out.count("wrote ") == 2
    for name, method in (("smol-cats", "cats"), ("smol-mgs", "mgs")):
        report = json.loads((tmp_path / name / "sparsify_report.json").read_text())
        assert report["method"] == method, report.keys()
