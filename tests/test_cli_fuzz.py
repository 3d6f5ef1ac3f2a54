"""Fuzz the CLI: every subcommand, from a cheap valid command line, with one option at a time replaced by a
generated bad value (non-finite or out-of-range numbers, zero and negative counts, missing / wrong-kind /
foreign paths, outputs naming inputs or files). Each case must end in one clear error line (exit 2), never
a traceback or a hang, never accepted silently, and must change nothing outside its output folder.

The generator reads the options from the parser itself, so a new option is fuzzed without editing this file.
Run ``pytest tests/test_cli_fuzz.py -s`` to see the counts.
"""
import argparse
import os
import pickle
import shutil
from collections import Counter

import pytest

from cli_helpers import TINY, make_world, run_cli, snapshot, train_argv

# Out-of-range values for options whose range is narrower than "a finite number" / "a count".
SEMANTIC = {
    "lr": ["-1", "0"], "weight_decay": ["-1"], "ff_weight_decay": ["-1"], "ff_lr_scale": ["0", "-1"],
    "grad_clip": ["-1"], "tree_balance_rate": ["-1"], "eps": ["-1"], "threshold": ["-0.1", "1.5"],
    "target_sparsity": ["-0.1", "1", "1.5"], "target_recall": ["0", "-1", "1.5"],
}
NUMBERS = {float: ["nan", "inf", "-inf"], int: ["0", "-1"]}
ZERO_OK_VALUES = ["-1", "-7"]  # options where 0 is meaningful still take no negative number
# Options that name something to read (path roles) or write.
READ_PATHS = {"model", "run", "data", "calib", "coco", "sparsify", "init_from", "tokenizer", "qa", "yaml_file",
              "include_path"}
WRITE_PATHS = {"out", "json"}
# Value-taking string options without a path role: a few malformed values each.
STRINGS = {"tokens": ["", ",", "x", "1,-4"], "variants": [",", "node-nothing"], "split": ["nosuch"],
           "calib_split": ["nosuch"], "tasks": [","], "lm_preset": ["nosuch"]}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("fuzzworld"))
    r = world["root"]
    (r / "empty.txt").write_text("\n \n")
    (r / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (r / "binary.txt").write_bytes(bytes(range(256)) * 64)  # a .txt that is not text
    (r / "bad.jsonl").write_bytes(b'{"text": 1}\n{"nope"\n')
    (r / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    (r / "empty_dir").mkdir()
    (r / "bad.yaml").write_text("- a list\n- not a mapping\n")
    return world


def bases(w, out):
    """Valid, cheap command lines for every subcommand (each finishes in seconds when valid)."""
    tiny = ["--d-model", "16", "--n-layer", "1", "--n-head", "2", "--depth", "2", "--vocab-size", "260",
            "--seq-len", "8", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1",
            "--telemetry-every", "2"]
    return {
        "train": train_argv(w["corpus"], out, w["cache"], steps=2),
        "compare": ["compare", *tiny, "--trees", "1", "--data", str(w["corpus"]), "--cache-dir", str(w["cache"]),
                    "--val-windows", "2", "--threads", "1", "--no-progress", "--out", str(out)],
        "convert": ["convert", "--model", str(w["dense"] / "final"), "--depth", "2", "--out", str(out)],
        "eval": ["eval", str(w["run"] / "final"), "--data", str(w["corpus"]), "--cache-dir", str(w["cache"]),
                 "--max-windows", "2", "--batch-size", "2"],
        "inspect": ["inspect", str(w["run"]), "--out", str(out)],
        "prune": ["prune", str(w["run"]), "--out", str(out), "--calib-windows", "2", "--val-windows", "2"],
        "sparsify": ["sparsify", "--model", str(w["detr"]), "--method", "sibs", "--target-sparsity", "0.5",
                     "--calib", str(w["coco"]), "--calib-limit", "4", "--out", str(out)],
        "sparsify-mgs": ["sparsify", "--model", str(w["detr"]), "--method", "mgs", "--rank", "2", "--steps", "5",
                         "--calib", str(w["coco"]), "--calib-limit", "16", "--out", str(out)],
        "analyze": ["analyze", "--model", str(w["detr"]), "--calib", str(w["coco"]), "--limit", "4", "--out", str(out)],
        "detr-eval": ["detr-eval", "--model", str(w["detr"]), "--coco", str(w["coco"]), "--limit", "2",
                      "--batch-size", "2", "--json", str(out / "x.json")],
        "study": ["study", "autoprune", "--quick", "--max-steps", "10", "--variants", "node-gelu",
                  "--data", str(w["corpus"]), "--no-progress", "--out", str(out)],
        "bench": ["bench", "tree", "--tokens", "1", "--repeats", "1", "--warmup", "0", "--d-model", "16",
                  "--d-ff", "32", "--forest-tokens", "1", "--train-tokens", "1", "--threads", "1",
                  "--peak-matmul-n", "16", "--peak-megabytes", "1"],
    }


def path_values(w, dest):
    r = w["root"]
    if dest in WRITE_PATHS:  # a file, an input, a folder holding inputs, other files, a missing parent
        return [str(w["file"]), str(w["run"]), str(r), str(w["mine"]), str(w["file"] / "x"),
                str(r / "no" / "such" / "dir" / "x.json") if dest == "json" else str(w["dense"])]
    values = [str(r / "missing"), str(r / "empty_dir"), str(w["mine"]),
              str(r / "empty.txt"), str(r / "blob.bin"), str(r / "pickle.safetensors"), ""]
    if dest in ("data", "calib"):
        values += [str(r / "binary.txt"), str(r / "bad.jsonl"), "hf:" + str(r / "mine"), "hf:"]
    if dest in ("model", "run", "init_from"):
        values += [str(w["run"] / "checkpoints"), str(w["gates"])]
    if dest == "yaml_file":
        values += [str(r / "bad.yaml")]
    return values


def leaf(parser, argv):
    args = parser.parse_args(argv)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest)
            return leaf(action.choices[name], argv[1:]) if name in action.choices else parser
    return parser


def cases(w, out):
    from dynsparse.cli import ZERO_OK, build_parser

    parser = build_parser()
    for name, base in bases(w, out).items():
        sub = parser._subparsers._group_actions[0].choices[base[0]]
        if base[0] == "study":
            sub = sub._subparsers._group_actions[0].choices["autoprune"]
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.choices is not None:
                continue
            flag = max(action.option_strings, key=len)
            if action.type in (int, float):
                values = (ZERO_OK_VALUES if action.dest in ZERO_OK else NUMBERS[action.type]) if action.type is int \
                    else NUMBERS[float]
                values = values + SEMANTIC.get(action.dest, [])
            elif action.dest in READ_PATHS or action.dest in WRITE_PATHS:
                values = path_values(w, action.dest)
            else:
                values = STRINGS.get(action.dest, [])
            for v in values:
                yield f"{name} {flag} {v}", base + [flag, v]
        if base[0] in ("eval", "inspect", "prune"):  # the positional input
            for v in path_values(w, "run"):
                argv = list(base)
                argv[1] = v
                yield f"{name} <input> {v}", argv


def accepted_on_purpose(label: str, o, w) -> str | None:
    """Why a generated value that ran to the end is in fact valid, or None (then it counts as silent)."""
    if "binary.txt" in label and "not valid UTF-8" in o.err:
        return "warned"  # a corpus that is not text trains, with the share of undecodable bytes named
    if label.endswith(" " + str(w["gates"])) and " --model " in label:
        return "valid"  # a sparsify output holds a copy of the dense model: a model folder
    if label.endswith(" " + str(w["root"] / "empty.txt")) and " --config " in label:
        return "valid"  # an empty YAML file sets no option
    return None


def test_fuzz_cli_sample(w, tmp_path, monkeypatch, capsys):
    """Every 3rd generated case (all subcommands, every kind of bad value), for the default test run."""
    _fuzz(w, tmp_path, monkeypatch, capsys, stride=3)


@pytest.mark.slow
def test_fuzz_cli_all(w, tmp_path, monkeypatch, capsys):
    _fuzz(w, tmp_path, monkeypatch, capsys, stride=1)


def _fuzz(w, tmp_path, monkeypatch, capsys, stride):
    monkeypatch.setenv("DYNSPARSE_CACHE", str(w["cache"]))  # nothing goes to the user's real cache
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "out"
    counts, problems, silent = Counter(), [], []
    for i, (label, argv) in enumerate(cases(w, out)):
        if i % stride:
            continue
        if out.exists():
            shutil.rmtree(out)
        if argv[0] == "detr-eval" and "--json" in argv and argv[argv.index("--json") + 1].startswith(str(out)):
            out.mkdir()
        before = snapshot(w["root"], skip=(w["cache"],), fast=True)
        o = run_cli(argv, timeout_s=180)
        after = snapshot(w["root"], skip=(w["cache"],), fast=True)
        if before != after:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"{label}: changed files outside --out: {changed[:4]}")
        if o.kind == "ok":
            o.kind = accepted_on_purpose(label, o, w) or "silent"
            if o.kind == "silent":
                silent.append(label)
        counts[o.kind] += 1
        if o.kind in ("traceback", "hang", "unclear"):
            problems.append(f"{label}: {o.kind}: {o.err.strip().splitlines()[-1][:300] if o.err.strip() else ''}")
    with capsys.disabled():
        print(f"\nfuzz: tried {sum(counts.values())}, clear error {counts['clear']}, traceback {counts['traceback']}, "
              f"silent {counts['silent']}, hang {counts['hang']}, unclear exit {counts['unclear']}, "
              f"accepted with a warning {counts['warned']}, valid after all {counts['valid']}")
        for s in silent:
            print("  silent:", s)
    assert not problems, "\n".join(problems)
    assert not silent, f"accepted without an error: {silent}"
