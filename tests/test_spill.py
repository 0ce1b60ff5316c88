"""mpq.spill: a compile's large tensors held in unlinked files and mapped back, with the same numbers."""

import logging
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from mpq import sensitivity, spill
from mpq.apply import QuantizedWeightCache
from mpq.float_twin import float32_twin
from mpq.formats import get_format
from mpq.spill import kept, spilled_bytes, spilling

FORMATS = [get_format(n) for n in ("fp16", "int8", "int4-g32")]


def _mapped_from(folder: Path) -> list[str]:
    """Lines of this process's memory map that map a (deleted) file of `folder`."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]


def _maps_from(tensor: torch.Tensor, folder: Path) -> bool:
    """Whether `tensor`'s memory lies in a mapping of a file of `folder`."""
    for line in _mapped_from(folder):
        start, end = (int(address, 16) for address in line.split()[0].split("-"))
        if start <= tensor.data_ptr() < end:
            return True
    return False


def test_outside_spilling_kept_returns_its_argument():
    value = {"w": torch.randn(600, 600)}
    assert kept(value) is value and spilled_bytes() == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's memory map")
def test_large_tensors_come_back_mapped_from_deleted_files_with_the_same_numbers(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(1000, 1025, generator=generator).to(torch.bfloat16),
               "int8": torch.randint(-128, 128, (1031, 1029), dtype=torch.int8, generator=generator),
               "strided": torch.randn(1024, 600, generator=generator).t(),  # not contiguous
               "small": torch.randn(7, 3, generator=generator)}
    with spilling(tmp_path) as active:
        back = kept(tensors)
        folder = active.folder
        assert folder is not None and folder.parent == tmp_path and not list(folder.iterdir())  # unlinked at once
        for name, tensor in tensors.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
        assert back["small"] is tensors["small"]  # under MIN_BYTES: stays in memory
        assert all(back[name].data_ptr() != tensors[name].data_ptr() for name in ("bf16", "int8", "strided"))
        maps = _mapped_from(folder)
        assert len(maps) == 3 and all(line.endswith("(deleted)") for line in maps)
        assert all(_maps_from(back[name], folder) for name in ("bf16", "int8", "strided"))
        expected = sum(tensors[name].nbytes for name in ("bf16", "int8", "strided"))
        assert spilled_bytes() == active.bytes_kept == expected
        again = kept(back)  # a tensor kept before is not written again
        assert all(again[name] is back[name] for name in back) and spilled_bytes() == expected
        back["bf16"][0, 0] = 7.0  # a private mapping: writable, and the write stays in this process
        assert back["bf16"][0, 0].item() == 7.0
    assert not folder.exists() and spilled_bytes() == 0
    del back, again
    assert not _mapped_from(folder)  # the mappings went with the tensors


def test_a_spill_that_cannot_write_keeps_tensors_in_memory_and_says_so(tmp_path, monkeypatch, caplog):
    tensor = torch.randn(1024, 512)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with spilling(tmp_path / "not-made-yet") as active:
        assert kept(tensor) is tensor and active.failed is None  # no folder to write in yet: not a failure
        (tmp_path / "not-made-yet").mkdir()
        monkeypatch.setattr(torch, "from_file", full_disk)
        with caplog.at_level(logging.WARNING, logger=spill.__name__):
            assert kept(tensor) is tensor
        assert "No space left on device" in active.failed and "holds them in memory" in caplog.text
        monkeypatch.undo()
        assert kept(tensor) is tensor  # no more tries once one failed
        assert not list(active.folder.iterdir())
    assert spilled_bytes() == 0


def test_sensitivities_measured_with_the_spill_are_the_same_bit_for_bit(tiny_llama_calibrated, tmp_path):
    """The kl table of the tiny Llama, measured in its lazy twin with the weight cache, the reference
    log-probabilities and the twin's float32 copies mapped from files, equals the one held in memory."""
    loaded, task, graph = tiny_llama_calibrated
    tables = {}
    for spilled in (False, True):
        with spilling(tmp_path, min_bytes=1) if spilled else nullcontext() as active:
            cache = QuantizedWeightCache(loaded.model)
            work = float32_twin(loaded.model)
            tables[spilled] = sensitivity.measure_sensitivity(loaded.model, work, graph.layers, FORMATS, task, "k", {},
                                                              cache, False).values
            if spilled:
                # written once each: the weight cache, the float32 copies of what lies outside the
                # blocks (bf16 in the model), and one reference (block replay's passes write nothing)
                written = active.bytes_kept
                outside = [t for name, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]
                           if not name.startswith("model.layers.") and t.dtype == torch.bfloat16]
                passed = task.reference(work)  # a pass's outputs, not held: in memory, nothing written
                assert written == (sum(t.nbytes for tensors in cache._tensors.values() for t in tensors.values())
                                   + sum(2 * t.nbytes for t in outside) + sum(ref.nbytes for ref in passed))
                assert not any(_maps_from(ref, active.folder) for ref in passed)
                assert active.bytes_kept == written
                reference = task.reference(work, held=True)
                assert all(_maps_from(ref, active.folder) for ref in reference)
                assert _maps_from(work.lm_head.weight, active.folder)  # the twin's float32 head (tied to the table)
                assert all(_maps_from(t, active.folder) for tensors in cache._tensors.values() for t in tensors.values())
                assert active.bytes_kept > sum(ref.nbytes for ref in reference)
    assert tables[True] == tables[False]
    assert sum(v > 0 for per in tables[True].values() for v in per.values()) >= 25
