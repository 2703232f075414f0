"""DIST in its segmentation form: (N, C, H, W) logits, every pixel a sample, no temperature (tau = 1)."""

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.dist import DIST
from lightningkd.functional.dist import dist_loss, dist_terms
from tests.distiller_tester import DistillerTester, parity_cases, tensor
from tests.distillers.test_dist import dist_by_hand


def pixel_rows(z: torch.Tensor) -> list[list[float]]:
    """(N, C, H, W) -> one row of C values per pixel, in (n, w, h) order like the authors' transpose(1, 3)."""
    n, c, h, w = z.shape
    return [[z[i, k, y, x].item() for k in range(c)] for i in range(n) for x in range(w) for y in range(h)]


class TestDISTSegmentation(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.dist.DIST\ninit_args: {beta: 1.0, gamma: 2.0, temperature: 1.0}"
    )

    term_names = ("inter", "intra")

    def make(self) -> DIST:
        return DIST(beta=2.0, gamma=0.5)

    def twin(self, distiller, student, teacher, batch):
        return dist_loss(
            student["output"], teacher["output"], distiller.beta, distiller.gamma, distiller.temperature
        )

    def resized_inputs(self):
        return self.inputs()  # student 4x4, teacher 8x8

    def inputs(self):
        # dense logits; the teacher at twice the student's resolution is resized to it
        return (
            {"output": torch.randn(2, 5, 4, 4, requires_grad=True)},
            {"output": torch.randn(2, 5, 8, 8)},
            None,
        )

    @pytest.mark.parametrize("case", parity_cases("dist_seg"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        beta, gamma = case["hyper"]["beta"], case["hyper"]["gamma"]
        dist = DIST(beta=beta, gamma=gamma, temperature=1.0)  # the segmentation code has no temperature
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            zs = tensor(case["inputs"]["student_logits"], dtype)
            zt = tensor(case["inputs"]["teacher_logits"], dtype)
            inter, intra = dist_terms(zs, zt)
            assert inter.item() == pytest.approx(case[key]["inter"], rel=rel)
            assert intra.item() == pytest.approx(case[key]["intra"], rel=rel)
            assert dist_loss(zs, zt, beta, gamma).item() == pytest.approx(case[key]["total"], rel=rel)
            assert dist({"output": zs}, {"output": zt}).item() == pytest.approx(case[key]["total"], rel=rel)

    def test_known_value_pixels_are_samples(self) -> None:
        torch.manual_seed(0)
        zs = torch.randn(2, 4, 3, 2, dtype=torch.float64)
        zt = torch.randn(2, 4, 3, 2, dtype=torch.float64)
        inter, intra = dist_by_hand(pixel_rows(zs), pixel_rows(zt), 1.0)
        got = DIST(beta=2.0, gamma=0.5)({"output": zs}, {"output": zt})
        assert got.item() == pytest.approx(2.0 * inter + 0.5 * intra, rel=1e-10)

    def test_teacher_resized_to_student(self) -> None:
        torch.manual_seed(1)
        zs = torch.randn(2, 4, 3, 4, dtype=torch.float64)
        zt = torch.randn(2, 4, 6, 8, dtype=torch.float64)
        resized = F.interpolate(zt, size=(3, 4), mode="bilinear", align_corners=False)
        inter, intra = dist_by_hand(pixel_rows(zs), pixel_rows(resized), 1.0)
        assert DIST()({"output": zs}, {"output": zt}).item() == pytest.approx(inter + intra, rel=1e-10)
        # the functional form resizes the same way
        assert dist_loss(zs, zt).item() == pytest.approx(inter + intra, rel=1e-10)
        got_inter, got_intra = dist_terms(zs, zt)
        assert (got_inter.item(), got_intra.item()) == pytest.approx((inter, intra), rel=1e-10)
        terms = DIST(beta=2.0, gamma=0.5).terms({"output": zs}, {"output": zt})
        assert terms["inter"].item() == pytest.approx(2.0 * inter, rel=1e-10)
        assert terms["intra"].item() == pytest.approx(0.5 * intra, rel=1e-10)

    def test_rejects_mismatched_classes(self) -> None:
        with pytest.raises(
            ValueError, match=r"student logits \(2, 4, 3, 3\) and teacher logits \(2, 5, 6, 6\)"
        ):
            DIST()({"output": torch.zeros(2, 4, 3, 3)}, {"output": torch.zeros(2, 5, 6, 6)})
