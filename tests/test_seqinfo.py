import pytest
import torch

from varlen import SeqInfo


def test_from_lengths_fields():
    info = SeqInfo.from_lengths([3, 1, 4])
    assert info.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert info.cu_seqlens.dtype == torch.int32
    assert info.lengths == (3, 1, 4)
    assert info.max_seqlen == 4 and isinstance(info.max_seqlen, int)
    assert info.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert info.document_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert info.total_tokens == 8 and info.num_seqs == 3


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_lengths_cu_position_ids(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 50, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
    info = SeqInfo.from_lengths(lengths)
    again = SeqInfo.from_cu_seqlens(info.cu_seqlens)
    assert again.lengths == tuple(lengths)
    from_pos = SeqInfo.from_position_ids(info.position_ids[None])
    assert from_pos.lengths == tuple(lengths)
    assert torch.equal(from_pos.cu_seqlens, info.cu_seqlens)
    mask = info.padding_mask(60)
    assert SeqInfo.from_padding_mask(mask).lengths == tuple(lengths)


@pytest.mark.parametrize("seed", range(3))
def test_pad_pack_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (7,), generator=g).tolist()
    info = SeqInfo.from_lengths(lengths)
    packed = torch.randn(info.total_tokens, 3, 2, generator=g)
    padded = info.unpack(packed, 32, value=float("nan"))
    assert padded.shape == (7, 32, 3, 2)
    for b, n in enumerate(lengths):  # real tokens in place, padding untouched by real data
        assert torch.equal(padded[b, :n], info.split(packed)[b])
        assert torch.isnan(padded[b, n:]).all()
    assert torch.equal(info.pack(padded), packed)


def test_unpack_is_differentiable():
    info = SeqInfo.from_lengths([2, 3])
    x = torch.randn(5, 4, requires_grad=True)
    (info.unpack(x) * torch.arange(3.0)[None, :, None]).sum().backward()
    assert x.grad[:, 0].tolist() == [0, 1, 0, 1, 2]


def test_to_and_pin_keep_host_metadata():
    info = SeqInfo.from_lengths([2, 3], max_seqlen=8)
    moved = info.to("meta")
    assert moved.cu_seqlens.device.type == "meta"
    assert moved.lengths == (2, 3) and moved.max_seqlen == 8


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SeqInfo.from_lengths([]), "empty batch"),
        (lambda: SeqInfo.from_lengths([3, 0, 2]), "lengths\\[1\\] = 0"),
        (lambda: SeqInfo.from_lengths([3, -1]), ">= 1"),
        (lambda: SeqInfo.from_lengths([3, 5], max_seqlen=4), "max_seqlen=4 is below"),
        (lambda: SeqInfo.from_cu_seqlens(torch.tensor([1, 3, 5], dtype=torch.int32)), "start at 0"),
        (lambda: SeqInfo.from_cu_seqlens(torch.tensor([0, 3, 3, 5], dtype=torch.int32)), "strictly increasing"),
        (lambda: SeqInfo.from_cu_seqlens(torch.tensor([0, 4, 2], dtype=torch.int32)), "strictly increasing"),
        (lambda: SeqInfo.from_cu_seqlens(torch.tensor([0, 3, 5])), "int32"),
        (lambda: SeqInfo.from_cu_seqlens(torch.tensor([0], dtype=torch.int32)), "empty batch"),
        (lambda: SeqInfo.from_position_ids(torch.tensor([1, 2, 3])), "start at 0"),
        (lambda: SeqInfo.from_position_ids(torch.tensor([0, 1, 3, 0])), "step by 1"),
        (lambda: SeqInfo.from_padding_mask(torch.tensor([[1, 0, 1]])), "not right-padded"),
        (lambda: SeqInfo.from_lengths([1.5]), "integers"),
    ],
)
def test_bad_metadata_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_pack_rejects_short_padding():
    info = SeqInfo.from_lengths([2, 6])
    with pytest.raises(ValueError, match="below the longest"):
        info.pack(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="3 rows"):
        info.pack(torch.zeros(3, 8))
