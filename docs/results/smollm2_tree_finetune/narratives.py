"""Usage: python narratives.py OUT.txt
A second held-out corpus that is not Shakespeare: the 1,000 short modern-English narratives of BIG-bench's
abstract_narrative_understanding task (their `input` texts, one per paragraph), read from the bigbench 1.0.0
sdist that `dynsparse tasks fetch-bigbench` caches. No model here is trained or scored on that task."""
import json, sys, tarfile
from dynsparse.data.tokens import default_cache_dir

sdist = default_cache_dir() / "bigbench" / "bigbench-1.0.0.tar.gz"
member = "bigbench-1.0.0/bigbench/benchmark_tasks/abstract_narrative_understanding/4_distractors/task.json"
with tarfile.open(sdist) as tar:
    task = json.load(tar.extractfile(member))
stories = [e["input"].strip() for e in task["examples"]]
with open(sys.argv[1], "w") as f:
    f.write("\n\n".join(stories) + "\n")
print(f"{len(stories)} narratives, {sum(map(len, stories)):,} characters -> {sys.argv[1]}")
