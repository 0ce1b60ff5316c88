import pytest
import torch

from mpq.packing import pack_int4_u8, unpack_int4_u8


@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (17, 256), (2, 3, 8)])
def test_pack_unpack_round_trip(shape):
    values = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_int4_u8(values)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4_u8(packed), values)


def test_low_nibble_holds_the_even_index():
    packed = pack_int4_u8(torch.tensor([[3, 12]], dtype=torch.uint8))
    assert packed.item() == 3 | (12 << 4)


def test_odd_length_is_rejected():
    with pytest.raises(ValueError, match="even"):
        pack_int4_u8(torch.zeros(2, 7, dtype=torch.uint8))
