"""The offline lm-eval task shakespeare_speaker: balanced (no text-blind strategy beats chance), the gold
choice is the real speaker, and lm-eval reads the choices and target exactly as written."""
import json
from collections import Counter

import datasets
import pytest

from dynsparse.data import shakespeare
from dynsparse.eval.harness import SPEAKER_METRICS, SPEAKER_TASK, build_speaker_task


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return build_speaker_task(tmp_path_factory.mktemp("task"))


def load_docs(d):
    return [json.loads(line) for line in (d / f"{SPEAKER_TASK}.jsonl").read_text().splitlines()]


def name_of(choice):
    return choice.split(":\n", 1)[0]


def test_balanced_gold_positions_and_speakers(task_dir):
    docs = load_docs(task_dir)
    assert len(docs) == 96
    # Every position is the answer equally often: "always pick choice k" scores exactly 1/4.
    assert Counter(d["label"] for d in docs) == {k: 24 for k in range(4)}
    for play in shakespeare.TEST_PLAYS:
        play_docs = [d for d in docs if d["play"] == play]
        names = {frozenset(map(name_of, d["choices"])) for d in play_docs}
        assert len(names) == 1 and len(next(iter(names))) == 4  # the same 4 candidates throughout a play
        # Every candidate is the answer equally often: "always pick NAME" scores exactly 1/4.
        assert set(Counter(name_of(d["choices"][d["label"]]) for d in play_docs).values()) == {12}
        # The candidates are not always listed in the same order.
        assert len({tuple(map(name_of, d["choices"])) for d in play_docs}) > 4


def test_gold_choice_is_the_real_speaker(task_dir):
    files = shakespeare.play_files()
    speeches = {p: shakespeare.speeches(files[p].read_text(encoding="utf-8")) for p in shakespeare.TEST_PLAYS}
    for doc in load_docs(task_dir):
        gold = doc["choices"][doc["label"]]
        speech = gold.split(":\n", 1)[1]
        assert all(c.endswith(":\n" + speech) for c in doc["choices"])  # only the speaker differs
        sp = speeches[doc["play"]]
        hits = [i for i in range(1, len(sp)) if sp[i][1][:160] == speech  # build_speaker_task's max_chars
                and doc["context"] == f"{sp[i - 1][0]}:\n{sp[i - 1][1][:160]}\n\n"]
        assert hits and {sp[i][0] for i in hits} == {name_of(gold)}


def test_lm_eval_reads_the_task_as_written(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    d = build_speaker_task(tmp_path / "task", per_play=8)
    written = load_docs(d)
    task = TaskManager(include_path=str(d), include_defaults=False).load(SPEAKER_TASK)["tasks"][SPEAKER_TASK]
    docs = list(task.test_docs())
    assert len(docs) == len(written) == 16
    for doc, w in zip(docs, written):
        assert task.doc_to_text(doc) == w["context"]
        assert task.doc_to_choice(doc) == w["choices"]  # survives the Jinja render + literal_eval round trip
        assert task.doc_to_target(doc) == w["label"] and isinstance(task.doc_to_target(doc), int)
    assert set(task._metric_fn_list) == set(SPEAKER_METRICS)
