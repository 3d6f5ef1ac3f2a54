"""``dynsparse tasks``: offline evaluation tasks for ``dynsparse eval --tasks`` and ``lm_eval --include_path``.

``dynsparse tasks fetch-bigbench --tasks social_iqa,timedial`` fetches the BIG-bench 1.0.0 sdist once
(never installed), reads the chosen multiple-choice tasks out of it and writes lm-eval task YAMLs over
local JSONL into <cache>/tasks; they are then named bigbench_social_iqa, ... (a subtask TASK/SUB
becomes bigbench_TASK__SUB).
"""
from __future__ import annotations

from pathlib import Path

from ..cli import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("tasks", help="offline QA tasks (BIG-bench) for eval --tasks", description=__doc__)
    sub = p.add_subparsers(dest="tasks_command", metavar="COMMAND")
    f = sub.add_parser("fetch-bigbench", help="BIG-bench multiple-choice tasks -> lm-eval YAMLs in the cache",
                       description=__doc__)
    f.add_argument("--tasks", required=True, help="comma-separated BIG-bench task names (TASK or TASK/SUBTASK)")
    f.add_argument("--cache-dir", help="cache folder (default $DYNSPARSE_CACHE or ~/.cache/dynsparse)")
    f.add_argument("--sdist", help="a local copy of bigbench-1.0.0.tar.gz (default: download it into the cache)")
    f.add_argument("--force", action="store_true", help="rewrite tasks that are already cached")
    f.set_defaults(func=fetch)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def fetch(args) -> int:
    from ..data.tokens import default_cache_dir
    from ..eval import bigbench

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise CLIError(f"--tasks {args.tasks!r} names no task")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    try:
        infos = bigbench.fetch_tasks(names, cache, sdist=args.sdist, force=args.force)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    for info in infos:
        print(f"{info['lm_eval_task']}: {info['scored']} scored + {info['fewshot_pool']} few-shot examples, "
              f"chance {info['chance']:.2%}"
              + (f", majority answer {info['majority']:.2%}" if info.get("majority") is not None else "")
              + (f", {info['dropped']} non-multiple-choice left out" if info["dropped"] else ""))
    print(f"include path: {cache / 'tasks'}")
    return 0
