import math

import numpy as np
import pytest
import torch

from lightningkd.distillers.pkd import PKD
from lightningkd.functional.pkd import pkd_loss, pkd_standardize
from tests.distiller_tester import DistillerTester

EPS = 1e-6


# ---- the definition in numpy (independent of the code under test) ------------------------------------
def standardize_np(x: np.ndarray) -> np.ndarray:
    """Per channel over (N, H, W): (x - mean) / (unbiased std + 1e-6)."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    return (x - mean) / (std + EPS)


def bilinear_np(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with align_corners=False (half-pixel centres, source index clamped at 0)."""

    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(x.shape[2], size[0])
    x0, x1, wx = axis(x.shape[3], size[1])
    top = x[:, :, y0][:, :, :, x0] * (1 - wx) + x[:, :, y0][:, :, :, x1] * wx
    bottom = x[:, :, y1][:, :, :, x0] * (1 - wx) + x[:, :, y1][:, :, :, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def pkd_np(s: np.ndarray, t: np.ndarray, resize_student: bool = True) -> float:
    if s.shape[2] != t.shape[2]:
        if resize_student:
            s = bilinear_np(s, t.shape[2:])
        else:
            t = bilinear_np(t, s.shape[2:])
    return float(((standardize_np(s) - standardize_np(t)) ** 2).mean()) / 2


class TestPKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.PKD\n"
        "init_args: {student_layer: 'backbone:1', teacher_layer: 'backbone:1', resize_student: false, weight: 10.0}"
    )

    def make(self) -> PKD:
        return PKD(student_layer="s", teacher_layer="t", weight=6.0)

    def inputs(self):
        return ({"s": torch.randn(2, 4, 6, 6, requires_grad=True)}, {"t": torch.randn(2, 4, 6, 6)}, None)

    def twin(self, distiller, student, teacher, batch):
        return pkd_loss(student["s"], teacher["t"], resize_student=distiller.resize_student)

    def resized_inputs(self):
        return ({"s": torch.randn(2, 4, 8, 10, requires_grad=True)}, {"t": torch.randn(2, 4, 4, 5)}, None)

    # ---- known values -----------------------------------------------------------------------------
    def test_known_value_from_numpy(self) -> None:
        torch.manual_seed(0)
        s = torch.randn(3, 5, 4, 6, dtype=torch.float64) * 3 + 1
        t = torch.randn(3, 5, 4, 6, dtype=torch.float64) + 0.5 * s
        expected = pkd_np(s.numpy(), t.numpy())
        assert pkd_loss(s, t).item() == pytest.approx(expected, rel=1e-12)
        assert PKD(student_layer="s", teacher_layer="t")({"s": s}, {"t": t}).item() == pytest.approx(
            expected, rel=1e-12
        )
        assert pkd_loss(s.float(), t.float()).item() == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(pkd_standardize(s).numpy(), standardize_np(s.numpy()), rtol=1e-12)

    @pytest.mark.parametrize("resize_student", [True, False])
    def test_resize_when_heights_differ(self, resize_student: bool) -> None:
        torch.manual_seed(1)
        s = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        expected = pkd_np(s.numpy(), t.numpy(), resize_student)
        pkd = PKD(student_layer="s", teacher_layer="t", resize_student=resize_student)
        assert pkd({"s": s}, {"t": t}).item() == pytest.approx(expected, rel=1e-12)
        # a smaller student is upsampled
        small = torch.randn(2, 3, 2, 3, dtype=torch.float64)
        big = torch.randn(2, 3, 4, 6, dtype=torch.float64)
        assert pkd_loss(small, big, resize_student).item() == pytest.approx(
            pkd_np(small.numpy(), big.numpy(), resize_student), rel=1e-12
        )

    def test_identical_and_affine_maps_give_zero(self) -> None:
        torch.manual_seed(2)
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        assert pkd_loss(x, x).item() == 0.0
        # a positive scale and an offset per channel change nothing (up to the eps in the std)
        scale = torch.tensor([0.5, 2.0, 3.0, 10.0], dtype=torch.float64).view(1, 4, 1, 1)
        offset = torch.tensor([1.0, -4.0, 0.0, 7.0], dtype=torch.float64).view(1, 4, 1, 1)
        assert pkd_loss(x, scale * x + offset).item() == pytest.approx(0.0, abs=1e-10)

    def test_anti_correlated_maps(self) -> None:
        """T = -S: the standardised maps are opposite, loss = 2 * mean(S_hat^2) = mean over channels of
        2 * (n-1)/n * (std / (std + eps))^2 with n = N*H*W values per channel."""
        torch.manual_seed(3)
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        n = 2 * 4 * 4
        expected = 0.0
        for c in range(3):
            values = x[:, c].flatten().tolist()
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            expected += 2 * (n - 1) / n * (std / (std + EPS)) ** 2 / 3
        assert pkd_loss(x, -x).item() == pytest.approx(expected, rel=1e-12)
        assert pkd_loss(x, -x).item() == pytest.approx(2 * 31 / 32, rel=1e-5)

    def test_hand_standardisation(self) -> None:
        # one channel of 4 values 1, 3, 5, 7: mean 4, unbiased std sqrt(20/3)
        x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]], dtype=torch.float64)
        std = math.sqrt(20 / 3)
        expected = torch.tensor([-3.0, -1.0, 1.0, 3.0], dtype=torch.float64) / (std + EPS)
        torch.testing.assert_close(pkd_standardize(x).flatten(), expected, rtol=1e-14, atol=0)

    def test_sum_over_levels_times_weight(self) -> None:
        """mmrazor's PKDLoss sums the levels and multiplies by loss_weight: PerLevel(PKD(weight=w))."""
        from lightningkd.distillers import PerLevel

        torch.manual_seed(4)
        s = {
            "backbone:0": torch.randn(2, 4, 8, 8, dtype=torch.float64),
            "backbone:1": torch.randn(2, 4, 4, 4, dtype=torch.float64),
        }
        t = {
            "backbone:0": torch.randn(2, 4, 8, 8, dtype=torch.float64),
            "backbone:1": torch.randn(2, 4, 4, 4, dtype=torch.float64),
        }
        expected = 6 * sum(pkd_np(s[k].numpy(), t[k].numpy()) for k in s)
        got = PerLevel(distiller=PKD(weight=6.0), levels=["0", "1"])(s, t)
        assert got.item() == pytest.approx(expected, rel=1e-12)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="resize_student"):
            PKD(resize_student="yes")
        with pytest.raises(ValueError, match="weight"):
            PKD(weight=-1.0)
        with pytest.raises(ValueError, match=r"\(2, 4, 6, 6\).*\(2, 8, 6, 6\).*no channel adapter"):
            pkd_loss(torch.zeros(2, 4, 6, 6), torch.zeros(2, 8, 6, 6))
        with pytest.raises(ValueError, match=r"same height but different widths"):
            pkd_loss(torch.zeros(2, 4, 6, 6), torch.zeros(2, 4, 6, 5))
        with pytest.raises(ValueError, match="non-empty"):
            pkd_loss(torch.zeros(2, 4), torch.zeros(2, 4))
        with pytest.raises(ValueError, match="one value per channel"):
            pkd_loss(torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1))
        with pytest.raises(KeyError, match="tapped"):
            self.make()({"x": torch.zeros(2, 4, 4, 4)}, {"t": torch.zeros(2, 4, 4, 4)})
