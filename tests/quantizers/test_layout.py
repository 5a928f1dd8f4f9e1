"""layout.py helpers the quantizers share: masks, 3-d maps, padding, heads axis."""

import pytest
import torch

from fastvq.quantizers.layout import fill_padding, fmap_to_channel_last, scatter_valid, sequence_mask, with_heads_axis


def test_sequence_mask_from_lens_channel_first():
    x = torch.randn(2, 4, 5)  # (B, dim, N)
    mask = sequence_mask(x, None, torch.tensor([5, 2]), channel_last=False, fmap=False)
    assert mask.tolist() == [[True] * 5, [True, True, False, False, False]]
    assert sequence_mask(x, None, None, channel_last=False, fmap=False) is None


@pytest.mark.parametrize(
    "mask, lens, fmap",
    [(torch.ones(2, 5, dtype=torch.bool), torch.tensor([1, 2]), False),  # both
     (torch.ones(2, 4, dtype=torch.bool), None, False),  # wrong length
     (torch.ones(2, 5), None, False),  # not bool
     (torch.ones(2, 5, dtype=torch.bool), None, True)],  # a map takes no mask
)
def test_sequence_mask_raises(mask, lens, fmap):
    with pytest.raises(ValueError):
        sequence_mask(torch.randn(2, 5, 3), mask, lens, channel_last=True, fmap=fmap)


def test_fmap_to_channel_last_3d():
    x = torch.randn(2, 3, 4, 5, 6)
    assert torch.equal(fmap_to_channel_last(x, 3, False, False, True), x.movedim(1, -1))
    with pytest.raises(ValueError, match="accept_3d_fmap"):
        fmap_to_channel_last(torch.randn(2, 3, 4, 5), 3, False, False, True)


def test_scatter_valid_and_fill_padding():
    mask = torch.tensor([[True, False, True]])
    rows = torch.tensor([[1.0], [2.0]])
    assert scatter_valid(rows, mask, 0.0).tolist() == [[[1.0], [0.0], [2.0]]]
    assert scatter_valid(torch.tensor([4, 5]), mask, -1).tolist() == [[4, -1, 5]]
    out, x = torch.ones(1, 3, 2), torch.full((1, 3, 2), 7.0)
    assert fill_padding(out, x, mask, zeros=False)[0, 1].tolist() == [7.0, 7.0]
    assert fill_padding(out, x, mask, zeros=True)[0, 1].tolist() == [0.0, 0.0]


def test_with_heads_axis():
    assert with_heads_axis(torch.zeros(2, 3, dtype=torch.long), 1).shape == (2, 3, 1)
    assert with_heads_axis(torch.zeros(2, 3, dtype=torch.long), 3).shape == (2, 3)
    with pytest.raises(ValueError, match="heads axis of size 4"):
        with_heads_axis(torch.zeros(2, 3, dtype=torch.long), 4)
