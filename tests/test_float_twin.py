"""The lazy float32 twin (mpq.float_twin): the model's own block tensors, upcast only while a block runs,
and measurements bit-identical to a whole float32 copy's. (Every architecture of the coverage
sweep checks the logits too: tests/test_benchmarks.py.)"""

import pytest
import torch

from mpq import sensitivity
from mpq.apply import QuantizedWeightCache
from mpq.float_twin import block_lists, float32_twin, upcasts_while_running
from mpq.formats import get_format
from mpq.models import load_model
from mpq.replay import BlockReplay
from mpq.tasks import calibration_text, make_task
from mpq.trace import trace_model

FORMATS = [get_format(n) for n in ("fp16", "int8", "int4-g32")]


def _storage(module: torch.nn.Module) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()]}


def test_the_twin_holds_the_blocks_once_and_only_the_rest_in_float32(tiny_llama_calibrated):
    loaded, _, _ = tiny_llama_calibrated
    model = loaded.model
    twin = float32_twin(model)
    assert upcasts_while_running(twin) and not upcasts_while_running(float32_twin(model, lazy=False))
    for original, copied in zip(model.model.layers, twin.model.layers):
        assert all(a is b for a, b in zip(original.parameters(), copied.parameters()))  # the same tensors
        assert all(p.dtype == torch.bfloat16 for p in copied.parameters())
    outside = [p for name, p in twin.named_parameters() if not name.startswith("model.layers.")]
    assert outside and all(p.dtype == torch.float32 for p in outside) and twin.dtype == torch.float32
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # the tied table stays one tensor
    own = {ptr: size for ptr, size in _storage(twin).items() if ptr not in _storage(model)}
    whole = sum(p.numel() * 4 for p in model.parameters())
    blocks = sum(p.numel() * 4 for p in model.model.layers.parameters())
    buffers = sum(b.untyped_storage().nbytes() for name, b in twin.named_buffers() if not name.startswith("model.layers."))
    assert sum(own.values()) == whole - blocks + buffers  # of a whole copy, all but the blocks' float32 bytes
    # a float32 model is its own twin
    fp32 = float32_twin(float32_twin(model, lazy=False))
    assert not upcasts_while_running(fp32)


def test_a_block_runs_in_float32_and_gives_its_tensors_back(tiny_llama_calibrated):
    loaded, task, _ = tiny_llama_calibrated
    twin = float32_twin(loaded.model)
    block = twin.model.layers[1]
    seen = []
    block.mlp.register_forward_pre_hook(lambda module, args: seen.append(module.down_proj.weight.dtype))
    with torch.no_grad():
        twin(task.calib_ids[:1, :8])
    assert seen == [torch.float32]
    assert all(a is b for a, b in zip(loaded.model.model.layers[1].parameters(), block.parameters()))

    def fail(module, args):
        raise RuntimeError("stop")
    handle = block.mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="stop"), torch.no_grad():
        twin(task.calib_ids[:1, :8])
    handle.remove()
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())  # put back although the forward raised


def test_measurements_in_the_lazy_twin_equal_the_whole_copy(tiny_llama_calibrated):
    loaded, task, graph = tiny_llama_calibrated
    cache = QuantizedWeightCache(loaded.model)
    tables = {}
    for lazy in (True, False):
        work = sensitivity.measurement_model(loaded.model, lazy)
        tables[lazy] = sensitivity.measure_sensitivity(loaded.model, work, graph.layers, FORMATS, task, "k", {}, cache,
                                                       False).values
    assert tables[True] == tables[False]
    assert sum(v > 0 for per in tables[True].values() for v in per.values()) >= 25


def test_replayed_blocks_are_not_upcast(tiny_llama_calibrated):
    loaded, task, _ = tiny_llama_calibrated
    twin = float32_twin(loaded.model)
    seen: dict[int, list] = {0: [], 1: []}  # the weight dtype each block's forward would see
    for index, block in enumerate(twin.model.layers):
        block.register_forward_pre_hook(lambda module, args, kwargs, i=index: seen[i].append(module.mlp.up_proj.weight.dtype),
                                        with_kwargs=True)
    with BlockReplay([twin.model.layers], lambda: task.reference(twin)).skipping(1):
        seen[0].clear(), seen[1].clear()  # recording ran block 0 for real
        task.reference(twin)
    assert seen[0] and set(seen[0]) == {torch.bfloat16}  # replayed: returned its records, upcast nothing
    assert seen[1] and set(seen[1]) == {torch.float32}
    assert block_lists(twin) == [twin.model.layers]


@pytest.mark.parametrize("measure", [sensitivity.measure_fisher, sensitivity.measure_hessian])
def test_gradient_signals_take_a_whole_copy_and_agree_with_one(tiny_llama_calibrated, measure):
    loaded, task, graph = tiny_llama_calibrated
    cache = QuantizedWeightCache(loaded.model)
    lazy = measure(loaded.model, float32_twin(loaded.model), graph.layers, FORMATS, task, "k", {}, cache, False).values
    whole = measure(loaded.model, float32_twin(loaded.model, lazy=False), graph.layers, FORMATS, task, "k", {}, cache,
                    False).values
    assert lazy == whole and sum(per["int4-g32"] > 0 for per in lazy.values()) >= len(lazy) // 2


def test_an_encoder_decoder_is_calibrated_stack_by_stack_as_in_a_whole_copy():
    """GPTQ/AWQ walk an encoder-decoder's encoder blocks, then its decoder blocks (fed the encoder's
    output and block 0's position bias as the model feeds them), then the head (mpq.blockwise): each
    statistic equals the one a whole float32 copy's single pass gives."""
    from mpq.blockwise import calibrate_blockwise
    from mpq.calib_stats import StatsRecorder
    from mpq.models import decoder_start_of

    loaded = load_model("demo-t5")
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32,
                     decoder_start=decoder_start_of(loaded.model))
    graph = trace_model(loaded.model, task.model_inputs(task.calib_ids[:1]))
    groups = graph.shared_input_groups()
    calibrations = list(calibrate_blockwise(loaded.model, graph.layers, groups, task))
    encoder, decoder = len(loaded.model.encoder.block), len(loaded.model.decoder.block)
    assert [c.name for c in calibrations] == ([f"encoder.block.{i}" for i in range(encoder)]
                                              + [f"decoder.block.{i}" for i in range(decoder)] + ["outside blocks"])
    assert all(c.judge is not None for c in calibrations[:-1])
    whole = float32_twin(loaded.model, lazy=False)
    names = [layer.name for layer in graph.layers if not layer.is_embedding]
    assert sorted(n for c in calibrations for n in c.layers) == sorted(names)
    recorder = StatsRecorder({name: whole.get_submodule(name) for name in names},
                             {name: group[0] for group in groups for name in group})
    with torch.no_grad():
        for batch in task.calibration_inputs():
            whole(**batch)
    expected = recorder.finish()
    for calibration in calibrations:
        assert all(torch.equal(calibration.stats.hessian[n], expected.hessian[n]) for n in calibration.layers)
        assert all(torch.equal(calibration.stats.absmean[n], expected.absmean[n]) for n in calibration.layers)
        assert calibration.stats.rows == expected.rows > 0
