"""Adapters: token <-> map layouts, resampling between strides, channel projections."""

import pytest
import torch

from lightningkd.adapters import (
    ChannelProjection,
    MapToTokens,
    Resample,
    TokensToMap,
    map_to_tokens,
    resample_to,
    tokens_to_map,
)


def test_tokens_to_map_drops_prefix_tokens_and_keeps_row_major_order() -> None:
    n, prefix, h, w, c = 2, 2, 2, 3, 4
    tokens = torch.randn(n, prefix + h * w, c)
    m = tokens_to_map(tokens, prefix_tokens=prefix, grid=(h, w))
    assert m.shape == (n, c, h, w)
    for i in range(h):
        for j in range(w):  # patch (i, j) is token prefix + i * w + j
            assert torch.equal(m[:, :, i, j], tokens[:, prefix + i * w + j])


def test_tokens_to_map_square_grid_by_default() -> None:
    assert tokens_to_map(torch.zeros(1, 65, 8), prefix_tokens=1).shape == (1, 8, 8, 8)


def test_nhwc_layout_is_a_permutation() -> None:
    x = torch.randn(2, 3, 5, 7)  # (N, H, W, C) as timm's Swin stages
    m = TokensToMap(layout="nhwc")(x)
    assert m.shape == (2, 7, 3, 5) and torch.equal(m[1, 4, 2, 3], x[1, 2, 3, 4])


def test_map_to_tokens_inverts_tokens_to_map() -> None:
    x = torch.randn(2, 6, 3, 4)
    tokens = MapToTokens()(x)
    assert tokens.shape == (2, 12, 6)
    assert torch.equal(tokens_to_map(tokens, grid=(3, 4)), x)


def test_wrong_prefix_count_names_the_counts() -> None:
    tokens = torch.zeros(2, 66, 8)  # a distilled DeiT: 2 prefix tokens + 8x8
    with pytest.raises(
        ValueError, match=r"66 tokens do not fit prefix_tokens=1 \+ a 8x8 grid \(65 tokens\).*2 prefix"
    ):
        tokens_to_map(tokens, prefix_tokens=1, grid=(8, 8))
    with pytest.raises(ValueError, match="66 tokens minus prefix_tokens=1 leaves 65, not a square grid"):
        tokens_to_map(tokens, prefix_tokens=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prefix_tokens": -1}, "prefix_tokens must be an integer >= 0"),
        ({"grid": (0, 4)}, "grid must be two positive integers"),
        ({"layout": "nchw"}, "layout must be one of"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokensToMap(**kwargs)


def test_a_map_given_as_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expects \(N, L, C\) tokens, got \(2, 8, 4, 4\).*no conversion"):
        tokens_to_map(torch.zeros(2, 8, 4, 4))
    with pytest.raises(ValueError, match="already tokens"):
        map_to_tokens(torch.zeros(2, 16, 8))


def test_resample_between_strides() -> None:
    r = Resample(in_stride=8, out_stride=32, mode="area")
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = r(x)  # 4 -> 1: the mean of all
    assert y.shape == (1, 1, 1, 1) and y.item() == pytest.approx(7.5)
    assert Resample(in_stride=16, out_stride=32)(torch.zeros(1, 2, 7, 7)).shape == (1, 2, 4, 4)  # ceil
    up = Resample(in_stride=32, out_stride=8, mode="nearest")(x)
    assert up.shape == (1, 1, 16, 16) and torch.equal(up[0, 0, :4, :4], torch.zeros(4, 4))


def test_resample_area_averages_blocks() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = resample_to(x, (2, 2), mode="area")
    assert y.flatten().tolist() == [
        (0 + 1 + 4 + 5) / 4,
        (2 + 3 + 6 + 7) / 4,
        (8 + 9 + 12 + 13) / 4,
        (10 + 11 + 14 + 15) / 4,
    ]


def test_resample_refuses_tokens() -> None:
    with pytest.raises(ValueError, match="TokensToMap"):
        Resample(in_stride=8, out_stride=16)(torch.zeros(2, 64, 8))


def test_channel_projection_same_weights_on_maps_and_tokens() -> None:
    torch.manual_seed(0)
    proj = ChannelProjection(3, 5)
    x = torch.randn(2, 3, 4, 4)
    as_map = proj(x)
    as_tokens = proj(map_to_tokens(x))
    assert torch.allclose(map_to_tokens(as_map), as_tokens)
    # by hand at one position: W @ x + b
    expected = proj.proj.weight @ x[1, :, 2, 3] + proj.proj.bias
    assert torch.allclose(as_map[1, :, 2, 3], expected)


def test_channel_projection_wrong_channels_names_the_shape() -> None:
    with pytest.raises(
        ValueError, match=r"expects \(N, 3, H, W\) maps or \(N, L, 3\) tokens, got \(2, 4, 4, 4\)"
    ):
        ChannelProjection(3, 5)(torch.zeros(2, 4, 4, 4))
