import math

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.fitnet import FitNet
from lightningkd.functional.fitnet import fitnet_loss
from tests.distiller_tester import DistillerTester, parse_distiller

BN_EPS = 1e-5  # BatchNorm2d default; in eval mode with fresh running stats BN is x / sqrt(1 + eps)


def mse_by_hand(a: list, b: list) -> float:
    """Mean over all elements of the squared difference (mdistiller's F.mse_loss)."""

    def flat(x):
        return [v for item in x for v in flat(item)] if isinstance(x, list) else [x]

    fa, fb = flat(a), flat(b)
    return sum((x - y) ** 2 for x, y in zip(fa, fb)) / len(fa)


def conv1x1_by_hand(weight: list[list[float]], x: list) -> list:
    """(N, C_in, H, W) -> (N, C_out, H, W) with a 1x1 convolution, no bias, then eval-mode fresh BN."""
    scale = 1.0 / math.sqrt(1.0 + BN_EPS)
    out = []
    for sample in x:
        H, W = len(sample[0]), len(sample[0][0])
        out.append(
            [
                [
                    [scale * sum(w_oc * sample[c][h][wi] for c, w_oc in enumerate(row)) for wi in range(W)]
                    for h in range(H)
                ]
                for row in weight
            ]
        )
    return out


class TestFitNet(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.fitnet.FitNet\n"
        "init_args: {student_layer: layer2, teacher_layer: layer2, student_channels: 32, teacher_channels: 64,"
        " weight: 100.0}"
    )

    def make(self) -> FitNet:
        return FitNet(student_layer="s", teacher_layer="t", student_channels=4, teacher_channels=6)

    def inputs(self):
        # different channels AND spatial sizes
        return ({"s": torch.randn(2, 4, 8, 8, requires_grad=True)}, {"t": torch.randn(2, 6, 4, 4)}, None)

    def twin(self, distiller, student, teacher, batch):
        return fitnet_loss(distiller.regressor(student["s"]), teacher["t"], distiller.resize)

    def resized_inputs(self):
        return ({"s": torch.randn(2, 4, 3, 5, requires_grad=True)}, {"t": torch.randn(2, 6, 6, 10)}, None)

    def test_functional_resizes_the_student_map(self) -> None:
        # 2x2 average pooling of a 4x4 student map by hand, then the MSE against the 2x2 teacher map
        s = [[[[float(4 * h + w) for w in range(4)] for h in range(4)]]]
        pooled = [[[[sum(s[0][0][2 * h + i][2 * w + j] for i in (0, 1) for j in (0, 1)) / 4 for w in range(2)]
                    for h in range(2)]]]  # fmt: skip
        t = [[[[1.0, -2.0], [0.5, 3.0]]]]
        got = fitnet_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), "pool")
        assert got.item() == pytest.approx(mse_by_hand(pooled, t), rel=1e-12)

    def test_functional_known_value(self) -> None:
        a = [[[1.0, 2.0], [3.0, 4.0]]]
        b = [[[0.5, 2.0], [5.0, 1.0]]]
        expected = mse_by_hand(a, b)  # (0.25 + 0 + 4 + 9) / 4
        assert expected == pytest.approx(3.3125)
        assert fitnet_loss(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(expected, rel=1e-7)

    def _distiller_with_known_regressor(self, resize: str = "bilinear") -> tuple[FitNet, list[list[float]]]:
        fitnet = FitNet(
            student_layer="s",
            teacher_layer="t",
            student_channels=2,
            teacher_channels=3,
            kernel_size=1,
            resize=resize,
        )
        weight = [[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]]
        with torch.no_grad():
            fitnet.regressor[0].weight.copy_(torch.tensor(weight).reshape(3, 2, 1, 1))
        return fitnet.eval(), weight  # eval: BN uses its fresh running stats (mean 0, var 1)

    def test_known_value_same_size(self) -> None:
        fitnet, weight = self._distiller_with_known_regressor()
        torch.manual_seed(1)
        s, t = torch.randn(2, 2, 3, 3), torch.randn(2, 3, 3, 3)
        expected = mse_by_hand(conv1x1_by_hand(weight, s.tolist()), t.tolist())
        assert fitnet({"s": s}, {"t": t}).item() == pytest.approx(expected, rel=1e-6)

    def test_known_value_student_larger_pooled(self) -> None:
        fitnet, weight = self._distiller_with_known_regressor(resize="pool")
        torch.manual_seed(2)
        s, t = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2)
        reg = conv1x1_by_hand(weight, s.tolist())
        pooled = [
            [
                [
                    [sum(ch[2 * i + a][2 * j + b] for a in range(2) for b in range(2)) / 4 for j in range(2)]
                    for i in range(2)
                ]
                for ch in sample
            ]
            for sample in reg
        ]
        assert fitnet({"s": s}, {"t": t}).item() == pytest.approx(mse_by_hand(pooled, t.tolist()), rel=1e-6)

    def test_known_value_student_smaller_bilinear(self) -> None:
        fitnet, weight = self._distiller_with_known_regressor(resize="bilinear")
        torch.manual_seed(3)
        s, t = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 4, 4)
        # the regressed map (1x1 conv + BN, by hand) is resized to the teacher's size
        reg = torch.tensor(conv1x1_by_hand(weight, s.tolist()))
        up = F.interpolate(reg, size=(4, 4), mode="bilinear", align_corners=False)
        assert fitnet({"s": s}, {"t": t}).item() == pytest.approx(
            mse_by_hand(up.tolist(), t.tolist()), rel=1e-6
        )

    def test_regressor_receives_gradients(self) -> None:
        fitnet = FitNet(student_layer="s", teacher_layer="t", student_channels=3, teacher_channels=5)
        s = torch.randn(2, 3, 6, 6, requires_grad=True)
        fitnet({"s": s}, {"t": torch.randn(2, 5, 3, 3)}).backward()
        conv, bn = fitnet.regressor[0], fitnet.regressor[1]
        assert conv.weight.shape == (5, 3, 3, 3)
        for p in (conv.weight, bn.weight, bn.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert s.grad is not None and s.grad.abs().sum() > 0

    def test_regressor_is_a_checkpointed_submodule(self) -> None:
        fitnet = FitNet(
            student_layer="s", teacher_layer="t", student_channels=3, teacher_channels=5, relu=True
        )
        keys = set(fitnet.state_dict())
        assert {"regressor.0.weight", "regressor.1.weight", "regressor.1.running_mean"} <= keys
        assert isinstance(fitnet.regressor[-1], torch.nn.ReLU)
        out = fitnet.regressor(torch.randn(2, 3, 4, 4))
        assert (out >= 0).all()

    def test_rejects_bad_arguments(self) -> None:
        kwargs = dict(student_layer="s", teacher_layer="t", student_channels=4, teacher_channels=8)
        with pytest.raises(ValueError, match="student_channels must be a positive integer"):
            FitNet(**{**kwargs, "student_channels": 0})
        with pytest.raises(ValueError, match="teacher_channels must be a positive integer"):
            FitNet(**{**kwargs, "teacher_channels": 2.5})
        with pytest.raises(ValueError, match="kernel_size must be odd"):
            FitNet(**kwargs, kernel_size=2)
        with pytest.raises(ValueError, match="resize must be one of"):
            FitNet(**kwargs, resize="trilinear")
        with pytest.raises(ValueError, match="weight"):
            FitNet(**kwargs, weight=-1.0)
        fitnet = FitNet(**kwargs)
        with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(2, 4\).*\(2, 8\)"):
            fitnet({"s": torch.zeros(2, 4)}, {"t": torch.zeros(2, 8)})
        with pytest.raises(ValueError, match=r"built for 4 student and 8 teacher channels.*\(2, 5, 4, 4\)"):
            fitnet({"s": torch.zeros(2, 5, 4, 4)}, {"t": torch.zeros(2, 8, 4, 4)})
        with pytest.raises(ValueError, match=r"built for 4 student and 8 teacher channels.*\(2, 7, 4, 4\)"):
            fitnet({"s": torch.zeros(2, 4, 4, 4)}, {"t": torch.zeros(2, 7, 4, 4)})
        with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 5, 2, 2\).*same shape.*regressor"):
            fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 2))
        with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\).*same shape"):
            fitnet_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
        with pytest.raises(ValueError, match="resize must be one of"):
            fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2), resize="linear")
        with pytest.raises(KeyError, match="tapped"):
            fitnet({"x": torch.zeros(2, 4, 4, 4)}, {"t": torch.zeros(2, 8, 4, 4)})

    def test_yaml_resize_typo_fails_at_parse_time(self) -> None:
        spec = {
            "class_path": "lightningkd.distillers.FitNet",
            "init_args": {
                "student_layer": "s",
                "teacher_layer": "t",
                "student_channels": 4,
                "teacher_channels": 8,
            },
        }
        spec["init_args"]["resize"] = "bilinearr"
        with pytest.raises(Exception, match=r"(?s)resize.*Got value: bilinearr"):
            parse_distiller(spec)
