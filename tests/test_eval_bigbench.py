"""BIG-bench tasks offline: task.json -> the BIG-bench prompt, lm-eval reads the written task as BIG-bench
defines it, few-shot answers come from a held-out pool, fetch/eval bad input is one line. A tiny archive
in the sdist's layout stands in for the 358 MB download."""
import hashlib
import io
import json
import tarfile

import datasets
import pytest

from dynsparse.cli import main
from dynsparse.eval import bigbench

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def mc_task(n=30):
    """n questions 'what is K plus 1'; example 0 has two gold answers; example 1 is generative (dropped)."""
    examples = [{"input": f"What is {k} plus 1?", "target_scores": {str(k + 1): 1, str(k + 2): 0, str(k): 0}}
                for k in range(n)]
    examples[0]["target_scores"] = {"1": 1, "one": 1, "7": 0, "9": 0}
    examples[1] = {"input": "Say hi.", "target": "hi"}
    return {"name": "fixture_mc", "task_prefix": "Arithmetic.\n", "examples": examples}


def make_sdist(path, tasks: dict):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in tasks.items():
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            info = tarfile.TarInfo(f"{ROOT}/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist(tmp_path):
    return make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {
        "fixture_mc": mc_task(),
        "listed_off": {"append_choices_to_input": "false", "example_input_prefix": "\nInput: ",
                       "example_output_prefix": "\nOutput:", "examples": [
                           {"input": f"x{k}", "target_scores": {"yes": k % 2, "no": 1 - k % 2}} for k in range(10)]},
        "parent": {"name": "parent", "subtasks": ["child"]},
        "parent/child": {"examples": [{"input": f"q{k}", "target_scores": {"a": 1, "b": 0}} for k in range(6)]},
        "generative": {"examples": [{"input": "x", "target": "y"}]},
        "broken": b'{"examples": [{"input": "x", "target_scores": ',
        "tied": {"examples": [{"input": "x", "target_scores": {"a": 0, "b": 0}}]},
    })


def docs_of(cache, name, split="test"):
    path = cache / "tasks" / f"{name}.{'test' if split == 'test' else 'fewshot'}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_documents_follow_the_bigbench_format():
    docs, info = bigbench.task_documents(json.dumps(mc_task()), "fixture_mc")
    assert info["examples"] == 29 and info["dropped"] == 1 and info["task_prefix"] == "Arithmetic.\n"
    assert len({d["context"] for d in docs}) == 29
    for d in docs:
        head, listed = d["context"].split("\n  choice: ", 1)
        k = int(head.split("What is ")[1].split(" plus")[0])
        assert head == f"\nQ: What is {k} plus 1?"
        assert d["context"].endswith("\nA: ")
        # Every choice is listed once, in the prompt only (the scored continuations are the bare texts).
        assert sorted(listed[: -len("\nA: ")].split("\n  choice: ")) == sorted(d["choices"])
        gold = {d["choices"][i] for i in d["gold"]}
        assert gold == ({"1", "one"} if k == 0 else {str(k + 1)}) and d["label"] == d["gold"][0]
    two = next(d for d in docs if len(d["gold"]) == 2)
    assert info["chance"] == pytest.approx((28 / 3 + 2 / 4) / 29)
    assert len(two["choices"]) == 4
    # The listed order is shuffled (not always the sorted or the scored order).
    orders = {tuple(d["context"][: -len("\nA: ")].split("\n  choice: ")[1:]) == tuple(sorted(d["choices"]))
              for d in docs}
    assert orders == {True, False}


def test_choices_not_listed_and_custom_prefixes():
    raw = json.dumps({"append_choices_to_input": "false", "example_input_prefix": "\nIn: ",
                      "example_output_prefix": "\nOut:", "examples": [{"input": "x", "target_scores": {"p": 0, "q": 1}}]})
    (doc,), info = bigbench.task_documents(raw, "t")
    assert doc == {"context": "\nIn: x\nOut:", "choices": ["p", "q"], "gold": [1], "label": 1}
    assert info["chance"] == 0.5


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
    (json.dumps({"subtasks": ["a"]}), "has no examples"),
    (json.dumps({"examples": [{"target_scores": {"a": 1, "b": 0}}]}), "no 'input' text"),
    (json.dumps({"examples": [{"input": "x", "target_scores": {"a": "1", "b": 0}}]}), "map each choice"),
    (json.dumps({"examples": [{"input": "x", "target_scores": {"a": 1, "b": 1}}]}), "no choice scored above"),
    (json.dumps({"examples": [{"input": "x", "target": "y"}]}), "no multiple-choice examples"),
    (json.dumps({"append_choices_to_input": "maybe", "examples": []}), "has no examples"),
    (json.dumps({"append_choices_to_input": "maybe", "examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}}]}),
     "append_choices_to_input must be true or false"),
    (json.dumps({"example_input_prefix": 3, "examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}}]}),
     "example_input_prefix must be a string"),
])
def test_corrupt_task_files_are_one_line(raw, message):
    with pytest.raises(ValueError, match=message) as e:
        bigbench.task_documents(raw, "t")
    assert "\n" not in str(e.value) and str(e.value).startswith("t: ")


def test_fetch_writes_tasks_lm_eval_reads_as_written(sdist, tmp_path, monkeypatch, capsys):
    from lm_eval.tasks import TaskManager

    cache = tmp_path / "cache"
    assert main(["tasks", "fetch-bigbench", "--tasks", "fixture_mc,parent/child,bigbench_listed_off",
                 "--sdist", str(sdist), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "bigbench_fixture_mc: 24 scored + 5 few-shot examples" in out and "1 non-multiple-choice left out" in out
    assert "bigbench_parent__child: 5 scored + 1 few-shot" in out
    scored, pool = docs_of(cache, "bigbench_fixture_mc"), docs_of(cache, "bigbench_fixture_mc", "fewshot")
    assert not {d["context"] for d in scored} & {d["context"] for d in pool}
    info = json.loads((cache / "tasks" / "bigbench_fixture_mc.info.json").read_text())
    assert info["chance"] == pytest.approx(sum(len(d["gold"]) / len(d["choices"]) for d in scored) / 24)
    sets = {frozenset(d["choices"]) for d in scored}
    if len(sets) == 1:
        best = max(sum(c in [d["choices"][k] for k in d["gold"]] for d in scored) for c in sets.pop()) / 24
        assert info["majority"] == pytest.approx(best) and f"majority answer {best:.2%}" in out
    else:
        assert info["majority"] is None and "majority answer" not in out.split("bigbench_fixture_mc:")[1].split("\n")[0]


    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    name = "bigbench_fixture_mc"
    task = TaskManager(include_path=str(cache / "tasks"), include_defaults=False).load(name)["tasks"][name]
    docs = list(task.test_docs())
    assert len(docs) == 24
    for doc, w in zip(docs, scored):
        assert task.doc_to_text(doc) == w["context"]
        assert task.doc_to_choice(doc) == w["choices"]
        assert task.doc_to_target(doc) == w["gold"]
    assert set(task._metric_fn_list) == set(bigbench.METRICS)
    # The task prefix comes once, first (BIG-bench's task_prefix); alone at 0 shots.
    assert task.fewshot_context(docs[0], num_fewshot=0) == "Arithmetic.\n" + scored[0]["context"]
    # Two shots: held-out questions, each answered with its first gold choice, then the question scored.
    ctx = task.fewshot_context(docs[0], num_fewshot=2)
    assert ctx.startswith("Arithmetic.\n\nQ: ") and ctx.endswith("\n\n" + scored[0]["context"])
    shots = ctx[len("Arithmetic.\n"): -len(scored[0]["context"])].split("\n\n")[:-1]
    by_context = {d["context"]: d for d in pool}
    assert len(shots) == 2
    for shot in shots:
        q, answer = shot.rsplit("\nA: ", 1)
        d = by_context[q + "\nA: "]
        assert answer == d["choices"][d["label"]]

    # Cached tasks are served without the archive.
    sdist.unlink()
    assert main(["tasks", "fetch-bigbench", "--tasks", "fixture_mc", "--cache-dir", str(cache)]) == 0


@pytest.mark.parametrize("tasks, message", [
    ("fixture_mx", "--tasks fixture_mx: no such task in BIG-bench 1.0.0 (close: fixture_mc)"),
    ("fixture_mc,broken", "broken: task.json is not valid JSON"),
    ("parent", "parent: task.json has no examples (a task made of subtasks is named TASK/SUBTASK)"),
    ("generative", "generative: no multiple-choice examples"),
    ("tied", "tied: example 0 has no choice scored above the others"),
    ("../etc", "a BIG-bench task name is letters"),
    (" , ", "names no task"),
])
def test_fetch_bad_input_is_one_line_and_writes_nothing(sdist, tmp_path, capsys, tasks, message):
    cache = tmp_path / "cache"
    assert main(["tasks", "fetch-bigbench", "--tasks", tasks, "--sdist", str(sdist), "--cache-dir", str(cache)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("reading ")]  # status line
    assert len(err) == 1 and message in err[0]
    assert not list((cache / "tasks").glob("*.yaml")) if (cache / "tasks").exists() else True


def test_damaged_archive_and_wrong_file_are_refused(tmp_path, capsys):
    bad = tmp_path / "bigbench-1.0.0.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    assert main(["tasks", "fetch-bigbench", "--tasks", "x", "--sdist", str(bad), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "cannot read the archive" in capsys.readouterr().err
    # A file in the cache that is not the pinned sdist is never used (nor deleted).
    (tmp_path / "c" / "bigbench").mkdir(parents=True)
    (tmp_path / "c" / "bigbench" / bigbench.SDIST).write_bytes(b"partial")
    assert main(["tasks", "fetch-bigbench", "--tasks", "x", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "does not match the sha256" in capsys.readouterr().err
    assert (tmp_path / "c" / "bigbench" / bigbench.SDIST).read_bytes() == b"partial"


class FakeIndex:
    """urlopen stand-in: the PEP 691 page of the package and its file."""

    def __init__(self, payload: bytes, listed_sha: str):
        self.payload, self.listed_sha, self.urls = payload, listed_sha, []

    def __call__(self, req, timeout=None):
        url = req if isinstance(req, str) else req.full_url
        self.urls.append(url)
        if url.endswith("/bigbench/"):
            body = json.dumps({"files": [{"filename": bigbench.SDIST, "url": "https://files.example/x/" + bigbench.SDIST,
                                          "hashes": {"sha256": self.listed_sha}}]}).encode()
        else:
            body = self.payload
        return io.BytesIO(body)


def test_download_is_verified_against_the_pinned_hash(sdist, tmp_path, monkeypatch):
    payload = sdist.read_bytes()
    sha = hashlib.sha256(payload).hexdigest()
    fake = FakeIndex(payload, sha)
    monkeypatch.setattr(bigbench.urllib.request, "urlopen", fake)
    folder = tmp_path / "dl"
    with pytest.raises(ValueError, match="another sha256 than the pinned one"):  # index and pin disagree
        bigbench.fetch_sdist(folder, "https://index.example/simple")
    fake.listed_sha = bigbench.SDIST_SHA256  # index agrees with the pin, the bytes do not
    with pytest.raises(ValueError, match="does not match its pinned sha256"):
        bigbench.fetch_sdist(folder, "https://index.example/simple")
    assert list(folder.iterdir()) == []  # nothing half-written is left
    monkeypatch.setattr(bigbench, "SDIST_SHA256", sha)
    fake.listed_sha = sha
    path = bigbench.fetch_sdist(folder, "https://index.example/simple")
    assert path.read_bytes() == payload and fake.urls[-2] == "https://index.example/simple/bigbench/"
    n = len(fake.urls)
    assert bigbench.fetch_sdist(folder) == path and len(fake.urls) == n  # cached: no request


def test_eval_task_names_checked_before_the_model_loads(sdist, tmp_path, capsys):
    from hf_tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "m")
    cache = tmp_path / "cache"
    assert main(["tasks", "fetch-bigbench", "--tasks", "fixture_mc", "--sdist", str(sdist), "--cache-dir", str(cache)]) == 0
    capsys.readouterr()
    for tasks, message in [
        ("bigbench_nope", "--tasks bigbench_nope: neither a cached BIG-bench task (fetch it: dynsparse tasks "
                          "fetch-bigbench --tasks nope) nor an lm-eval task"),
        ("hellaswag_typo", "--tasks hellaswag_typo: neither a cached BIG-bench task nor an lm-eval task; close: hellaswag"),
    ]:
        assert main(["eval", str(tmp_path / "m"), "--tasks", tasks, "--cache-dir", str(cache)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    (cache / "tasks" / "bigbench_fixture_mc.test.jsonl").write_text('{"context": "x"')
    assert main(["eval", str(tmp_path / "m"), "--tasks", "bigbench_fixture_mc", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cached BIG-bench task bigbench_fixture_mc" in err and "is damaged" in err and "--force" in err


def test_eval_runs_a_bigbench_task_and_lm_eval_passes_through(sdist, tmp_path, monkeypatch, capsys):
    from dynsparse.train import TrainConfig, train

    corpus = "".join(f"What is {k} plus 1? {k + 1}\n" for k in range(400))
    (tmp_path / "c.txt").write_text(corpus)
    cfg = TrainConfig.build("tiny", d_model=32, n_layer=1, n_head=2, vocab_size=300, seq_len=16, batch_size=2,
                            max_steps=2, data=str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "tok"))
    train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    cache = tmp_path / "cache"
    assert main(["tasks", "fetch-bigbench", "--tasks", "fixture_mc", "--sdist", str(sdist), "--cache-dir", str(cache)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "final"), "--no-perplexity", "--tasks", "bigbench_fixture_mc",
                 "--num-fewshot", "2", "--limit", "6", "--cache-dir", str(cache), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"]["bigbench_fixture_mc"]
    assert res["sample_len"] == 6
    for metric in bigbench.METRICS:
        value = res[f"{metric},none"]
        assert 0 <= value <= 1 and 6 * value == pytest.approx(round(6 * value))  # a share of the 6 questions
        assert f"{metric}_stderr,none" in res


def test_majority_baseline_is_the_best_constant_answer():
    docs = [{"choices": ["True", "False", "Neither"], "gold": [g]} for g in (0, 0, 0, 1, 2)]
    assert bigbench.majority_baseline(docs) == pytest.approx(0.6)
    # the same set of choices in another order still counts as one fixed list
    docs.append({"choices": ["False", "True", "Neither"], "gold": [1]})
    assert bigbench.majority_baseline(docs) == pytest.approx(4 / 6)
    assert bigbench.majority_baseline([{"choices": ["a", "b"], "gold": [0]}, {"choices": ["c", "d"], "gold": [1]}]) is None
