"""Every bad input of the robustness probe (issue 15) ends in one clear line naming the argument or file,
exit status 2, before any long work, and leaves the user's files as they were."""
import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli_helpers import TINY, make_world, run_cli, snapshot


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("world"))
    _gate_variants(world)
    _foreign_model(world)
    _broken_runs(world)
    world["yaml_text"] = world["root"] / "text_number.yaml"
    world["yaml_text"].write_text("lr: 1e-3\n")  # YAML 1.1 reads this as the string "1e-3"
    world["yaml_broken"] = world["root"] / "broken.yaml"
    world["yaml_broken"].write_text("lr: [1, 2\n")
    world["yaml_binary"] = world["root"] / "binary.yaml"
    world["yaml_binary"].write_bytes(bytes(range(128, 256)))
    world["control_chars"] = world["root"] / "control.txt"
    world["control_chars"].write_bytes(bytes(range(1, 9)))  # valid UTF-8, but no line of text in it
    return world


def _gate_variants(w):
    """Copies of the SIBS gate file with one thing wrong each."""
    src = w["gates"] / "gates.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in flat if k.endswith("::kept"))
    kept = flat[name]

    def variant(label, **change):
        d = w["root"] / f"gates_{label}"
        d.mkdir()
        save_file({**flat, **change}, str(d / "gates.safetensors"), metadata=meta)
        w[f"gates_{label}"] = d

    variant("short", **{name: kept[:-1].clone()})
    variant("dup", **{name: torch.cat([kept[:1], kept[:-1]]).clone()})
    variant("range", **{name: torch.cat([kept[:-1], torch.tensor([10_000])]).clone()})
    variant("nan", **{name.replace("::kept", "::bias_shift"): torch.full_like(flat[name.replace("::kept", "::bias_shift")], float("nan"))})
    d = w["root"] / "gates_pickle"
    d.mkdir()
    (d / "gates.safetensors").write_bytes(pickle.dumps({"kept": list(range(10))}))
    w["gates_pickle"] = d


def _foreign_model(w):
    """A model folder whose config points at its own Python code (the payload writes a file)."""
    d = w["root"] / "foreign"
    shutil.copytree(w["run"] / "final", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil_lm", auto_map={"AutoConfig": "evil.Cfg", "AutoModelForCausalLM": "evil.Model",
                                               "AutoModel": "evil.Model"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(f"open({str(w['root'] / 'PAYLOAD_RAN')!r}, 'w').write('x')\n")
    w["foreign"] = d


def _broken_runs(w):
    """Copies of the run whose every checkpoint is damaged in one way."""
    for label in ("manifest_list", "garbage_weights", "pickle_optimizer", "state_without_step"):
        d = w["root"] / f"run_{label}"
        shutil.copytree(w["run"], d)
        for ck in sorted((d / "checkpoints").iterdir()):
            manifest = json.loads((ck / "manifest.json").read_text())
            if label == "manifest_list":
                (ck / "manifest.json").write_text(json.dumps(list(manifest)))
                continue
            target = ck / {"garbage_weights": "model.safetensors", "pickle_optimizer": "optimizer.pt"}.get(label, "state.json")
            if label == "garbage_weights":
                target.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson" + b"\0" * 64)
            elif label == "state_without_step":
                target.write_text(json.dumps({"tokens": 3}))
            else:
                target.write_bytes(pickle.dumps(print))  # a pickle that names a callable
            import hashlib

            manifest[target.name] = hashlib.sha256(target.read_bytes()).hexdigest()  # the manifest "agrees"
            (ck / "manifest.json").write_text(json.dumps(manifest))
        w[f"run_{label}"] = d


def _tr(w, *extra, out="o"):
    return ["train", *TINY, "--max-steps", "2", "--data", str(w["corpus"]), "--cache-dir", str(w["cache"]),
            "--out", str(w["root"] / out), *extra]


def _ft(w, init, *extra):
    """train --init-from INIT: TINY without the flags that shape a new model."""
    shape = {"--ff", "--d-model", "--n-layer", "--n-head", "--depth", "--vocab-size"}
    argv = _tr(w, "--init-from", str(init))
    return [a for i, a in enumerate(argv) if a not in shape and argv[i - 1] not in shape] + list(extra)


def _resume(w, run):
    return ["train", *TINY, "--max-steps", "6", "--data", str(w["corpus"]), "--cache-dir", str(w["cache"]),
            "--out", str(w[run]), "--resume"]


# (id, argv builder, text the one error line must contain)
CASES = [
    ("lr-inf", lambda w: _tr(w, "--lr", "inf"), "--lr must be a finite number"),
    ("lr-nan", lambda w: _tr(w, "--lr", "nan"), "--lr must be a finite number"),
    ("weight-decay-nan", lambda w: _tr(w, "--weight-decay", "nan"), "--weight-decay must be a finite"),
    ("ff-weight-decay-nan", lambda w: _tr(w, "--ff-weight-decay", "nan"), "--ff-weight-decay must be a finite"),
    ("grad-clip-nan", lambda w: _tr(w, "--grad-clip", "nan"), "--grad-clip must be a finite"),
    ("batch-size-0", lambda w: _tr(w, "--batch-size", "0"), "--batch-size must be >= 1"),
    ("max-steps-neg", lambda w: _tr(w, "--max-steps", "-3"), "--max-steps must be >= 1"),
    ("train-out-file", lambda w: _tr(w, out="notes.txt"), "is a file"),
    ("train-resume-nothing", lambda w: _tr(w, "--resume", out="nothing"), "nothing to resume"),
    ("compare-out-file", lambda w: ["compare", "--out", str(w["file"]), "--data", str(w["corpus"])], "is a file"),
    ("compare-val-windows-0", lambda w: ["compare", "--val-windows", "0", "--out", str(w["root"] / "o")],
     "--val-windows must be >= 1"),
    ("compare-max-gap-nan", lambda w: ["compare", "--max-gap", "nan", "--out", str(w["root"] / "o")],
     "--max-gap must be a finite"),
    ("convert-out-file", lambda w: ["convert", "--model", str(w["run"] / "final"), "--depth", "2", "--out",
                                    str(w["file"])], "is a file"),
    ("study-out-file", lambda w: ["study", "autoprune", "--quick", "--out", str(w["file"])], "is a file"),
    ("study-steps-below-telemetry", lambda w: ["study", "autoprune", "--quick", "--max-steps", "2", "--out",
                                               str(w["root"] / "o")], "telemetry interval"),
    ("eval-max-windows-0", lambda w: ["eval", str(w["run"] / "final"), "--max-windows", "0"], "--max-windows must be >= 1"),
    ("eval-seq-len-neg", lambda w: ["eval", str(w["run"] / "final"), "--seq-len", "-1"], "--seq-len must be >= 1"),
    ("eval-batch-size-0", lambda w: ["eval", str(w["run"] / "final"), "--batch-size", "0"], "--batch-size must be >= 1"),
    ("eval-limit-neg", lambda w: ["eval", str(w["run"] / "final"), "--limit", "-1"], "--limit must be >= 1"),
    ("detr-threads-neg", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--threads", "-1"],
     "--threads must be >= 1"),
    ("detr-json-missing-dir", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]),
                                         "--json", "/missing/dir/x.json"], "/missing/dir does not exist"),
    ("detr-json-is-input", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]),
                                      "--json", str(w["detr"] / "config.json")], "would replace a file of the input"),
    ("detr-model-is-lm", lambda w: ["detr-eval", "--model", str(w["run"] / "final"), "--coco", str(w["coco"])],
     "not a DETR"),
    ("detr-limit-neg", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--limit", "-1"],
     "--limit must be >= 1"),
    ("gates-short-kept", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--sparsify",
                                    str(w["gates_short"])], "report says"),
    ("gates-dup-kept", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--sparsify",
                                  str(w["gates_dup"])], "each neuron once"),
    ("gates-index-range", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--sparsify",
                                     str(w["gates_range"])], "outside 0.."),
    ("gates-nan", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--sparsify",
                             str(w["gates_nan"])], "NaN or infinite"),
    ("gates-pickle", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--sparsify",
                                str(w["gates_pickle"])], "not a readable safetensors file"),
    ("analyze-eps-nan", lambda w: ["analyze", "--model", str(w["detr"]), "--calib", str(w["coco"]), "--eps", "nan"],
     "--eps must be a finite"),
    ("analyze-eps-neg", lambda w: ["analyze", "--model", str(w["detr"]), "--calib", str(w["coco"]), "--eps", "-1"],
     "--eps must be >= 0"),
    ("analyze-limit-neg", lambda w: ["analyze", "--model", str(w["detr"]), "--calib", str(w["coco"]), "--limit", "-1"],
     "--limit must be >= 1"),
    ("analyze-out-file", lambda w: ["analyze", "--model", str(w["detr"]), "--calib", str(w["coco"]), "--out",
                                    str(w["file"])], "is a file"),
    ("sparsify-calib-limit-neg", lambda w: ["sparsify", "--model", str(w["detr"]), "--method", "sibs",
                                            "--target-sparsity", "0.5", "--calib", str(w["coco"]), "--calib-limit", "-1",
                                            "--out", str(w["root"] / "o")], "--calib-limit must be >= 1"),
    ("sparsify-batch-size-0", lambda w: ["sparsify", "--model", str(w["detr"]), "--method", "sibs",
                                         "--target-sparsity", "0.5", "--calib", str(w["coco"]), "--batch-size", "0",
                                         "--out", str(w["root"] / "o")], "--batch-size must be >= 1"),
    ("sparsify-threshold-nan", lambda w: ["sparsify", "--model", str(w["detr"]), "--method", "sibs", "--threshold",
                                          "nan", "--calib", str(w["coco"]), "--out", str(w["root"] / "o")],
     "--threshold must be a finite"),
    ("sparsify-out-run", lambda w: ["sparsify", "--model", str(w["detr"]), "--method", "sibs", "--target-sparsity",
                                    "0.5", "--calib", str(w["coco"]), "--out", str(w["run"])], "pass --overwrite"),
    ("sparsify-out-holds-model", lambda w: ["sparsify", "--model", str(w["detr"]), "--method", "sibs",
                                            "--target-sparsity", "0.5", "--calib", str(w["coco"]), "--out",
                                            str(w["root"]), "--overwrite"], "contains the input"),
    ("inspect-out-run", lambda w: ["inspect", str(w["run"]), "--out", str(w["run"])], "is the input"),
    ("inspect-out-parent", lambda w: ["inspect", str(w["run"]), "--out", str(w["root"]), "--overwrite"], "contains the input"),
    ("inspect-out-other", lambda w: ["inspect", str(w["run"]), "--out", str(w["mine"])], "did not write"),
    ("inspect-out-other-overwrite", lambda w: ["inspect", str(w["run"]), "--out", str(w["mine"]), "--overwrite"],
     "even with --overwrite"),
    ("inspect-out-file", lambda w: ["inspect", str(w["run"]), "--out", str(w["file"])], "is a file"),
    ("prune-out-run", lambda w: ["prune", str(w["run"]), "--out", str(w["run"]), "--overwrite"], "is the input"),
    ("prune-out-file", lambda w: ["prune", str(w["run"]), "--out", str(w["file"])], "is a file"),
    ("prune-calib-windows-0", lambda w: ["prune", str(w["run"]), "--out", str(w["root"] / "o"), "--calib-windows", "0"],
     "--calib-windows must be >= 1"),
    ("convert-out-model", lambda w: ["convert", "--model", str(w["run"] / "final"), "--depth", "2", "--out",
                                     str(w["run"] / "final")], "must differ"),
    ("foreign-code-eval", lambda w: ["eval", str(w["foreign"])], "--trust-remote-code"),
    ("foreign-code-convert", lambda w: ["convert", "--model", str(w["foreign"]), "--depth", "2", "--out",
                                        str(w["root"] / "o")], "--trust-remote-code"),
    ("foreign-code-sparsify", lambda w: ["sparsify", "--model", str(w["foreign"]), "--method", "sibs",
                                         "--target-sparsity", "0.5", "--calib", str(w["corpus"]), "--out",
                                         str(w["root"] / "o")], "--trust-remote-code"),
    ("foreign-code-analyze", lambda w: ["analyze", "--model", str(w["foreign"]), "--calib", str(w["corpus"])],
     "--trust-remote-code"),
    ("foreign-code-init-from", lambda w: _ft(w, w["foreign"]), "train never runs it"),
    ("init-from-not-a-model", lambda w: _ft(w, w["mine"]), "not a saved model directory"),
    ("init-from-with-shape", lambda w: _ft(w, w["run"] / "final", "--depth", "3"), "--depth: only shape a new model"),
    ("init-from-dense-as-tree", lambda w: _ft(w, w["dense"] / "final", "--ff", "tree"), "has dense FF blocks"),
    ("init-from-tree-as-dense", lambda w: _ft(w, w["run"] / "final", "--ff", "dense"), "has tree FF blocks"),
    ("ckpt-manifest-list", lambda w: _resume(w, "run_manifest_list"), "corrupt manifest.json"),
    ("ckpt-garbage-weights", lambda w: _resume(w, "run_garbage_weights"), "model.safetensors is unreadable"),
    ("ckpt-pickle-optimizer", lambda w: _resume(w, "run_pickle_optimizer"), "optimizer.pt is unreadable"),
    ("ckpt-state-without-step", lambda w: _resume(w, "run_state_without_step"), "state.json lacks a step"),
    ("data-empty-string", lambda w: _tr(w, "--data", ""), "--data must not be empty"),
    ("eval-model-empty-string", lambda w: ["eval", ""], "MODEL must not be empty"),
    ("sparsify-model-empty-string", lambda w: ["sparsify", "--model", "", "--method", "sibs", "--target-sparsity",
                                               "0.5", "--out", str(w["root"] / "o")], "--model must not be empty"),
    ("grad-clip-negative", lambda w: _tr(w, "--grad-clip", "-1"), "grad_clip must be >= 0"),
    ("lr-negative", lambda w: _tr(w, "--lr", "-1"), "lr must be > 0, got -1.0"),
    ("weight-decay-negative", lambda w: _tr(w, "--weight-decay", "-0.1"), "weight_decay must be >= 0, got -0.1"),
    ("distill-lr-zero", lambda w: ["convert", "--model", str(w["run"] / "final"), "--depth", "2", "--init", "distill",
                                   "--distill-lr", "0", "--out", str(w["root"] / "o")], "--distill-lr must be > 0"),
    ("yaml-number-as-text", lambda w: _tr(w, "--config", str(w["yaml_text"])), "YAML reads 1e-3 as text"),
    ("yaml-malformed", lambda w: _tr(w, "--config", str(w["yaml_broken"])),
     "broken.yaml: not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
    ("yaml-binary", lambda w: _tr(w, "--config", str(w["yaml_binary"])), "binary.yaml: not a YAML text file"),
    ("study-depth-0", lambda w: ["study", "autoprune", "--depths", "7,0", "--out", str(w["root"] / "o")],
     "--depths must be in [1, 24] (a depth-0 tree has no routing), got [7, 0]"),
    ("detr-json-other-file", lambda w: ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]),
                                        "--json", str(w["file"])], "is not an earlier output"),
    ("eval-include-path-without-tasks", lambda w: ["eval", str(w["run"] / "final"), "--include-path", str(w["mine"])],
     "only apply to --tasks"),
    ("eval-tasks-empty-list", lambda w: ["eval", str(w["run"] / "final"), "--tasks", ","], "names no task"),
    ("study-variants-empty-list", lambda w: ["study", "autoprune", "--variants", ",", "--out", str(w["root"] / "o")],
     "names no variant"),
    ("sibs-with-target-recall", lambda w: ["sparsify", "--model", str(w["detr"]), "--method", "sibs",
                                           "--target-sparsity", "0.5", "--target-recall", "0.9", "--calib",
                                           str(w["coco"]), "--out", str(w["root"] / "o")], "MGS option"),
    ("bench-lm-preset-typo", lambda w: ["bench", "tree", "--lm-preset", "nosuch"], "--lm-preset must be one of"),
    ("bench-tokens-0", lambda w: ["bench", "tree", "--tokens", "0"], "--tokens must be >= 1"),
    ("bench-repeats-0", lambda w: ["bench", "tree", "--repeats", "0"], "--repeats must be >= 1"),
    ("bench-linears-not-generate", lambda w: ["bench", "tree", "--linears", "torch"],
     "--linears applies to bench generate only"),
    ("eval-data-missing", lambda w: ["eval", str(w["run"] / "final"), "--data", str(w["root"] / "nope.txt")],
     "data not found"),
    ("eval-data-too-short", lambda w: ["eval", str(w["run"] / "final"), "--data", str(w["file"]), "--split", "train"],
     "notes.txt (train split): need at least"),
    ("sparsify-calib-no-lines", lambda w: ["sparsify", "--model", str(w["dense"] / "final"), "--method", "sibs",
                                           "--target-sparsity", "0.5", "--calib", str(w["control_chars"]), "--out",
                                           str(w["root"] / "o")], "control.txt has no text lines"),
    ("whiten-dense", lambda w: _tr(w, "--whiten", "--ff", "dense"), "whiten builds new tree blocks"),
    ("study-variant-modifier-typo", lambda w: ["study", "autoprune", "--variants", "node-gelu+centre", "--out",
                                               str(w["root"] / "o")], "unknown variant"),
]


@pytest.mark.parametrize("argv,expect", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_gets_one_clear_line(w, argv, expect):
    before = snapshot(w["root"], skip=(w["root"] / "o", w["cache"]))
    o = run_cli(argv(w))
    assert o.kind == "clear", o.err[-2000:]
    (line,) = o.error_lines
    assert expect in line, line
    assert len(line) < 500
    assert snapshot(w["root"], skip=(w["root"] / "o", w["cache"])) == before  # nothing of the user's changed
    assert not (w["root"] / "o" / "config.json").exists()
    assert not (w["root"] / "PAYLOAD_RAN").exists()


def test_trust_remote_code_is_the_only_way_the_folder_code_runs(w):
    """The refusal above is what stops the code: with the flag, transformers imports the folder's module."""
    marker = w["root"] / "PAYLOAD_RAN"
    o = run_cli(["eval", str(w["foreign"]), "--trust-remote-code", "--data", str(w["corpus"])])
    try:
        assert marker.exists()  # our stand-in payload ran (it then fails to be a model: one line)
        assert o.kind == "clear", o.err[-2000:]
    finally:
        marker.unlink(missing_ok=True)


def test_python_dash_m_gives_the_same_one_line(tmp_path):
    """`python -m dynsparse.cli` runs the module as __main__: errors raised by the commands must still be
    caught (they raise dynsparse.cli.CLIError, a different class object from __main__'s)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dynsparse.cli", "inspect", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dynsparse inspect: error:")
