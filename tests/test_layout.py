"""The repository's folders ship as mpq.kernels and mpq.search, and Python started in the
repository root (as `python -m pytest` and `python -m mpq.cli` are) still gets Hugging Face's
`kernels` package, which transformers and bitsandbytes import, not the `kernels/` folder."""

import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

import mpq.kernels
import mpq.search

ROOT = Path(__file__).resolve().parent.parent


def test_the_folders_ship_under_mpq():
    assert Path(mpq.kernels.__file__).parent == ROOT / "kernels"
    assert Path(mpq.search.__file__).parent == ROOT / "search"
    assert callable(mpq.kernels.triton_supports) and callable(mpq.search.search_plans)


def _in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(find_spec("kernels") is None, reason="Hugging Face's kernels package is not installed")
def test_kernels_imported_from_the_repository_root_is_hugging_faces():
    proc = _in_root("import sys, kernels; assert sys.path[0] == ''; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not Path(proc.stdout.strip()).is_relative_to(ROOT), proc.stdout
    # transformers' model code imports it (through its hub_kernels integration)
    proc = _in_root("import mpq.kernels, kernels; from transformers import LlamaForCausalLM, LlamaConfig; "
                    "LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
                    "num_attention_heads=2)); print(mpq.kernels.__file__, kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = proc.stdout.split()
    assert Path(ours) == ROOT / "kernels" / "__init__.py" and not Path(theirs).is_relative_to(ROOT)


def test_kernels_without_hugging_faces_package_is_not_found_from_the_root(tmp_path):
    """Where no `kernels` package is installed, the folder does not pose as one: transformers'
    probe before 5.25 (find_spec finds the folder, no metadata, so import_module and a look for
    __version__ / __file__) reads it as absent, and so does every look after it."""
    code = ("import sys, importlib, importlib.util, importlib.machinery as m; real = m.PathFinder.find_spec; "
            "m.PathFinder.find_spec = classmethod(lambda cls, name, path=None, target=None: None if name == 'kernels' "
            "and path is not None else real(name, path, target)); "
            "assert importlib.util.find_spec('kernels') is not None; "  # the folder, from the root
            "probed = importlib.import_module('kernels'); "
            "assert getattr(probed, '__version__', 'N/A') == 'N/A' and getattr(probed, '__file__', None) is None; "
            "assert importlib.util.find_spec('kernels') is None; "
            "import kernels")
    proc = _in_root(code)
    assert proc.returncode != 0 and "ModuleNotFoundError: import of kernels halted" in proc.stderr, proc.stderr[-2000:]
