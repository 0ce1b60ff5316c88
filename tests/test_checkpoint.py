"""Save/load: bit-identical outputs, exact bytes, no pickles, corrupt folders refused, atomic writes."""

import json
import subprocess
import sys

import pytest
import torch

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import MANIFEST, WEIGHTS, save_config
from mpq.errors import MpqError
from mpq.formats import get_format
from mpq.memory import memory_model, resident_bytes
from mpq.models import load_model
from mpq.plan import Plan
from mpq.trace import trace_model

FORMATS = ["fp16", "int8", "int4-g64", "int4-g32-sym"]


def _emit(model_dir, out, plan_of=lambda i: FORMATS[i % len(FORMATS)]):
    loaded = load_model(str(model_dir))
    ids = torch.randint(0, 4000, (2, 24))
    graph = trace_model(loaded.model, {"input_ids": ids[:1, :8], "use_cache": False})
    plan = Plan(formats={l.name: plan_of(i) for i, l in enumerate(graph.layers)}, model=str(model_dir))
    specs = plan.specs()
    memory = memory_model(loaded.model, graph.layers, [get_format(f) for f in FORMATS])
    with applied(loaded.model, specs, QuantizedWeightCache(loaded.model)) as tensors:
        before = loaded.model(input_ids=ids, use_cache=False).logits
        save_config(out, loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    return ids, before, memory.total(plan.formats), loaded


def test_loaded_model_is_bit_identical_and_bytes_match(tiny_llama_dir, tmp_path):
    ids, before, predicted, loaded = _emit(tiny_llama_dir, tmp_path / "cfg")
    model = mpq.load(tmp_path / "cfg")
    after = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(before, after)
    assert abs(resident_bytes(model) - predicted) / predicted < 0.01
    # the original model was restored after emitting
    assert not any(type(m).__name__ == "QuantizedLinear" for m in loaded.model.modules())
    backends = {m.backend for m in model.modules() if type(m).__name__ == "QuantizedLinear"}
    assert backends == {"dense", "cpu"}


def test_loaded_model_generates(tiny_llama_dir, tmp_path):
    _emit(tiny_llama_dir, tmp_path / "cfg")
    model = mpq.load(tmp_path / "cfg")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_reference_backend_agrees_with_cpu_kernels(tiny_llama_dir, tmp_path, monkeypatch):
    ids, before, _, _ = _emit(tiny_llama_dir, tmp_path / "cfg")
    monkeypatch.setenv("MPQ_KERNELS", "reference")
    model = mpq.load(tmp_path / "cfg")
    assert {m.backend for m in model.modules() if type(m).__name__ == "QuantizedLinear"} == {"dense", "reference"}
    ref = model(input_ids=ids, use_cache=False).logits.float()
    assert ((ref - before.float()).norm() / ref.norm()).item() < 2e-2


def test_checkpoint_holds_only_safetensors_and_json(tiny_llama_dir, tmp_path):
    _emit(tiny_llama_dir, tmp_path / "cfg")
    names = {p.name for p in (tmp_path / "cfg").iterdir()}
    assert {WEIGHTS, MANIFEST, "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".pth")) for n in names)
    manifest = json.loads((tmp_path / "cfg" / MANIFEST).read_text())
    assert set(manifest["plan"]["formats"].values()) == set(FORMATS)


def test_flipped_byte_is_refused(tiny_llama_dir, tmp_path):
    _emit(tiny_llama_dir, tmp_path / "cfg")
    path = tmp_path / "cfg" / WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MpqError, match="corrupt or truncated"):
        mpq.load(tmp_path / "cfg")


def test_truncated_weights_are_refused(tiny_llama_dir, tmp_path):
    _emit(tiny_llama_dir, tmp_path / "cfg")
    path = tmp_path / "cfg" / WEIGHTS
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MpqError, match="corrupt or truncated"):
        mpq.load(tmp_path / "cfg")


def test_missing_or_broken_manifest_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(MpqError, match="not an mpq config"):
        mpq.load(tmp_path)
    _emit(tiny_llama_dir, tmp_path / "cfg")
    (tmp_path / "cfg" / MANIFEST).write_text("{not json")
    with pytest.raises(MpqError, match="corrupt"):
        mpq.load(tmp_path / "cfg")


def test_plan_with_unknown_format_is_refused(tiny_llama_dir, tmp_path):
    _emit(tiny_llama_dir, tmp_path / "cfg")
    path = tmp_path / "cfg" / MANIFEST
    manifest = json.loads(path.read_text())
    first = next(iter(manifest["plan"]["formats"]))
    manifest["plan"]["formats"][first] = "int3"
    path.write_text(json.dumps(manifest))
    with pytest.raises(MpqError, match="unknown format"):
        mpq.load(tmp_path / "cfg")


def test_crash_mid_write_leaves_no_folder(tiny_llama_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _emit(tiny_llama_dir, tmp_path / "cfg")
    assert not (tmp_path / "cfg").exists()
    assert list(tmp_path.glob(".cfg*")) == []


@pytest.mark.slow
def test_a_config_loads_and_runs_where_the_compiler_cannot_be_imported(tiny_llama_dir, tmp_path):
    """Serving needs none of the compiler: with optuna unimportable (a GPU image without it, say),
    `import mpq` and `mpq.load` work and the model gives the emitted logits, and `mpq inspect --check` runs."""
    ids, before, _, _ = _emit(tiny_llama_dir, tmp_path / "cfg")
    script = ("import json, sys, torch\n"
              "sys.modules['optuna'] = None  # any import of optuna now fails\n"
              "import mpq\n"
              "model = mpq.load(sys.argv[1])\n"
              "ids = torch.tensor(json.loads(sys.argv[2]))\n"
              "print(json.dumps(model(input_ids=ids, use_cache=False).logits.float().tolist()))\n"
              "assert 'mpq.compile' not in sys.modules and 'mpq.search' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg"), json.dumps(ids.tolist())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = torch.tensor(json.loads(proc.stdout))
    assert ((logits - before.float()).norm() / before.float().norm()).item() < 1e-3
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['optuna'] = None; import mpq; mpq.compile_model"],
                             capture_output=True, text=True, timeout=600)
    assert blocked.returncode != 0 and "optuna" in blocked.stderr  # the compiler is still there, imported on use
    # the CLI too: inspecting a config works, compiling says in one line what is missing
    cli = "import sys; sys.modules['optuna'] = None; from mpq.cli import main; sys.exit(main(sys.argv[1:]))"
    inspect = subprocess.run([sys.executable, "-c", cli, "inspect", str(tmp_path / "cfg"), "--check", "--device", "cpu"],
                             capture_output=True, text=True, timeout=600)
    assert inspect.returncode == 0 and "relative error to the CPU reference" in inspect.stdout, inspect.stderr[-3000:]
    compile_ = subprocess.run([sys.executable, "-c", cli, "compile", "demo", "-o", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=600)
    assert compile_.returncode == 2 and compile_.stderr.strip() == (
        "mpq: error: mpq compile needs optuna, which is not installed: pip install optuna")
    assert not (tmp_path / "out").exists()
