"""The CPU's float32-tile thresholds (kernels/cpu_thresholds.py): pinned by MPQ_CPU_TILES, else
measured once per machine and kept in the cache."""

import json

import pytest

from mpq.errors import MpqError
from mpq.kernels import cpu as cpu_kernels
from mpq.kernels import cpu_thresholds
from mpq.kernels.cpu_thresholds import NEVER, PROBE_TOKENS, from_tokens, pinned, thresholds


@pytest.mark.parametrize("value,expected", [("8:64,4:128", {8: 64, 4: 128}), (" 4:256,8:32 ", {8: 32, 4: 256}),
                                            ("never", {8: NEVER, 4: NEVER}), ("auto", None)])
def test_mpq_cpu_tiles_pins_the_thresholds(value, expected, monkeypatch):
    monkeypatch.setenv("MPQ_CPU_TILES", value)
    assert pinned() == expected


@pytest.mark.parametrize("value", ["8:64", "8:64,4:x", "64,128", "8:0,4:128", "8:64,4:128,2:8"])
def test_a_malformed_mpq_cpu_tiles_is_a_one_line_error(value, monkeypatch):
    monkeypatch.setenv("MPQ_CPU_TILES", value)
    with pytest.raises(MpqError, match="MPQ_CPU_TILES=.*write auto, never, or bits:tokens"):
        pinned()


def test_the_threshold_is_where_the_tiles_win_for_good():
    """Not the first win: timing noise can make one small count look won."""
    assert PROBE_TOKENS == (32, 64, 128, 256, 512)
    assert from_tokens([False, False, True, True, True]) == 128
    assert from_tokens([True, False, True, True, True]) == 128
    assert from_tokens([True] * 5) == 32
    assert from_tokens([True, True, True, True, False]) == NEVER


def test_measured_once_per_machine_then_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("MPQ_CPU_TILES", "auto")
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path))
    probes = []
    monkeypatch.setattr(cpu_thresholds, "probe", lambda: probes.append(1) or {8: 64, 4: NEVER})
    assert thresholds() == {8: 64, 4: NEVER} and len(probes) == 1
    assert thresholds() == {8: 64, 4: NEVER} and len(probes) == 1  # from the file
    stored = json.loads((tmp_path / "cpu-tiles.json").read_text())
    assert stored == {cpu_thresholds.signature(): {"8": 64, "4": NEVER}}
    (tmp_path / "cpu-tiles.json").write_text(json.dumps({cpu_thresholds.signature(): {"8": "x"}, "other": {}}))
    assert thresholds() == {8: 64, 4: NEVER} and len(probes) == 2  # a damaged entry is measured again
    assert "other" in json.loads((tmp_path / "cpu-tiles.json").read_text())  # other machines' entries stay


def test_the_probe_times_both_paths_on_this_cpu(monkeypatch):
    """The real probe: a threshold for each width, one of the counts it tried or NEVER."""
    found = cpu_thresholds.probe()
    assert set(found) == {8, 4} and all(tokens in (*PROBE_TOKENS, NEVER) for tokens in found.values())


def test_the_dispatch_reads_the_thresholds_on_first_use(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "FLOAT32_FROM_TOKENS", {})
    monkeypatch.setenv("MPQ_CPU_TILES", "8:96,4:NEVER".replace("NEVER", str(NEVER)))
    assert cpu_kernels.float32_from_tokens(4) == NEVER and cpu_kernels.FLOAT32_FROM_TOKENS == {8: 96, 4: NEVER}
    from mpq.formats import get_format
    assert not cpu_kernels.multiplies_in_float32(get_format("int4-g128"), 4096)
    assert cpu_kernels.multiplies_in_float32(get_format("int8"), 96)
