"""mpq.blockwise's walk: each block is called as the model's own loop calls it, and a model whose
blocks pass something besides their outputs is fed whole from the first block the walk gets wrong."""

from __future__ import annotations

import torch
from torch import nn

from mpq.blockwise import calibrate_blockwise
from mpq.calib_stats import InputStats, StatsRecorder
from mpq.float_twin import float32_twin
from mpq.models import CAUSAL_LM
from mpq.tasks import calibration_text, make_task
from mpq.trace import LayerInfo, trace_model


def _one_pass_stats(model: nn.Module, names: list[str], groups: list[list[str]], batches: list[dict]) -> InputStats:
    """Every layer's statistics from one pass of a whole float32 copy (what the walk must equal)."""
    whole = float32_twin(model, lazy=False)
    recorder = StatsRecorder({name: whole.get_submodule(name) for name in names},
                             {name: group[0] for group in groups for name in group})
    with torch.no_grad():
        for batch in batches:
            whole(**batch)
    return recorder.finish()


def _assert_equal_stats(calibrations, expected: InputStats) -> None:
    for calibration in calibrations:
        for name in calibration.layers:
            assert torch.equal(calibration.stats.hessian[name], expected.hessian[name]), name
            assert torch.equal(calibration.stats.absmean[name], expected.absmean[name]), name


def test_blocks_given_attention_masks_of_their_own_are_walked_as_the_model_runs_them(demo_tokenizer):
    """Gemma2 alternates sliding-window and global attention, the model's loop handing each block
    its own mask. Walked, the global block gets the global mask: every statistic is a whole pass's.
    (Fed block 0's inputs again, as mpq did before the walk, block 1's o_proj statistics were 89%
    off with a window of 4 tokens in 32.)"""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                          max_position_embeddings=512)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    model = Gemma2ForCausalLM(config).eval().to(torch.bfloat16)
    task = make_task(CAUSAL_LM, demo_tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    groups = graph.shared_input_groups()
    calibrations = list(calibrate_blockwise(model, graph.layers, groups, task))
    assert [c.name for c in calibrations] == ["model.layers.0", "model.layers.1", "outside blocks"]
    names = [layer.name for layer in graph.layers if not layer.is_embedding]
    assert sorted(n for c in calibrations for n in c.layers) == sorted(names)
    _assert_equal_stats(calibrations, _one_pass_stats(model, names, groups, task.calibration_inputs()))


class _BlockReadingBlockZero(nn.Module):
    """Adds what block 0 left in the forward's shared dict (as models that share one layer's keys
    and values with later layers do): replayed, block 0 leaves nothing there."""

    def __init__(self, width: int, first: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.first = first

    def forward(self, hidden: torch.Tensor, shared: dict) -> torch.Tensor:
        out = torch.tanh(self.linear(hidden))
        if self.first:
            shared["bias"] = out.mean(dim=1, keepdim=True)
        return out + shared.get("bias", 0)


class _SharedSlotModel(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(_BlockReadingBlockZero(width, i == 0) for i in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, shared = self.embed(input_ids), {}
        for layer in self.layers:
            hidden = layer(hidden, shared)
        return self.head(hidden)


class _Batches:
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def calibration_inputs(self) -> list[dict]:
        return [dict(batch) for batch in self.batches]


def _linear_info(name: str, module: nn.Linear, order: int) -> LayerInfo:
    return LayerInfo(name, "Linear", name, None, module.in_features, module.out_features, module.weight.numel(), order,
                     True)


def _three_blocks(cls: type) -> tuple[nn.Module, _Batches, list[str], list[LayerInfo]]:
    """A 3-block toy model of `cls`, 3 calibration batches, and its linears as layers."""
    torch.manual_seed(0)
    model = cls().eval()
    generator = torch.Generator().manual_seed(1)
    task = _Batches([{"input_ids": torch.randint(0, 50, (2, 12), generator=generator)} for _ in range(3)])
    names = [f"layers.{i}.linear" for i in range(3)] + ["head"]
    return model, task, names, [_linear_info(name, model.get_submodule(name), order) for order, name in enumerate(names)]


def test_a_channel_between_blocks_past_their_outputs_has_the_rest_fed_the_whole_model():
    """Blocks 1 and 2 read what block 0 wrote beside its output: walked with block 0 replayed, block
    1's output is not the model's, so from block 1 on the layers are fed the whole model (one pass,
    no judge). Every statistic is still a whole pass's, and the model is left as it was."""
    model, task, names, layers = _three_blocks(_SharedSlotModel)
    blocks = list(model.layers)
    before = model(**task.batches[0])

    calibrations = list(calibrate_blockwise(model, layers, [], task))

    assert [(c.name, c.layers) for c in calibrations] == [("layers.0", ["layers.0.linear"]),
                                                          ("model", ["layers.1.linear", "layers.2.linear", "head"])]
    assert calibrations[0].judge is not None and calibrations[1].judge is None
    _assert_equal_stats(calibrations, _one_pass_stats(model, names, [], task.calibration_inputs()))
    assert list(model.layers) == blocks and torch.equal(model(**task.batches[0]), before)


class _WithIdleTower(_SharedSlotModel):
    """Plain blocks, and a second list the forward never runs (as a vision tower is, on text)."""

    def __init__(self) -> None:
        super().__init__(depth=2)
        for layer in self.layers:
            layer.first = False  # no shared slot: the walk goes through
        self.tower = nn.ModuleList(_BlockReadingBlockZero(16, False) for _ in range(2))


def test_a_list_of_blocks_the_calibration_never_runs_gets_isotropic_statistics():
    torch.manual_seed(0)
    model = _WithIdleTower().eval()
    generator = torch.Generator().manual_seed(1)
    task = _Batches([{"input_ids": torch.randint(0, 50, (2, 12), generator=generator)} for _ in range(2)])
    names = ["layers.0.linear", "layers.1.linear", "tower.0.linear", "tower.1.linear", "head"]
    layers = [_linear_info(name, model.get_submodule(name), order) for order, name in enumerate(names)]
    calibrations = list(calibrate_blockwise(model, layers, [], task))
    assert [c.name for c in calibrations] == ["tower (never run)", "layers.0", "layers.1", "outside blocks"]
    tower = calibrations[0]
    assert tower.stats.unreached == ["tower.0.linear", "tower.1.linear"] and tower.judge is None
    assert all(torch.equal(tower.stats.hessian[name], torch.eye(16)) for name in tower.layers)
    ran = [name for name in names if not name.startswith("tower.")]
    _assert_equal_stats(calibrations[1:], _one_pass_stats(model, ran, [], task.calibration_inputs()))


class _HeadReadingBlockZero(_SharedSlotModel):
    """Plain blocks, and a head that reads block 0's output beside the last one's (as models that
    pool several layers' states do): replayed, block 0 returns the last block's output."""

    def __init__(self) -> None:
        super().__init__(depth=3)
        for layer in self.layers:
            layer.first = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, states = self.embed(input_ids), []
        for layer in self.layers:
            hidden = layer(hidden, {})
            states.append(hidden)
        return self.head(states[0] + states[-1])


def test_a_head_reading_an_earlier_blocks_output_is_fed_the_whole_model():
    """The blocks walk as usual; the head's first input row under replay is not the whole pass's,
    so the head is fed the whole model instead, and its statistics are a whole pass's."""
    model, task, names, layers = _three_blocks(_HeadReadingBlockZero)
    before = model(**task.batches[0])
    calibrations = list(calibrate_blockwise(model, layers, [], task))
    assert [c.name for c in calibrations] == ["layers.0", "layers.1", "layers.2", "model"]
    _assert_equal_stats(calibrations, _one_pass_stats(model, names, [], task.calibration_inputs()))
    assert torch.equal(model(**task.batches[0]), before)
