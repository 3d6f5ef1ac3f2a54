"""The benchmark suite runs end to end at tiny sizes and reports what it measured."""
import json

import pytest

from dynsparse.bench import Settings, run_suites
from dynsparse.bench.cases import Result, _visited_nodes
from dynsparse.bench.timing import median_time
from dynsparse.cli import main

TINY = Settings(warmup=0, repeats=1, min_time=0.0, d_model=32, d_ff=64, tree_tokens=(1, 8), forest_tokens=16,
                train_tokens=32, mgs_tokens=100, mgs_d_model=16, mgs_d_ff=512, union_tokens=64, lm_new_tokens=2, lm_preset="tiny",
                peak_matmul_n=256, peak_megabytes=16)


def test_kernel_suites_report_every_case_with_consistent_numbers():
    report = run_suites(["tree", "train", "mgs"], TINY)
    assert report["errors"] == {}
    m = report["machine"]
    assert m["matmul_gflops"] > 0 and m["memory_gbps"] > 0 and m["threads"] >= 1 and m["cpu"]
    assert m["gather_ceiling_gflops"] > 0
    cases = [r["case"] for r in report["results"]]
    assert len(cases) == 4 + 1 + 4 + 4  # tree 1x11 x2 token counts + 16x7 + bf16; train; mgs x3 + one token; union x4
    for r in report["results"]:
        assert r["baseline_ms"] > 0 and r["dynsparse_ms"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_ms"] / r["dynsparse_ms"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["dynsparse_ms"] / 1e6)
        assert r["met"] is None or r["met"] == (r["ratio"] >= r["target"])
    json.dumps(report)  # JSON-ready
    mgs = [r for r in report["results"] if r["suite"] == "mgs" and "100 tokens, grouped" in r["case"]]
    assert len(mgs) == 2
    for r in mgs:  # the 90 % sparsity the case claims, for the gate and for the ReLU-skip baseline
        assert 0.05 < r["extra"]["gate_density"] < 0.15 and 0.05 < r["extra"]["relu_density"] < 0.15
    unions = [r for r in report["results"] if "union path" in r["case"]]
    assert [r["extra"]["union_size"] for r in unions] == [51, 128, 256, 512]  # 10/25/50/100 % of 512
    for r in unions:
        assert r["extra"]["nnz"] == 64 * 51
        assert r["extra"]["dispatch_picks"] in ("token", "union")
        assert r["extra"]["dispatch_right"] == (r["extra"]["dispatch_picks"] == r["extra"]["faster"])


def test_lm_suite_generates():
    report = run_suites(["lm"], TINY)
    assert report["errors"] == {}
    (r,) = report["results"]
    assert r["extra"]["tokens_per_s"] > 0 and r["target"] == 1.5
    assert r["extra"]["no_ff_ms"] > 0 and r["extra"]["ceiling_ratio"] == pytest.approx(r["baseline_ms"] / r["extra"]["no_ff_ms"])


def test_visited_nodes_counts_distinct_path_nodes():
    import torch

    leaves = torch.tensor([[0, 3], [0, 0], [1, 3]])  # depth 2: leaves 0..3, two trees
    # tree 0: leaves 0,1 share parent 1 and root: {3,4,1,0} = 4; tree 1: leaves 3,0: {6,3,2,1,0} = 5
    assert _visited_nodes(leaves, 2) == 9


def test_median_time_and_result_ratio():
    assert median_time(lambda: None, warmup=0, repeats=3, min_time=0.001) >= 0
    r = Result("c", "b", 10.0, 2.0, 4.0, 2e6, 1e6, 1e6, 1e6)
    assert r.ratio == 5.0 and r.met is True and r.to_dict()["gflops"] == pytest.approx(1.0)


def test_cli_json_and_bad_arguments(capsys):
    args = ["bench", "mgs", "--json", "--repeats", "1", "--warmup", "0", "--mgs-tokens", "20", "--mgs-d-model", "16",
            "--mgs-d-ff", "64", "--d-model", "32", "--d-ff", "64", "--peak-matmul-n", "128", "--peak-megabytes", "8"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["suite"] for r in out["results"]} == {"mgs"}
    assert main(["bench", "tree", "--tokens", "1,x"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["bench", "mgs", "--mgs-d-ff", "100"]) == 2
    assert main(["bench", "lm", "--lm-preset", "nope"]) == 2
    assert main(["bench", "train", "--repeats", "0"]) == 2
