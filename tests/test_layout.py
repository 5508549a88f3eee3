"""The reader's path holds: imports point down (support/ and csrc/ never import the story above them), and
`import swarr` loads the model, not the grader or the eval machinery."""
import ast
import subprocess
import sys

from conftest import ROOT

STORY = {"swarr", "train_sft", "train_rl", "demo", "bench"}


def imported_modules(path):
    """Every module name an `import` or `from ... import` in the file names, at any depth (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_support_and_csrc_import_nothing_above_them():
    files = sorted((ROOT / "support").glob("*.py")) + sorted((ROOT / "csrc").glob("*.py"))
    assert len(files) >= 10
    for f in files:
        if f.name == "gpu_check.py":  # csrc/gpu_check.py is a script that drives the whole model on a GPU
            continue
        up = imported_modules(f) & STORY
        assert not up, f"{f.relative_to(ROOT)} imports {sorted(up)}"
    for f in sorted((ROOT / "csrc").glob("*.py")):  # the kernels take only the project's error type from support/
        if f.name != "gpu_check.py":
            src = f.read_text()
            assert "support" not in imported_modules(f) or src.count("from support") == src.count(
                "from support.safe_io import SwarrError"), f


def test_scripts_import_no_other_script():
    for name in ("swarr", "train_sft", "train_rl", "bench"):
        up = imported_modules(ROOT / f"{name}.py") & (STORY - {"swarr"})
        assert not up, f"{name}.py imports {sorted(up)}"


def test_import_swarr_does_not_load_the_grader():
    code = ("import sys, swarr; print(sorted(m for m in sys.modules if m.startswith('support')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = ast.literal_eval(out.stdout.strip())
    assert "support.grader" not in loaded and "support.evaluate" not in loaded, loaded
    assert "support.checkpoint" in loaded  # validation is one call into the support folder


def span(path, qualname):
    """First and last line of the function or class `qualname` ('KVCache.write') in the file at `path`."""
    body = ast.parse(path.read_text()).body
    for part in qualname.split("."):
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        body = node.body
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return first, node.end_lineno


def readme_rows():
    """(file, qualname, 'Lfirst-last') of each row of README's "how the code tells it" table."""
    import re
    text = (ROOT / "README.md").read_text()
    return re.findall(r"\| `([\w/]+\.py):([\w.]+)` \| (L[\w-]+) \|", text)


def test_readme_line_spans_match_the_code():
    rows = readme_rows()
    assert len(rows) >= 12
    for file, name, lines in rows:
        first, last = span(ROOT / file, name)
        assert lines == f"L{first}-{last}", (file, name, lines, f"L{first}-{last}")
