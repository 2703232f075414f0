"""Adapters between student and teacher features: channel projections, token <-> map layouts, resampling.

Learnable ones (:class:`ConvAdapter`, :class:`LinearAdapter`, :class:`ChannelProjection`) are created by
distillers from explicit sizes (never lazily), so they are trained, checkpointed and moved to the device
with the distiller. The layout and resampling ones have no parameters.
"""

from lightningkd.adapters.layout import (
    MapToTokens,
    TokensToMap,
    map_to_tokens,
    tokens_to_map,
)
from lightningkd.adapters.projections import ChannelProjection, ConvAdapter, LinearAdapter
from lightningkd.adapters.resample import Resample, resample_to

__all__ = [
    "ChannelProjection",
    "ConvAdapter",
    "LinearAdapter",
    "MapToTokens",
    "Resample",
    "TokensToMap",
    "map_to_tokens",
    "resample_to",
    "tokens_to_map",
]
