"""Block replay: the per-layer passes skip the blocks before the measured layer, bit-identically."""

import dataclasses

import torch
from torch import nn

import mpq.sensitivity as sensitivity
from mpq.apply import QuantizedWeightCache
from mpq.formats import get_format
from mpq.models import load_model
from mpq.replay import BlockReplay, block_of, check, record_pass
from mpq.tasks import calibration_text, make_task
from mpq.trace import trace_model


class Block(nn.Module):
    def __init__(self, width: int, log: list, channel: list | None) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.log, self.channel = log, channel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        self.log.append(self)
        scale = 1.0
        if self.channel is not None:  # what the blocks before left, not in the input
            scale += len(self.channel)
            self.channel.append(1)
        return (x + torch.tanh(self.linear(x)) * scale,)  # a tuple, as some transformers blocks return


class Stack(nn.Module):
    """Blocks in a ModuleList; with `side`, each block also reads what the ones before it left in a
    side channel that every forward clears (as a KV cache shared across layers would be read)."""

    def __init__(self, depth: int = 5, width: int = 8, side: bool = False) -> None:
        super().__init__()
        self.log: list = []
        self.channel: list = []
        self.layers = nn.ModuleList(Block(width, self.log, self.channel if side else None) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.channel.clear()
        for block in self.layers:
            (x,) = block(x)
        return x


def passes(model: Stack, batches: list[torch.Tensor]):
    return lambda: [model(x) for x in batches]


def test_a_replayed_pass_equals_the_full_one_at_every_depth_and_skips_the_blocks_before():
    torch.manual_seed(0)
    model = Stack()
    batches = [torch.randn(3, 8) for _ in range(4)]
    run = passes(model, batches)
    full = run()
    replay = BlockReplay([model.layers], run)
    assert check(replay, full)
    for depth in (3, 1, 4, 0):  # out of order too: records are made again where needed
        with replay.skipping(depth):
            model.log.clear()  # after the records for this depth were made
            got = run()
        assert all(torch.equal(a, b) for a, b in zip(got, full))
        assert model.log.count(model.layers[0]) == (4 if depth == 0 else 0)
        assert len(model.log) == 4 * (5 - depth)  # the blocks from `depth` on ran, once per batch
    # changing a block at the replay's depth changes the output as a full pass would
    with torch.no_grad():
        model.layers[2].linear.weight.mul_(0.5)
    changed = run()
    with replay.skipping(2):
        assert all(torch.equal(a, b) for a, b in zip(run(), changed))
    assert not all(torch.equal(a, b) for a, b in zip(changed, full))
    assert "forward" not in vars(model.layers[0])  # the class's forward is back


def test_a_record_pass_stops_each_batch_at_the_block_it_records():
    """With a `record` pass, recording block d-1 runs no block after it (nor anything after the
    blocks); the replayed passes still equal full ones, and a side channel is still caught."""
    torch.manual_seed(0)
    model = Stack()
    batches = [torch.randn(3, 8) for _ in range(4)]
    run = passes(model, batches)
    full = run()
    replay = BlockReplay([model.layers], run, record_pass(model, batches))
    assert check(replay, full)
    for depth in (2, 4, 1):
        model.log.clear()
        with replay.skipping(depth):
            recorded = list(model.log)
            got = run()
        assert all(torch.equal(a, b) for a, b in zip(got, full))
        # made from the records of the depth before where those lie below (4 after 2), else from a full start
        first = 2 if depth == 4 else 0
        assert recorded == [block for _ in batches for block in model.layers[first:depth]]
    side = Stack(side=True)
    run = passes(side, batches[:1])
    assert not check(BlockReplay([side.layers], run, record_pass(side, batches[:1])), run())


class CrossBlock(Block):
    """A decoder block: also reads the encoder's output (its memory), as cross-attention does."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor]:
        self.log.append(self)
        return (x + torch.tanh(self.linear(x + memory.mean(0))),)


class EncoderDecoder(nn.Module):
    """Two lists of blocks run one after the other, a norm between them and a head after."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.log: list = []
        self.encoder = nn.ModuleList(Block(width, self.log, None) for _ in range(3))
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.ModuleList(CrossBlock(width, self.log, None) for _ in range(2))
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = x
        for block in self.encoder:
            (memory,) = block(memory)
        memory = self.norm(memory)
        for block in self.decoder:
            (x,) = block(x, memory)
        return self.head(x)


def test_an_encoder_and_a_decoder_replay_end_to_end():
    """Depth d skips the first d blocks of both lists taken end to end: a skipped encoder still hands
    the decoder its output, and every replayed pass is the full one, with no skipped block run."""
    torch.manual_seed(0)
    model = EncoderDecoder()
    batches = [torch.randn(3, 8) for _ in range(4)]
    run = passes(model, batches)
    full = run()
    replay = BlockReplay([model.encoder, model.decoder], run, record_pass(model, batches))
    assert check(replay, full)
    blocks = [*model.encoder, *model.decoder]
    for depth in (0, 1, 2, 3, 4, 5, 2, 5):
        with replay.skipping(depth):
            model.log.clear()
            got = run()
        assert all(torch.equal(a, b) for a, b in zip(got, full)), depth
        assert model.log == [block for _ in batches for block in blocks[depth:]], depth
    assert set(replay.finished) == {3, 5}  # what each list's last block returned, kept
    assert all("forward" not in vars(block) for block in blocks)


def test_each_layer_skips_the_blocks_that_run_before_it():
    from mpq.replay import block_chain, replay_depths
    from mpq.trace import LayerInfo

    model = EncoderDecoder()
    names = ["encoder.0.linear", "encoder.2.linear", "decoder.0.linear", "decoder.1.linear", "head"]
    layers = [LayerInfo(name, "Linear", name, None, 8, 8, 64, order, True) for order, name in enumerate(names)]
    chain = block_chain(model, layers[::-1])  # by the layers' order, not the list's
    assert [name for name, _ in chain] == ["encoder", "decoder"]
    assert replay_depths(chain, layers) == {"encoder.0.linear": 0, "encoder.2.linear": 2, "decoder.0.linear": 3,
                                            "decoder.1.linear": 4, "head": 5}
    layers[-1] = dataclasses.replace(layers[-1], tied_table="embed")  # quantised with the input table, the head
    # changes what the first block reads
    assert replay_depths(chain, layers)["head"] == 0


def test_replay_is_off_where_blocks_read_more_than_their_inputs():
    torch.manual_seed(0)
    model = Stack(side=True)
    run = passes(model, [torch.randn(3, 8)])
    assert not check(BlockReplay([model.layers], run), run())


def test_block_of():
    assert block_of("model.layers.3.mlp.experts.7.down_proj", "model.layers") == 3
    assert block_of("lm_head", "model.layers") == 0 and block_of("model.layers_extra.1.x", "model.layers") == 0


def test_sensitivity_with_replay_is_bit_identical_to_full_passes(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    formats = [get_format(n) for n in ("int8", "int4-g32")]
    work = sensitivity.measurement_model(loaded.model)
    cache = QuantizedWeightCache(loaded.model)
    blocks = work.get_submodule("model.layers")
    runs = []  # attention modules that ran: a replayed block runs none of its children
    for block in blocks:
        block.self_attn.register_forward_pre_hook(lambda module, args, kwargs: runs.append(module), with_kwargs=True)
    replayed = sensitivity.measure_sensitivity(loaded.model, work, graph.layers, formats, task, "k", {}, cache, False)
    block_runs = len(runs)
    runs.clear()
    full = sensitivity.measure_sensitivity(loaded.model, work, graph.layers, formats, task, "k", {}, cache, False,
                                           replay_blocks=False)
    assert replayed.values == full.values
    assert sum(v > 0 for per in full.values.values() for v in per.values()) >= 25  # of 30 (a tiny KL can round to 0)
    # block 0 did not run for the 14 passes of block 1's layers; recording ran it once, stopping
    # after it (block 1 ran too before record passes stopped), and the check's replayed pass block 1 once
    assert len(runs) - block_runs == 14 - 2
