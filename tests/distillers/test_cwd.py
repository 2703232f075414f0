import math

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.cwd import CWD, ChannelWiseDivergence
from lightningkd.functional.cwd import cwd_loss
from tests.distiller_tester import DistillerTester, parity_cases, tensor

BN_EPS = 1e-5  # BatchNorm2d default; in eval mode with fresh running stats BN is x / sqrt(1 + eps)


def cwd_by_hand(ys: list, yt: list, tau: float) -> float:
    """The paper's equation in plain Python: tau^2 / (N*C) * sum_{n,c} KL over the H*W positions."""
    total, maps = 0.0, 0
    for s_img, t_img in zip(ys, yt):
        for s_ch, t_ch in zip(s_img, t_img):
            s_flat = [v for row in s_ch for v in row]
            t_flat = [v for row in t_ch for v in row]
            es = [math.exp(v / tau) for v in s_flat]
            et = [math.exp(v / tau) for v in t_flat]
            ps = [e / sum(es) for e in es]
            pt = [e / sum(et) for e in et]
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
            maps += 1
    return tau * tau * total / maps


def adapter_by_hand(weight: list[list[float]], x: list) -> list:
    """1x1 conv (no bias) -> eval-mode fresh BatchNorm -> ReLU on a nested (N, C_in, H, W) list."""
    scale = 1.0 / math.sqrt(1.0 + BN_EPS)
    return [
        [
            [
                [
                    max(0.0, scale * sum(w * img[c][h][x_] for c, w in enumerate(row)))
                    for x_ in range(len(img[0][0]))
                ]
                for h in range(len(img[0]))
            ]
            for row in weight
        ]
        for img in x
    ]


class TestChannelWiseDivergence(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.cwd.ChannelWiseDivergence\n"
        "init_args: {temperature: 4.0, student_layer: head, teacher_layer: head, student_channels: 128,"
        " teacher_channels: 512, weight: 3.0}"
    )

    def make(self) -> ChannelWiseDivergence:
        return ChannelWiseDivergence(
            student_layer="s", teacher_layer="t", student_channels=4, teacher_channels=6
        )

    def inputs(self):
        # different channels AND spatial sizes (the teacher is resized to the student's 8x8)
        return ({"s": torch.randn(2, 4, 8, 8, requires_grad=True)}, {"t": torch.randn(2, 6, 4, 4)}, None)

    def twin(self, distiller, student, teacher, batch):
        return cwd_loss(distiller.adapter(student["s"]), teacher["t"], distiller.temperature)

    def resized_inputs(self):
        return ({"s": torch.randn(2, 4, 6, 5, requires_grad=True)}, {"t": torch.randn(2, 6, 12, 9)}, None)

    @pytest.mark.parametrize("tau", [1.0, 4.0])
    def test_known_value_on_logits(self, tau: float) -> None:
        torch.manual_seed(0)
        ys, yt = torch.randn(2, 3, 3, 4, dtype=torch.float64), torch.randn(2, 3, 3, 4, dtype=torch.float64)
        expected = cwd_by_hand(ys.tolist(), yt.tolist(), tau)
        assert cwd_loss(ys, yt, tau).item() == pytest.approx(expected, rel=1e-10)
        got = ChannelWiseDivergence(temperature=tau, weight=3.0)({"output": ys}, {"output": yt})
        assert got.item() == pytest.approx(expected, rel=1e-10)
        assert cwd_loss(ys.float(), yt.float(), tau).item() == pytest.approx(
            expected, rel=1e-4
        )  # the module applies the weight, not forward

    def test_known_value_with_adapter(self) -> None:
        cwd = ChannelWiseDivergence(
            student_layer="s", teacher_layer="t", student_channels=2, teacher_channels=3
        )
        weight = [[1.0, -1.0], [0.5, 2.0], [0.3, 1.0]]
        cwd.double()
        with torch.no_grad():
            cwd.adapter[0].weight.copy_(torch.tensor(weight, dtype=torch.float64).reshape(3, 2, 1, 1))
        cwd.eval()  # BN uses its fresh running stats (mean 0, var 1)
        torch.manual_seed(1)
        s, t = torch.rand(2, 2, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
        expected = cwd_by_hand(adapter_by_hand(weight, s.tolist()), t.tolist(), 4.0)
        assert cwd({"s": s}, {"t": t}).item() == pytest.approx(expected, rel=1e-10)

    def test_adapter_is_a_checkpointed_submodule(self) -> None:
        cwd = self.make()
        assert {"adapter.0.weight", "adapter.1.weight", "adapter.1.running_mean"} <= set(cwd.state_dict())
        assert cwd.adapter[0].weight.shape == (6, 4, 1, 1)
        assert isinstance(cwd.adapter[-1], torch.nn.ReLU)
        no_relu = ChannelWiseDivergence(
            student_layer="s", teacher_layer="t", student_channels=4, teacher_channels=6, relu=False
        )
        assert not isinstance(no_relu.adapter[-1], torch.nn.ReLU)
        assert ChannelWiseDivergence().adapter is None
        same = ChannelWiseDivergence(
            student_layer="s", teacher_layer="t", student_channels=8, teacher_channels=8
        )
        assert same.adapter is None and len(list(same.parameters())) == 0
        assert CWD is ChannelWiseDivergence

    def test_teacher_resized_to_student(self) -> None:
        torch.manual_seed(2)
        ys, yt = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 8, 10, dtype=torch.float64)
        resized = F.interpolate(yt, size=(4, 5), mode="bilinear", align_corners=False)
        expected = cwd_by_hand(ys.tolist(), resized.tolist(), 4.0)
        assert ChannelWiseDivergence()({"output": ys}, {"output": yt}).item() == pytest.approx(
            expected, rel=1e-10
        )
        # a smaller teacher is upsampled
        small = torch.randn(2, 3, 2, 3, dtype=torch.float64)
        up = F.interpolate(small, size=(4, 5), mode="bilinear", align_corners=False)
        assert cwd_loss(ys, small).item() == pytest.approx(
            cwd_by_hand(ys.tolist(), up.tolist(), 4.0), rel=1e-10
        )

    @pytest.mark.parametrize("case", parity_cases("cwd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        tau, loss_weight = case["hyper"]["tau"], case["hyper"]["loss_weight"]
        cwd = ChannelWiseDivergence(temperature=tau, weight=loss_weight)
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            ys = tensor(case["inputs"]["student"], dtype)
            yt = tensor(case["inputs"]["teacher"], dtype)
            assert (loss_weight * cwd_loss(ys, yt, tau)).item() == pytest.approx(case[key], rel=rel)
            assert (cwd.weight * cwd({"output": ys}, {"output": yt})).item() == pytest.approx(
                case[key], rel=rel
            )

    def test_identical_maps_give_zero(self) -> None:
        y = torch.randn(2, 5, 4, 4, dtype=torch.float64)
        assert cwd_loss(y, y).item() == pytest.approx(0.0, abs=1e-12)
        # a per-channel constant does not change the spatial softmax
        assert cwd_loss(y + torch.randn(2, 5, 1, 1, dtype=torch.float64), y).item() == pytest.approx(
            0.0, abs=1e-12
        )

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="temperature"):
            ChannelWiseDivergence(temperature=0.0)
        with pytest.raises(ValueError, match="temperature"):
            cwd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), temperature=-1.0)
        with pytest.raises(ValueError, match="both student_channels and teacher_channels"):
            ChannelWiseDivergence(student_layer="s", teacher_layer="t", student_channels=4)
        with pytest.raises(ValueError, match="teacher_channels must be a positive integer"):
            ChannelWiseDivergence(student_channels=4, teacher_channels=0)
        with pytest.raises(ValueError, match="student_channels must be a positive integer"):
            ChannelWiseDivergence(student_channels=2.5, teacher_channels=4)
        with pytest.raises(ValueError, match="weight"):
            ChannelWiseDivergence(weight=-1.0)
        plain = ChannelWiseDivergence(student_layer="s", teacher_layer="t")
        with pytest.raises(
            ValueError, match=r"\(2, 4, 8, 8\).*\(2, 6, 8, 8\).*student_channels=4.*teacher_channels=6"
        ):
            plain({"s": torch.zeros(2, 4, 8, 8)}, {"t": torch.zeros(2, 6, 8, 8)})
        with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(2, 4\).*\(2, 4\)"):
            plain({"s": torch.zeros(2, 4)}, {"t": torch.zeros(2, 4)})
        built = self.make()
        with pytest.raises(ValueError, match=r"built for 4 student and 6 teacher channels.*\(2, 5, 8, 8\)"):
            built({"s": torch.zeros(2, 5, 8, 8)}, {"t": torch.zeros(2, 6, 8, 8)})
        with pytest.raises(ValueError, match=r"built for 4 student and 6 teacher channels.*\(2, 7, 8, 8\)"):
            built({"s": torch.zeros(2, 4, 8, 8)}, {"t": torch.zeros(2, 7, 8, 8)})
        with pytest.raises(ValueError, match=r"student maps \(2, 3, 4, 4\) and teacher maps \(3, 3, 4, 4\)"):
            cwd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
        with pytest.raises(KeyError, match="tapped"):
            plain({"x": torch.zeros(2, 4, 4, 4)}, {"t": torch.zeros(2, 4, 4, 4)})
