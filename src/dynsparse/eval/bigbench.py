"""BIG-bench multiple-choice tasks as offline lm-evaluation-harness tasks.

BIG-bench's task files ship inside the ``bigbench`` 1.0.0 sdist on PyPI. Installing that package pulls
TensorFlow, and ``pip download --no-deps`` of it fails on current pip (the sdist's metadata declares a
direct-URL dependency, which pip refuses for PyPI files after downloading them), so the archive alone
is fetched: its URL comes from the package index's JSON API (PEP 691) and the file must match the
sha256 pinned here. The chosen tasks' ``task.json`` files are read out of the archive in one streaming
pass, and each becomes JSONL documents plus an lm-eval task YAML under ``<cache>/tasks``, the include
path ``dynsparse eval`` (and ``lm_eval --include_path``) reads.

The prompt follows BIG-bench's JSON-task conventions: ``task_prefix``, ``example_input_prefix``
(default "\\nQ: ") + input, the choices after ``choice_prefix`` (default "\\n  choice: ") unless
``append_choices_to_input`` is false, then ``example_output_prefix`` (default "\\nA: "); each choice is
scored as the continuation. Every choice with the top score is gold (BIG-bench's multiple-choice grade
credits any of them), so ``acc`` asks whether the model's pick is one of them; chance is therefore
mean(#gold / #choices), written beside the task. Documents are shuffled with a fixed seed so that
``--limit N`` scores a random sample rather than the file's first (often sorted) items, and a seeded
share is held out as the few-shot pool, so shots never repeat a scored question.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

from ..atomic import atomic_write_text

PACKAGE, VERSION = "bigbench", "1.0.0"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
INDEX_URL = "https://pypi.org/simple"
TASKS_ROOT = "bigbench/benchmark_tasks/"  # inside the archive's top folder
PREFIX = "bigbench_"  # lm-eval task names: bigbench_<task>, bigbench_<task>__<subtask>
METRICS = ("acc", "acc_norm")
MAX_POOL = 25  # few-shot pool: min(MAX_POOL, examples // 5), the rest is scored
SEED = 1234
_NAME = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_]+)?$")


# ---------------------------------------------------------------- names
def task_name(name: str) -> str:
    """The BIG-bench task path ('social_iqa', 'abstract_narrative_understanding/4_distractors') for a
    user-given name, which may also be the lm-eval name ('bigbench_social_iqa', '..._understanding__4_distractors')."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string, got {type(name).__name__}")
    bare = name.strip()
    if bare.startswith(PREFIX):
        bare = bare[len(PREFIX):].replace("__", "/", 1)
    if not _NAME.match(bare):
        raise ValueError(f"--tasks {name!r}: a BIG-bench task name is letters, digits and _ "
                         "(a subtask as TASK/SUBTASK)")
    return bare


def lm_eval_name(task: str) -> str:
    return PREFIX + task.replace("/", "__")


# ---------------------------------------------------------------- the archive
def fetch_sdist(folder: str | Path, index_url: str | None = None) -> Path:
    """The verified sdist in ``folder``, downloaded first when absent. A file there that does not
    match the pinned sha256 is refused (it is not deleted: the user may want to look at it)."""
    folder = Path(folder)
    path = folder / SDIST
    if path.exists():
        if _sha256(path) != SDIST_SHA256:
            raise ValueError(f"{path} does not match the sha256 of {SDIST} (damaged or partial): delete it and fetch again")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    url = _sdist_url(index_url or os.environ.get("PIP_INDEX_URL") or INDEX_URL)
    print(f"downloading {SDIST} (358 MB) from {url.split('/packages/')[0]} ...", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{SDIST}.")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != SDIST_SHA256:
            raise ValueError(f"the downloaded {SDIST} does not match its pinned sha256: not used")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _sdist_url(index_url: str) -> str:
    page = f"{index_url.rstrip('/')}/{PACKAGE}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            files = json.load(resp)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise OSError(f"cannot read the package index {page} ({e}); without a network, pass --sdist "
                      f"with a copy of {SDIST}") from None
    for f in files:
        if f.get("filename") == SDIST:
            if f.get("hashes", {}).get("sha256") not in (None, SDIST_SHA256):
                raise ValueError(f"the index lists {SDIST} with another sha256 than the pinned one: not used")
            return f["url"]
    raise OSError(f"the package index {page} does not list {SDIST}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_task_files(sdist: str | Path, tasks: list[str]) -> tuple[dict[str, bytes], list[str]]:
    """({task: task.json bytes} for the requested tasks, every task path in the archive), in one pass."""
    wanted = set(tasks)
    found: dict[str, bytes] = {}
    names: list[str] = []
    try:
        with tarfile.open(sdist, mode="r|gz") as tar:
            for member in tar:
                parts = member.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith(TASKS_ROOT) or not member.name.endswith("/task.json"):
                    continue
                task = parts[1][len(TASKS_ROOT):-len("/task.json")]
                if not member.isfile() or not _NAME.match(task):
                    continue
                names.append(task)
                if task in wanted:
                    found[task] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{sdist}: cannot read the archive ({e}): delete it and fetch again") from None
    return found, sorted(names)


# ---------------------------------------------------------------- task.json -> documents
def _flag(value, key: str, task: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{task}: task.json {key} must be true or false, got {value!r}")


def _text(data: dict, key: str, default: str, task: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{task}: task.json {key} must be a string, got {type(value).__name__}")
    return value


def task_documents(raw: bytes | str, task: str, seed: int = SEED) -> tuple[list[dict], dict]:
    """(documents, info) from one task.json: each document has ``context`` (the prompt), ``choices``,
    ``gold`` (indices of the top-scored choices) and ``label`` (the first of them, a few-shot answer).
    The task's ``task_prefix`` goes into info (lm-eval's ``description``: once before all shots, as in BIG-bench).
    Examples without ``target_scores`` or with fewer than two choices are left out and counted."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{task}: task.json is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{task}: task.json must hold a JSON object, got {type(data).__name__}")
    examples = data.get("examples")
    if examples is None or examples == []:
        raise ValueError(f"{task}: task.json has no examples (a task made of subtasks is named TASK/SUBTASK)")
    if not isinstance(examples, list):
        raise ValueError(f"{task}: task.json examples must be a list, got {type(examples).__name__}")
    task_prefix = _text(data, "task_prefix", "", task)
    q = _text(data, "example_input_prefix", "\nQ: ", task)
    a = _text(data, "example_output_prefix", "\nA: ", task)
    c = _text(data, "choice_prefix", "\n  choice: ", task)
    listed = _flag(data.get("append_choices_to_input", True), "append_choices_to_input", task)
    rng = random.Random(seed)
    docs, seen, dropped = [], set(), 0
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise ValueError(f"{task}: example {i} has no 'input' text")
        scores = ex.get("target_scores")
        if scores is None or (isinstance(scores, dict) and len(scores) < 2):
            dropped += 1
            continue
        if not isinstance(scores, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            raise ValueError(f"{task}: example {i} target_scores must map each choice's text to a number")
        key = json.dumps(ex, sort_keys=True)
        if key in seen:  # BIG-bench drops repeated examples too
            continue
        seen.add(key)
        choices = list(scores)
        top = max(scores.values())
        if top <= min(scores.values()):
            raise ValueError(f"{task}: example {i} has no choice scored above the others")
        gold = [k for k, ch in enumerate(choices) if scores[ch] == top]
        text = ex["input"]
        if listed:
            shown = sorted(choices)
            rng.shuffle(shown)
            text += c + c.join(shown)
        docs.append({"context": q + text + a, "choices": choices, "gold": gold, "label": gold[0]})
    if not docs:
        raise ValueError(f"{task}: no multiple-choice examples (target_scores with two or more choices)")
    rng.shuffle(docs)
    info = {"task": task, "task_prefix": task_prefix, "examples": len(docs), "dropped": dropped,
            "chance": sum(len(d["gold"]) / len(d["choices"]) for d in docs) / len(docs)}
    return docs, info


def majority_baseline(docs: list[dict]) -> float | None:
    """Accuracy of always giving the most often correct answer, where every document offers the same set
    of choices (True/False/Neither, a fixed list of intents); None where the choices differ per document.
    A skewed label mix puts this above ``chance``, and a model that always answers one way scores it."""
    sets = {frozenset(d["choices"]) for d in docs}
    if len(sets) != 1:
        return None
    wins: dict[str, int] = {}
    for d in docs:
        for k in d["gold"]:
            wins[d["choices"][k]] = wins.get(d["choices"][k], 0) + 1
    return max(wins.values()) / len(docs)


# ---------------------------------------------------------------- the lm-eval task
def write_task(docs: list[dict], info: dict, tasks_dir: str | Path) -> str:
    """JSONL (scored + few-shot pool), YAML and an info file for one task in ``tasks_dir``; returns the
    lm-eval task name. The info's ``chance`` and ``majority`` (``majority_baseline``) are computed over the
    scored documents alone."""
    tasks_dir = Path(tasks_dir)
    name = lm_eval_name(info["task"])
    pool_n = min(MAX_POOL, len(docs) // 5)
    pool, scored = docs[:pool_n], docs[pool_n:]
    files = {"test": tasks_dir / f"{name}.test.jsonl", "train": tasks_dir / f"{name}.fewshot.jsonl"}
    for split, rows in (("test", scored), ("train", pool)):
        atomic_write_text(files[split], "".join(json.dumps(d) + "\n" for d in rows))
    splits = {"test": files["test"]} | ({"train": files["train"]} if pool else {})
    info = {**info, "lm_eval_task": name, "scored": len(scored), "fewshot_pool": len(pool),
            "chance": sum(len(d["gold"]) / len(d["choices"]) for d in scored) / len(scored),
            "majority": majority_baseline(scored), "source": f"{SDIST} sha256:{SDIST_SHA256}"}
    atomic_write_text(tasks_dir / f"{name}.info.json", json.dumps(info, indent=1) + "\n")
    yaml_text = (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        + "".join(f"    {s}: {json.dumps(str(p.resolve()))}\n" for s, p in splits.items())
        + "test_split: test\n"
        + ("fewshot_split: train\n" if pool else "")
        + (f"description: {json.dumps(info['task_prefix'])}\n" if info.get("task_prefix") else "")
        + "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        'fewshot_delimiter: "\\n\\n"\n'
        "fewshot_config:\n"
        "  sampler: default\n"
        "  doc_to_target: label\n"
        "metric_list:\n"
        + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in METRICS)
        + "metadata:\n"
        "  version: 1.0\n"
    )
    atomic_write_text(tasks_dir / f"{name}.yaml", yaml_text)
    return name


def task_info(name: str, tasks_dir: str | Path) -> dict | None:
    """The info file of a cached BIG-bench task (by either name), or None when it is not cached;
    a cached task whose data files are gone or unreadable is an error."""
    task = task_name(name)
    tasks_dir = Path(tasks_dir)
    lm_name = lm_eval_name(task)
    info_path, yaml_path = tasks_dir / f"{lm_name}.info.json", tasks_dir / f"{lm_name}.yaml"
    if not yaml_path.is_file() or not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        test = tasks_dir / f"{lm_name}.test.jsonl"
        n = 0
        with test.open(encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if not (isinstance(doc, dict) and isinstance(doc.get("context"), str)
                        and isinstance(doc.get("choices"), list) and isinstance(doc.get("gold"), list)):
                    raise ValueError("a document lacks context/choices/gold")
                n += 1
        if n != info["scored"]:
            raise ValueError(f"{n} documents, the info file says {info['scored']}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cached BIG-bench task {lm_name} in {tasks_dir} is damaged ({e}): "
                         f"fetch it again with `dynsparse tasks fetch-bigbench --tasks {task} --force`") from None
    return info


def fetch_tasks(names: list[str], cache_dir: str | Path, sdist: str | Path | None = None,
                force: bool = False, index_url: str | None = None) -> list[dict]:
    """Make the named BIG-bench tasks available to lm-eval under ``<cache_dir>/tasks``; returns their
    info. Tasks already cached are kept unless ``force``; all requested tasks are checked before any
    is written (an unknown or corrupt one writes nothing)."""
    if not names:
        raise ValueError("--tasks names no BIG-bench task")
    cache_dir = Path(cache_dir)
    tasks = list(dict.fromkeys(task_name(n) for n in names))
    tasks_dir = cache_dir / "tasks"
    if not force:
        cached = {t: task_info(t, tasks_dir) for t in tasks}
        if all(cached.values()):
            return [cached[t] for t in tasks]
    index_file = cache_dir / PACKAGE / "index.json"
    if index_file.is_file():
        _check_known(tasks, json.loads(index_file.read_text()))
    path = Path(sdist) if sdist else fetch_sdist(cache_dir / PACKAGE, index_url)
    if sdist and not path.is_file():
        raise FileNotFoundError(f"--sdist {sdist}: no such file")
    print(f"reading {len(tasks)} task(s) from {path.name} ...", file=sys.stderr, flush=True)
    raw, known = read_task_files(path, tasks)
    if not known:
        raise ValueError(f"{path}: no BIG-bench task files inside (is it the {SDIST} sdist?)")
    if not sdist:
        atomic_write_text(index_file, json.dumps(known) + "\n")
    _check_known(tasks, known)
    built = [task_documents(raw[t], t) for t in tasks]
    return [task_info(write_task(docs, info, tasks_dir), tasks_dir) for docs, info in built]


def _check_known(tasks: list[str], known: list[str]) -> None:
    import difflib

    for t in tasks:
        if t not in known:
            near = difflib.get_close_matches(t, known, n=3)
            hint = f" (close: {', '.join(near)})" if near else ""
            raise ValueError(f"--tasks {t}: no such task in BIG-bench {VERSION}{hint}")
