"""The command line: errors are one clear line with a non-zero exit; compile writes everything."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

import mpq
from mpq.cli import main
from mpq.memory import format_size, resident_bytes
from mpq.models import load_model
from mpq.search import open_storage


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpq.cli", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpq: error: "), proc.stderr
    return lines[0]


def test_missing_model_folder(tmp_path):
    line = one_line_error(run_cli("compile", str(tmp_path / "nope"), "-o", str(tmp_path / "out")))
    assert "does not exist" in line and "demo" in line
    assert not (tmp_path / "out").exists()


def test_a_hub_id_offline_and_not_cached_says_so(tmp_path):
    """Not "check the id": the id may be right, the hub was out of reach (run_cli sets HF_HUB_OFFLINE;
    without it, no network gives the same line after the hub's retries, and names HF_HUB_OFFLINE)."""
    line = one_line_error(run_cli("compile", "mpq-tests/no-such-model", "-o", str(tmp_path / "out")))
    assert "HF_HUB_OFFLINE is set and the model is not in the local cache" in line and "demo" in line
    assert not (tmp_path / "out").exists()


def test_the_hubs_log_records_come_out_once():
    """huggingface_hub has a handler of its own and passed its records on to the one mpq's CLI sets up:
    each retry of an unreachable hub was printed twice."""
    code = ("import logging; from transformers import AutoConfig; from mpq.cli import main; main(['heatmap', '/nonexistent']); "
            "logging.getLogger('huggingface_hub.utils._http').warning('retrying in 1s')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stderr.count("retrying in 1s") == 1, proc.stderr


def test_folder_without_config(tmp_path):
    line = one_line_error(run_cli("compile", str(tmp_path), "-o", str(tmp_path / "out")))
    assert "no config.json" in line


def _copy_of(folder, tmp_path):
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _compile_error(model, tmp_path, capsys) -> str:
    code = main(["compile", str(model), "-o", str(tmp_path / "out"), "-q", "--samples", "4", "--seq-len", "32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("mpq: error: "), err
    assert not (tmp_path / "out" / "configs").exists()
    return err[0]


def test_a_config_mpq_compiled_is_not_taken_as_a_model(tiny_llama_dir, tmp_path, capsys):
    """Its qweight/scales are no weights transformers knows: loaded as a model, every layer would
    be random (transformers only warns)."""
    folder = _copy_of(tiny_llama_dir, tmp_path)
    (folder / "mpq.json").write_text("{}")
    assert "is a config that mpq compiled (it has mpq.json): load it with mpq.load" in _compile_error(folder, tmp_path, capsys)


def test_a_checkpoint_missing_a_weight_is_refused_not_filled_with_random_values(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = _copy_of(tiny_llama_dir, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    line = _compile_error(folder, tmp_path, capsys)
    assert "1 weights of its LlamaForCausalLM are missing from its checkpoint" in line
    assert "first: model.layers.1.mlp.up_proj.weight" in line


def test_an_already_quantised_model_is_refused(tiny_llama_dir, tmp_path, capsys):
    folder = _copy_of(tiny_llama_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    assert "is already quantised (gptq): mpq quantises from the unquantised weights" in _compile_error(folder, tmp_path, capsys)


def test_an_encoder_decoder_model_without_a_decoder_start_token_is_refused(tmp_path, demo_tokenizer, capsys):
    """Its task feeds the decoder from that token: guessing one would measure a decoder on inputs
    it was never trained on."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(demo_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                        num_heads=4, decoder_start_token_id=None, pad_token_id=0)).save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    line = _compile_error(folder, tmp_path, capsys)
    assert "T5ForConditionalGeneration has no decoder_start_token_id in its config or generation config" in line
    assert not (tmp_path / "out").exists()


def test_malformed_budget(tiny_llama_dir, tmp_path):
    line = one_line_error(run_cli("compile", str(tiny_llama_dir), "--max-mem", "lots", "-o", str(tmp_path / "out")))
    assert "cannot read size" in line


def test_unknown_format(tiny_llama_dir, tmp_path):
    line = one_line_error(run_cli("compile", str(tiny_llama_dir), "--formats", "int3", "-o", str(tmp_path / "out")))
    assert "unknown format" in line


def test_impossible_budget_names_the_smallest_size(tiny_llama_dir, tmp_path, capsys):
    code = main(["compile", str(tiny_llama_dir), "--max-mem", "1KB", "-o", str(tmp_path / "out"), "-q",
                 "--samples", "4", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "below the smallest possible model" in err and "bytes" in err
    assert "of it is kept as stored, largest: model.layers.*." in err  # the norms: what no format shrinks
    assert not (tmp_path / "out" / "configs").exists()


def test_too_little_calibration_text(tiny_llama_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x\n")
    code = main(["compile", str(tiny_llama_dir), "--calib", str(calib), "-o", str(tmp_path / "out"), "-q"])
    assert code == 2 and "give more text or lower --samples" in capsys.readouterr().err


def test_keep_that_is_no_regular_expression_or_matches_no_layer(tiny_llama_dir, tmp_path, capsys):
    line = one_line_error(run_cli("compile", str(tiny_llama_dir), "--keep", "layers.(0", "-o", str(tmp_path / "out")))
    assert "--keep 'layers.(0' is not a regular expression" in line
    code = main(["compile", str(tiny_llama_dir), "--keep", "vision_tower", "-o", str(tmp_path / "out"), "-q",
                 "--samples", "4", "--seq-len", "32"])
    assert code == 2 and "matches no quantisable layer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_keep_leaves_the_matching_layers_as_stored(tiny_llama_dir, tmp_path):
    """--keep: the layers it matches are in no plan, and stay as the model has them in every config
    (the head with its tied table); the card says why, and the bytes are as predicted."""
    out = tmp_path / "out"
    assert main(["compile", str(tiny_llama_dir), "-o", str(out), "-q", "--samples", "4", "--seq-len", "32",
                 "--trials", "20", "--max-configs", "2", "--refine", "0", "--no-latency",
                 "--keep", r"lm_head|layers\.0\.self_attn\.[qk]_proj"]) == 0
    kept = ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    layers = [layer["name"] for layer in json.loads((out / "layers.json").read_text())["layers"]]
    assert not set(kept) & set(layers) and "model.layers.0.self_attn.v_proj" in layers
    model = load_model(str(tiny_llama_dir)).model  # a config's kept layers hold the model's own weights
    for row in json.loads((out / "summary.json").read_text())["configs"]:
        folder = out / "configs" / row["name"]
        manifest = json.loads((folder / "mpq.json").read_text())
        assert not set(kept) & set(manifest["plan"]["formats"])
        excluded = manifest["card"]["excluded_layers"]
        assert all(excluded[name] == r"kept as stored (--keep lm_head|layers\.0\.self_attn\.[qk]_proj)" for name in kept)
        assert "kept as stored with it" in excluded["model.embed_tokens"]
        loaded = mpq.load(folder)
        assert resident_bytes(loaded) == manifest["card"]["bytes"]["predicted"]
        for name in kept:
            assert type(loaded.get_submodule(name)) is torch.nn.Linear
            assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
        assert "| lm_head | kept | - | kept as stored" in (folder / "card.md").read_text()


def test_unknown_sensitivity_signal(tiny_llama_dir, tmp_path):
    line = one_line_error(run_cli("compile", str(tiny_llama_dir), "--sensitivity", "vibes", "-o", str(tmp_path / "out")))
    assert "--sensitivity 'vibes' is not one of kl, local, fisher" in line


def test_inspect_of_a_non_config(tmp_path):
    line = one_line_error(run_cli("inspect", str(tmp_path)))
    assert "not an mpq config" in line


@pytest.mark.parametrize("device,says", [("gpu", "not a device torch knows"), ("mps", "mpq runs on cpu or cuda"),
                                         ("cuda", "no CUDA GPU")])
def test_a_device_this_machine_lacks(tmp_path, device, says):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    line = one_line_error(run_cli("inspect", str(tmp_path), "--check", "--device", device))
    assert says in line and f"--device {device}" in line


@pytest.mark.slow
def test_compile_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from mpq.tasks import CausalLMTask

    out = tmp_path / "out"
    # No latency profile: on a shared machine its timings move the searched and emitted sets from run
    # to run (test_latency.py and test_demo.py compile with it), and this test compares runs.
    args = ["compile", str(tiny_llama_dir), "-o", str(out), "-q", "--samples", "4", "--seq-len", "32",
            "--trials", "80", "--max-configs", "6", "--group-size", "32", "--no-latency"]
    first = tmp_path / "probe"
    held_references = []  # the reference outputs a compile keeps: the sensitivities and every divergence after share one
    reference = CausalLMTask.reference
    with monkeypatch.context() as patch:
        patch.setattr(CausalLMTask, "reference", lambda self, model, held=False: (
            held_references.append(held) if held else None, reference(self, model, held))[1])
        assert main([*args[:1], args[1], "-o", str(first), *args[4:]]) == 0
    assert held_references == [True]
    smallest = json.loads((first / "summary.json").read_text())["smallest"]
    largest = json.loads((first / "summary.json").read_text())["baseline"]["bytes"]
    budget = (smallest + largest) // 2
    assert main([*args, "--max-mem", str(budget), "--max-quality-drop", "0.5"]) == 0
    for name in ["report.md", "heatmap.png", "pareto.png", "sensitivity.json", "sensitivity.md", "summary.json", "layers.json"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["never_ran"] == []  # the reference pass ran every layer (hooked in the lazy float32 twin)
    configs = sorted((out / "configs").iterdir())
    # a front of several configs was measured; on a random tiny model their held-out losses differ
    # by less than the noise, and those a smaller config matches within noise are not emitted
    assert len(configs) == len(summary["configs"]) >= 1 and len(configs) + summary["within_noise"] >= 2
    for row in summary["configs"]:
        assert row["bytes"] <= budget
    # acceptance (--max-quality-drop 0.5): the smallest config that passes is the one recommended
    base = summary["baseline"]["metrics"]["ppl"]
    for row in summary["configs"]:
        assert row["accepted"] == (row["metrics"]["ppl"] / base <= 1.5)
    passing = [row for row in summary["configs"] if row["accepted"]]
    assert summary["recommended"] == min(passing, key=lambda r: (r["bytes"], r["metrics"]["ppl"]))["name"]
    assert f"Recommended: {summary['recommended']}" in (out / "report.md").read_text()
    # each stage's peak memory, the whole compile's the largest; the report shows them
    peaks = summary["memory"]["stages"]
    assert list(peaks) == list(summary["seconds"]) and all(peak > 100e6 for peak in peaks.values())  # torch alone
    assert summary["memory"]["peak_rss_bytes"] == max(peaks.values())
    assert f"| peak RSS | {format_size(peaks['load'])} |" in (out / "report.md").read_text()
    anonymous = summary["memory"]["anonymous_stages"]
    assert all(0 < anonymous[stage] <= peaks[stage] for stage in peaks)
    assert summary["memory"]["peak_anonymous_bytes"] == max(anonymous.values())
    # the tensors the compile kept went to files under OUT, and their folder is gone
    assert summary["memory"]["spilled_bytes"] > 0 and not list(out.glob(".mpq-spill-*"))
    assert f"| peak anonymous | {format_size(anonymous['load'])} |" in (out / "report.md").read_text()
    kept = summary["kept_as_stored"]
    assert kept and sum(k["bytes"] for k in kept) == summary["fixed_bytes"]  # a 2-block model has few groups
    assert f"kept as stored in every config (no plan layer holds them): {format_size(summary['fixed_bytes'])}" in (out / "report.md").read_text()
    ids = torch.randint(0, 4000, (1, 16))
    for folder in configs:
        model = mpq.load(folder)
        manifest = json.loads((folder / "mpq.json").read_text())
        predicted = manifest["card"]["bytes"]["predicted"]
        assert abs(resident_bytes(model) - predicted) / predicted < 0.01
        assert torch.isfinite(model(input_ids=ids, use_cache=False).logits.float()).all()
        card = (folder / "card.md").read_text()  # the readable quantisation card
        assert all(f"| {fmt} |" in card for fmt in set(manifest["plan"]["formats"].values()))
        assert "granularity" in card and "calibration data" in card and manifest["card"]["hardware"] in card
        assert all(layer in card for layer in manifest["plan"]["formats"])
    # the sensitivity table is reused the second time round
    key = json.loads((out / "sensitivity.json").read_text())["key"]
    assert main([*args, "--max-mem", str(budget), "-o", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert json.loads((tmp_path / "again" / "sensitivity.json").read_text())["key"] == key
    # the Optuna study was kept in OUT and a rerun resumes it: no new trials, same result
    assert (out / "study.journal").stat().st_size > 0
    assert main([*args, "--max-mem", str(budget), "--max-quality-drop", "0.5"]) == 0
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["search"]["trials"] == summary["search"]["trials"] == 80
    assert [c["name"] for c in rerun["configs"]] == [c["name"] for c in summary["configs"]]
    # the measured study too: it resumed with its 24 trials done, and measured nothing again
    assert rerun["refinement"]["rows"] == summary["refinement"]["rows"] and len(summary["refinement"]["rows"]) == 24
    measured = optuna.load_study(study_name=summary["search"]["study"] + "-measured", storage=open_storage(str(out / "study.journal")))
    assert len(measured.trials) == 24 and summary["refinement"]["best"]["bytes"] <= budget
    probe = json.loads((first / "summary.json").read_text())
    assert not probe["sensitivity_reused"] and summary["sensitivity_reused"] and again["sensitivity_reused"]
    assert [c["bytes"] for c in again["configs"]] == [c["bytes"] for c in summary["configs"]]  # same seed, same set
    capsys.readouterr()
    assert main(["inspect", str(configs[0])]) == 0
    text = capsys.readouterr().out
    assert "granularity" in text and "model.layers.0.self_attn.q_proj" in text


@pytest.mark.slow
def test_compile_with_the_local_signal(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_llama_dir), "-o", str(out), "-q", "--samples", "4", "--seq-len", "32",
                 "--trials", "40", "--max-configs", "3", "--group-size", "32", "--sensitivity", "local"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "local" and summary["task_metric"] == "kl"
    assert summary["additivity"]["median_relative_error"] is None  # different units: rank correlation only
    assert "predicted local" in (out / "report.md").read_text() and summary["configs"]


def test_dtype_casts_the_model_on_load_and_what_is_not_quantised_stays_in_it(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_llama_dir), "-o", str(out), "-q", "--samples", "4", "--seq-len", "32",
                 "--trials", "20", "--max-configs", "2", "--group-size", "32", "--sensitivity", "local",
                 "--refine", "4", "--no-latency", "--dtype", "fp32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stored = mpq.models.load_model(str(tiny_llama_dir)).model  # bf16, as saved
    layers = {row["name"] for row in json.loads((out / "layers.json").read_text())["layers"]}
    in_layers = {id(stored.get_submodule(name).weight) for name in layers}  # a tied table is its head's
    rest = sum(p.numel() for p in stored.parameters() if id(p) not in in_layers)
    buffers = sum(b.numel() * b.element_size() for b in stored.float().buffers())  # rotary frequencies
    assert summary["fixed_bytes"] == 4 * rest + buffers  # float32: twice what the stored bf16 rest takes
    config = sorted((out / "configs").iterdir())[0]
    model = mpq.load(config)
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.float32
    assert json.loads((config / "mpq.json").read_text())["card"]["model_dtype"] == "float32"


def test_the_compile_summary_labels_timed_and_predicted_steps():
    """compile's printed line for a config gives its step as timed beside the unquantised model and as
    predicted, each named: the prediction alone (1.00x) read as a measurement where the timed step was 0.86x."""
    from mpq.cli import _step_times

    row = {"metrics": {"ppl": 31.8, "latency_s": 0.010213, "speedup": 0.861},
           "latency_predicted_s": 0.011369, "speedup_predicted": 0.998}
    assert _step_times(row) == "  step 10.213 ms timed (0.86x), 11.369 ms predicted (1.00x)"
    assert _step_times({"metrics": {"ppl": 31.8}}) == ""  # --no-latency
