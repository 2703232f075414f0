"""The distillation losses as pure tensor functions (same maths as :mod:`lightningkd.distillers`)."""

from lightningkd.functional.kd import kd_loss

__all__ = ["kd_loss"]
