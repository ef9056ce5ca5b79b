"""Names the job shares are defined once: the dataset's root folder, the number of rotations, the cache key's
length, a stage's completion file; and the helpers every module reuses (cache key, safe relative path, losses)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "job").rglob("*.py"), *(REPO / "models").rglob("*.py")])
CONSTANTS = ("ROOT_NAME", "NUM_ROTATIONS", "CACHE_KEY_CHARS", "DONE")
FUNCTIONS = ("cache_key", "safe_relpath", "sparse_ce", "correct", "weighted", "dataset_fn", "mixed_precision",
             "use_xla", "dtype_policy", "make_deterministic", "loop_config")
SPELLED_ONCE = ("done.json", "tiny-imagenet-200")


def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8")) for path in SOURCES}


def test_shared_constants_and_helpers_are_defined_in_one_module():
    assigned: Counter = Counter()
    defined: Counter = Counter()
    for tree in _trees().values():
        for node in tree.body:  # module level
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                assigned.update(t.id for t in targets if isinstance(t, ast.Name) and t.id in CONSTANTS)
            elif isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS:
                defined[node.name] += 1
    assert {name: assigned[name] for name in CONSTANTS} == dict.fromkeys(CONSTANTS, 1)
    assert {name: defined[name] for name in FUNCTIONS} == dict.fromkeys(FUNCTIONS, 1)


def test_file_names_are_spelled_once_in_code():
    spelled: dict[str, list[str]] = {text: [] for text in SPELLED_ONCE}
    for path, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in spelled:
                spelled[node.value].append(str(path.relative_to(REPO)))
    assert spelled == {"done.json": ["job/layout.py"], "tiny-imagenet-200": ["job/data.py"]}
