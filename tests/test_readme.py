"""The README's API tour runs as written."""
import re
from pathlib import Path


def test_readme_tour_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    tour = text.split("## A short tour of the Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", tour, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    assert namespace["pruned"].prune_report.nodes_after < namespace["pruned"].prune_report.nodes_before
    assert namespace["replaced"] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
