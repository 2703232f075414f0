import math

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.pixel_kd import PixelKD
from lightningkd.functional.pixel_kd import pixel_kd_loss
from tests.distiller_tester import DistillerTester, parity_cases, tensor


def _kl_by_hand(zs: list[float], zt: list[float], T: float) -> float:
    es = [math.exp(v / T) for v in zs]
    et = [math.exp(v / T) for v in zt]
    ps = [e / sum(es) for e in es]
    pt = [e / sum(et) for e in et]
    return sum(b * math.log(b / a) for a, b in zip(ps, pt))


def pixel_kd_by_hand(zs: list, zt: list, T: float, labels: list | None = None, ignore: int = 255) -> float:
    """T^2 * mean over (valid) pixels of KL(p_t || p_s) over classes; zs, zt nested (N, C, H, W) lists.

    ``labels`` is an (N, H, W) list at the logits' resolution (None: every pixel counts).
    """
    total, count = 0.0, 0
    for n in range(len(zs)):
        C, H, W = len(zs[n]), len(zs[n][0]), len(zs[n][0][0])
        for h in range(H):
            for w in range(W):
                if labels is not None and labels[n][h][w] == ignore:
                    continue
                s_pix = [zs[n][c][h][w] for c in range(C)]
                t_pix = [zt[n][c][h][w] for c in range(C)]
                total += _kl_by_hand(s_pix, t_pix, T)
                count += 1
    return T * T * total / max(count, 1)


class TestPixelKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.pixel_kd.PixelKD\n"
        "init_args: {temperature: 1.0, ignore_index: 11, weight: 1.0}"
    )

    def make(self) -> PixelKD:
        return PixelKD(temperature=2.0)

    def twin(self, distiller, student, teacher, batch):
        return pixel_kd_loss(
            student["output"],
            teacher["output"],
            distiller.temperature,
            batch["target"],
            distiller.ignore_index,
        )

    def resized_inputs(self):
        labels = torch.randint(0, 5, (2, 12, 12))
        labels[:, :3] = 255
        return (
            {"output": torch.randn(2, 5, 3, 3, requires_grad=True)},
            {"output": torch.randn(2, 5, 6, 5)},
            {"target": labels},
        )

    def inputs(self):
        labels = torch.randint(0, 5, (2, 8, 8))
        labels[:, :2] = 255
        return (
            {"output": torch.randn(2, 5, 4, 4, requires_grad=True)},
            {"output": torch.randn(2, 5, 4, 4)},
            {"target": labels},
        )

    def test_known_value_every_pixel(self) -> None:
        torch.manual_seed(0)
        zs, zt = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
        expected = pixel_kd_by_hand(zs.tolist(), zt.tolist(), 2.0)
        assert pixel_kd_loss(zs, zt, 2.0).item() == pytest.approx(expected, rel=1e-6)
        got = PixelKD(temperature=2.0, ignore_index=None)({"output": zs}, {"output": zt})
        assert got.item() == pytest.approx(expected, rel=1e-6)

    def test_known_value_ignore_aware_with_larger_labels(self) -> None:
        torch.manual_seed(1)
        zs, zt = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
        labels = torch.randint(0, 3, (2, 4, 6))
        labels[0, 0, 0] = labels[0, 2, 4] = labels[1, 2, 2] = 255  # on the nearest-sampled grid
        labels[1, 1, 1] = 255  # off the grid: never sampled, so never ignored
        # nearest downsampling by 2 keeps labels[:, 2i, 2j]
        small = [[[labels[n, 2 * i, 2 * j].item() for j in range(3)] for i in range(2)] for n in range(2)]
        expected = pixel_kd_by_hand(zs.tolist(), zt.tolist(), 4.0, small)
        got = PixelKD(temperature=4.0)({"output": zs}, {"output": zt}, {"target": labels})
        assert got.item() == pytest.approx(expected, rel=1e-6)
        assert pixel_kd_loss(zs, zt, 4.0, labels).item() == pytest.approx(expected, rel=1e-6)
        # a different ignore label
        labels_m1 = torch.where(labels == 255, -1, labels)
        got = PixelKD(temperature=4.0, ignore_index=-1)({"output": zs}, {"output": zt}, {"target": labels_m1})
        assert got.item() == pytest.approx(expected, rel=1e-6)

    @pytest.mark.parametrize("case", parity_cases("pixel_kd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        T = case["hyper"]["temperature"]
        official = PixelKD(temperature=T, ignore_index=None)
        others = case["expected_other_implementations"]
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            zs = tensor(case["inputs"]["student_logits"], dtype)
            zt = tensor(case["inputs"]["teacher_logits"], dtype)
            loss = pixel_kd_loss(zs, zt, T)
            assert loss.item() == pytest.approx(case[key], rel=rel)
            assert official({"output": zs}, {"output": zt}).item() == pytest.approx(case[key], rel=rel)
            # TorchDistiller's CriterionKD (documented, not offered): / (N*C*H*W) and no T^2
            suffix = "float64" if dtype == torch.float64 else "float32"
            torchdistiller = others[f"torchdistiller_CriterionKD_{suffix}"]
            assert (loss / (zs.shape[1] * T * T)).item() == pytest.approx(torchdistiller, rel=rel)

    def test_parity_with_no_ignored_label_equals_official(self) -> None:
        case = parity_cases("pixel_kd")[2]
        zs = tensor(case["inputs"]["student_logits"], torch.float64)
        zt = tensor(case["inputs"]["teacher_logits"], torch.float64)
        labels = torch.zeros(zs.shape[0], *zs.shape[-2:], dtype=torch.int64)
        got = PixelKD(temperature=4.0)({"output": zs}, {"output": zt}, {"target": labels})
        assert got.item() == pytest.approx(case["expected"], rel=1e-10)

    def test_ignored_pixels_have_no_effect(self) -> None:
        torch.manual_seed(2)
        zs, zt = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
        labels = torch.randint(0, 4, (2, 8, 8))
        labels[0, :4] = 255  # rows 0-1 of image 0 at logit resolution
        labels[1, :, 4:] = 255  # columns 2-3 of image 1
        ignored = torch.zeros(2, 4, 4, dtype=torch.bool)
        ignored[0, :2] = True
        ignored[1, :, 2:] = True
        zs2 = torch.where(ignored[:, None], torch.randn_like(zs) * 10, zs)
        zt2 = torch.where(ignored[:, None], torch.randn_like(zt) * 10, zt)
        pixel_kd = PixelKD(temperature=1.0)
        batch = {"target": labels}
        base = pixel_kd({"output": zs}, {"output": zt}, batch)
        assert pixel_kd({"output": zs2}, {"output": zt2}, batch).item() == pytest.approx(
            base.item(), rel=1e-6
        )
        # ... but the official mode counts them
        official = PixelKD(temperature=1.0, ignore_index=None)
        assert official({"output": zs2}, {"output": zt2}).item() != pytest.approx(
            official({"output": zs}, {"output": zt}).item(), rel=1e-3
        )
        # ... and they get no gradient
        s = zs.clone().requires_grad_(True)
        pixel_kd({"output": s}, {"output": zt}, batch).backward()
        assert (s.grad.abs().sum(dim=1)[ignored] == 0).all()
        assert (s.grad.abs().sum(dim=1)[~ignored] > 0).all()

    def test_every_pixel_ignored_gives_zero(self) -> None:
        s = torch.randn(1, 3, 2, 2, requires_grad=True)
        loss = PixelKD()(
            {"output": s}, {"output": torch.randn(1, 3, 2, 2)}, {"target": torch.full((1, 2, 2), 255)}
        )
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(s.grad).all()

    def test_teacher_resized_to_student(self) -> None:
        torch.manual_seed(3)
        zs, zt = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 6, 8)
        resized = F.interpolate(zt, size=(3, 4), mode="bilinear", align_corners=False)
        expected = pixel_kd_by_hand(zs.tolist(), resized.tolist(), 2.0)
        got = PixelKD(temperature=2.0, ignore_index=None)({"output": zs}, {"output": zt})
        assert got.item() == pytest.approx(expected, rel=1e-6)

    def test_needs_labels_follows_ignore_index(self) -> None:
        assert PixelKD().needs_labels
        assert not PixelKD(ignore_index=None).needs_labels
        assert PixelKD.needs_labels is False  # the class default is untouched

    def test_rejects_bad_arguments(self) -> None:
        z = torch.zeros(2, 3, 4, 4)
        with pytest.raises(ValueError, match="temperature"):
            PixelKD(temperature=0.0)
        with pytest.raises(ValueError, match="temperature"):
            pixel_kd_loss(z, z, temperature=-1.0)
        with pytest.raises(ValueError, match="ignore_index must be an integer label or None"):
            PixelKD(ignore_index="255")
        with pytest.raises(ValueError, match="ignore_index must be an integer label or None"):
            PixelKD(ignore_index=True)
        with pytest.raises(ValueError, match="ignore_index must be an integer label"):
            pixel_kd_loss(z, z, target=torch.zeros(2, 4, 4, dtype=torch.int64), ignore_index=None)
        with pytest.raises(ValueError, match="weight"):
            PixelKD(weight=-1.0)
        with pytest.raises(
            ValueError, match=r"student logits \(2, 3, 4, 4\) and teacher logits \(2, 5, 4, 4\)"
        ):
            pixel_kd_loss(z, torch.zeros(2, 5, 4, 4))
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            pixel_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3))
        with pytest.raises(ValueError, match=r"batch=\{'target': labels\}.*ignore_index=None"):
            PixelKD()({"output": z}, {"output": z})
        with pytest.raises(ValueError, match=r"batch=\{'target': labels\}"):
            PixelKD()({"output": z}, {"output": z}, {"image": torch.zeros(2, 3, 8, 8)})
        with pytest.raises(TypeError, match="integer class labels"):
            PixelKD()({"output": z}, {"output": z}, {"target": torch.zeros(2, 4, 4)})
        with pytest.raises(ValueError, match=r"\(N, H_label, W_label\) with N=2.*\(3, 4, 4\)"):
            PixelKD()({"output": z}, {"output": z}, {"target": torch.zeros(3, 4, 4, dtype=torch.int64)})
        with pytest.raises(ValueError, match=r"\(N, H_label, W_label\).*\(2, 1, 4, 4\)"):
            pixel_kd_loss(z, z, target=torch.zeros(2, 1, 4, 4, dtype=torch.int64))
        with pytest.raises(KeyError, match="tapped"):
            PixelKD(ignore_index=None, student_layer="logits")({"output": z}, {"output": z})
