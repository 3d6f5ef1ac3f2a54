"""Usage: python screen.py bigbench_a,bigbench_b,... [N]
Screen BIG-bench tasks on the LAST N (default 16) scored docs of each (disjoint from the first-N docs that
`--limit` reports), 0-shot, dense SmolLM2-135M."""
import json, sys, time
from pathlib import Path
import lm_eval
from dynsparse.data.tokens import default_cache_dir
from dynsparse.eval.harness import task_manager
from dynsparse.lm.pretrained import resolve_model
tasks = sys.argv[1].split(",")
last = int(sys.argv[2]) if len(sys.argv) > 2 else 16
cache = default_cache_dir() / "tasks"  # after dynsparse tasks fetch-bigbench --tasks ...
model = resolve_model("smollm2-135m")
samples = {}
for t in tasks:
    n = json.loads((cache / f"{t}.info.json").read_text())["scored"]
    samples[t] = list(range(n - last, n))
t0 = time.time()
out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=tasks,
    batch_size=8, device="cpu", task_manager=task_manager([cache]), samples=samples, log_samples=False)
res = {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in out["results"].items()}
print(json.dumps({"seconds": time.time() - t0, "results": res}, indent=1))
