"""Shared fixtures: tiny models built from config objects (random weights), written to tmp folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run through the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The CPU's float32-tile thresholds as the dispatch tests expect them, on any CI machine; the probe
# that measures them (kernels/cpu_thresholds.py) has tests of its own.
os.environ.setdefault("MPQ_CPU_TILES", "8:64,4:128")

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: each gets its share of
# torch's threads, and so do the scripts it runs in subprocesses, or two workers' thread pools
# fight over the same cores (oversubscribed OpenMP threads spin and wait on each other).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    from mpq.kernels.triton_tuning import usable_cores

    _THREADS = max(1, usable_cores() // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def pytest_collection_modifyitems(items: list) -> None:
    """The slow tests first: a worker that draws one last waits alone for it (the demo's compile
    takes minutes on 2 cores). The README's `--dist load --maxschedchunk 1` then hands each test to
    the next free worker, so the short ones fill in behind them. (Under `--dist worksteal` each
    worker starts on a contiguous half of this order, all the slow tests in one, and the other
    steals from the end of its queue: the demo's compile was stolen and started 25 minutes in, and
    the suite took 2042 s instead of about 1500 on 2 cores.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def tiny_llama(vocab_size: int = 4096, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2)).eval()


def tiny_gpt_oss():
    """Transposed expert weights with biases, gate and up interleaved, a clamped swiglu of its own."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = GptOssForCausalLM(config).eval()
    for name, param in model.named_parameters():
        if name.endswith("_bias"):  # initialised to zero: a bias the routing dropped would go unseen
            param.data.normal_(0, 0.5)
    return model


def tiny_llama4(top_k: int = 2):
    """Llama 4's mixture: its experts get every token once per expert, scaled by the router's
    sigmoid score (0 where not picked), as one [E x tokens, H] input (mpq.experts.ScoredExperts)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_local_experts=4, num_experts_per_tok=top_k, pad_token_id=0, bos_token_id=0,
                              eos_token_id=0, layer_types=["chunked_attention", "full_attention"])
    return Llama4ForCausalLM(config).eval()


@pytest.fixture
def benchmark_script():
    """A script of benchmarks/ imported as a module by name (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Sensitivity caches go to a per-test folder, never to the user's home."""
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "mpq-cache"))


@pytest.fixture
def demo_tokenizer():
    from transformers import AutoTokenizer

    from mpq.models import DEMO_DIR

    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture
def tiny_llama_dir(tmp_path, demo_tokenizer):
    """A 2-block Llama with the demo tokenizer, saved in bf16 like the demo."""
    model = tiny_llama(len(demo_tokenizer)).to(torch.bfloat16)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def untied_llama_dir(tmp_path, demo_tokenizer):
    """The tiny Llama with its own output head, so its input table is a plan layer (and one layer
    lies outside the blocks)."""
    model = tiny_llama(len(demo_tokenizer), tie=False).to(torch.bfloat16)
    path = tmp_path / "untied-llama"
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_calibrated(tiny_llama_dir):
    """The tiny Llama loaded, a task of 4 calibration windows of 32 tokens, and its traced graph."""
    from mpq.models import load_model
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    loaded = load_model(str(tiny_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    return loaded, task, graph


def trace_tiny(loaded, embeddings: bool = True):
    """The graph of a tiny test model, traced on 8 random token ids."""
    from mpq.trace import trace_model

    return trace_model(loaded.model, {"input_ids": torch.randint(0, 4000, (1, 8)), "use_cache": False}, embeddings)
