"""The lm-evaluation-harness bridge, and a small offline multiple-choice task built from Shakespeare.

``run_harness`` calls ``lm_eval.simple_evaluate`` with the ``hf`` backend on a saved model directory
(our LM loads through ``AutoModelForCausalLM`` once ``dynsparse.lm`` is imported). Named tasks
(hellaswag, piqa, arc_easy, ...) need their datasets, hence a network connection; tasks defined by a
local YAML over a local JSONL file work offline, like the ``shakespeare_speaker`` task written here:
"which speaker says this line", from the held-out test plays, scored by the log-likelihood of
"NAME:\\n<speech>" after the preceding speech (the corpus's own format).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from ..data import shakespeare

SPEAKER_TASK = "shakespeare_speaker"
SPEAKER_METRICS = ("acc", "acc_norm", "acc_mutual_info")


def build_speaker_task(out_dir: Path, n_choices: int = 4, per_play: int = 48, seed: int = 0,
                       max_chars: int = 160) -> Path:
    """Write ``shakespeare_speaker.jsonl`` + ``.yaml`` into out_dir; returns the directory (an lm-eval
    include path). Choices are the play's ``n_choices`` most frequent speakers; only speeches by one of
    them are asked about.

    The questions are balanced so that no strategy blind to the text beats chance (1/n_choices): each
    candidate speaker is the answer equally often (per_play // n_choices speeches each; otherwise
    "always the protagonist" scores ~55 %), and the gold position cycles through all n_choices slots
    with the other names shuffled around it (otherwise the choice order, by frequency, gives the
    answer's position away). Because every choice holds the same speech, plain ``acc`` mostly
    compares the names' own likelihoods (names unseen in training are spelled out in many BPE
    pieces); ``acc_mutual_info`` subtracts each choice's unconditional log-likelihood and so asks how
    much the preceding speech favours each speaker."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = shakespeare.play_files()
    docs = []
    for play in shakespeare.TEST_PLAYS:
        sp = shakespeare.speeches(files[play].read_text(encoding="utf-8"))
        top = [name for name, _ in Counter(name for name, _ in sp).most_common(n_choices)]
        by_speaker = {name: [i for i in range(1, len(sp)) if sp[i][0] == name and len(sp[i][1]) >= 40]
                      for name in top}
        per_speaker = min([per_play // n_choices] + [len(v) for v in by_speaker.values()])
        asked = sorted(i for name in top for i in rng.sample(by_speaker[name], per_speaker))
        gold_slots = [k % n_choices for k in range(len(asked))]
        rng.shuffle(gold_slots)
        for i, slot in zip(asked, gold_slots):
            prev_name, prev = sp[i - 1]
            name, speech = sp[i]
            others = [c for c in top if c != name]
            rng.shuffle(others)
            order = others[:slot] + [name] + others[slot:]
            docs.append({"play": play, "context": f"{prev_name}:\n{prev[:max_chars]}\n\n",
                         "choices": [f"{c}:\n{speech[:max_chars]}" for c in order], "label": slot})
    data = out_dir / f"{SPEAKER_TASK}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    yaml_text = (
        f"task: {SPEAKER_TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in SPEAKER_METRICS)
        + "metadata:\n"
        "  version: 2.0\n"
    )
    (out_dir / f"{SPEAKER_TASK}.yaml").write_text(yaml_text)
    return out_dir


def task_manager(include_path=None, tasks: list[str] | None = None):
    """An lm-eval TaskManager over its own tasks plus the local folder(s) ``include_path`` (one path or
    a list); every name in ``tasks`` must be one it knows (checked here, one line, before any model loads)."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    paths = [str(p) for p in paths if p]
    manager = TaskManager(include_path=paths or None)
    known = set(manager.all_tasks)
    for name in tasks or []:
        if name in known:
            continue
        import difflib

        near = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f"; close: {', '.join(near)}" if near else ""
        fetch = (f" (fetch it: dynsparse tasks fetch-bigbench --tasks {name[len('bigbench_'):]})"
                 if name.startswith("bigbench_") else "")
        raise ValueError(f"--tasks {name}: neither a cached BIG-bench task{fetch} nor an lm-eval task{hint}")
    return manager


def run_harness(model_dir: str | Path, tasks: list[str], include_path=None,
                num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
                device: str = "cpu", trust_remote_code: bool = False, manager=None) -> dict:
    """{task: {metric: value}} from lm-evaluation-harness for a saved HF model directory (the folder's own
    code runs only with ``trust_remote_code``; dynsparse's classes are registered in this process).
    ``include_path``: a folder of local task YAMLs, or a list of them."""
    import lm_eval

    import dynsparse.lm  # noqa: F401  registers our model with AutoModelForCausalLM

    manager = manager or task_manager(include_path, tasks)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={Path(model_dir).resolve()},dtype=float32,trust_remote_code={trust_remote_code}",
        tasks=tasks,
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, task_manager=manager,
        log_samples=False,
    )
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}
