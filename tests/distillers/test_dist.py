import math

import pytest
import torch

from lightningkd.distillers.dist import DIST
from lightningkd.functional.dist import dist_loss, dist_terms
from tests.distiller_tester import DistillerTester, parity_cases, tensor


# ---- the paper's equations in plain Python ----------------------------------------------------------------
def _softmax(row: list[float], T: float) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    return [v / sum(e) for v in e]


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    a = [v - ma for v in a]
    b = [v - mb for v in b]
    na = math.sqrt(sum(v * v for v in a))
    nb = math.sqrt(sum(v * v for v in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb + 1e-8)  # authors' additive eps


def dist_by_hand(zs: list[list[float]], zt: list[list[float]], T: float) -> tuple[float, float]:
    """(inter, intra), each times T^2; rows are samples, columns classes."""
    ys = [_softmax(r, T) for r in zs]
    yt = [_softmax(r, T) for r in zt]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(_pearson([r[c] for r in ys], [r[c] for r in yt]) for c in cols) / len(cols)
    return T * T * inter, T * T * intra


ZS = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 2.0], [0.3, 0.3, -0.7, 1.1]]
ZT = [[2.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, -2.0], [2.5, -0.5, 0.0, 1.0]]


class TestDIST(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.dist.DIST\n"
        "init_args: {beta: 1.0, gamma: 1.0, temperature: 4.0, weight: 2.0}"
    )

    term_names = ("inter", "intra")

    def make(self) -> DIST:
        return DIST(beta=1.0, gamma=2.0, temperature=4.0)

    def twin(self, distiller, student, teacher, batch):
        return dist_loss(
            student["output"], teacher["output"], distiller.beta, distiller.gamma, distiller.temperature
        )

    def inputs(self):
        return (
            {"output": torch.randn(8, 10, requires_grad=True)},
            {"output": torch.randn(8, 10)},
            None,
        )

    @pytest.mark.parametrize("T", [1.0, 4.0])
    def test_known_value(self, T: float) -> None:
        inter, intra = dist_by_hand(ZS, ZT, T)
        got = DIST(beta=2.0, gamma=0.5, temperature=T)(
            {"output": torch.tensor(ZS)}, {"output": torch.tensor(ZT)}
        )
        assert got.item() == pytest.approx(2.0 * inter + 0.5 * intra, rel=1e-5)
        got_inter, got_intra = dist_terms(
            torch.tensor(ZS, dtype=torch.float64), torch.tensor(ZT, dtype=torch.float64), T
        )
        assert got_inter.item() == pytest.approx(inter, rel=1e-12)
        assert got_intra.item() == pytest.approx(intra, rel=1e-12)
        terms = DIST(beta=2.0, gamma=0.5, temperature=T).terms(
            {"output": torch.tensor(ZS, dtype=torch.float64)},
            {"output": torch.tensor(ZT, dtype=torch.float64)},
        )
        assert terms["inter"].item() == pytest.approx(2.0 * inter, rel=1e-12)
        assert terms["intra"].item() == pytest.approx(0.5 * intra, rel=1e-12)

    def test_dense_logits_are_pixels(self) -> None:
        torch.manual_seed(0)
        zs = torch.randn(2, 3, 2, 4, dtype=torch.float64)
        zt = torch.randn(2, 3, 2, 4, dtype=torch.float64)
        # one row per pixel (n, h, w), written out by hand
        rows_s = [
            [zs[n, c, h, w].item() for c in range(3)] for n in range(2) for h in range(2) for w in range(4)
        ]
        rows_t = [
            [zt[n, c, h, w].item() for c in range(3)] for n in range(2) for h in range(2) for w in range(4)
        ]
        inter, intra = dist_by_hand(rows_s, rows_t, 1.0)
        got_inter, got_intra = dist_terms(zs, zt)
        assert got_inter.item() == pytest.approx(inter, rel=1e-12)
        assert got_intra.item() == pytest.approx(intra, rel=1e-12)
        assert dist_loss(zs, zt, beta=2.0, gamma=0.5).item() == pytest.approx(
            2 * inter + 0.5 * intra, rel=1e-12
        )

    @pytest.mark.parametrize("case", parity_cases("dist"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        hyper = case["hyper"]
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            zs = tensor(case["inputs"]["student_logits"], dtype)
            zt = tensor(case["inputs"]["teacher_logits"], dtype)
            inter, intra = dist_terms(zs, zt, hyper["tau"])
            assert inter.item() == pytest.approx(case[key]["inter"], rel=rel)
            assert intra.item() == pytest.approx(case[key]["intra"], rel=rel)
            total = dist_loss(zs, zt, hyper["beta"], hyper["gamma"], hyper["tau"])
            assert total.item() == pytest.approx(case[key]["total"], rel=rel)

    def test_identical_logits_give_almost_zero(self) -> None:
        z = torch.tensor(ZS, dtype=torch.float64)
        assert dist_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="temperature"):
            DIST(temperature=0.0)
        with pytest.raises(ValueError, match="beta"):
            DIST(beta=-1.0)
        with pytest.raises(ValueError, match="gamma"):
            DIST(gamma=-1.0)
        with pytest.raises(ValueError, match="gamma must be a number >= 0"):
            dist_loss(torch.zeros(2, 3), torch.zeros(2, 3), gamma=-1.0)
        with pytest.raises(ValueError, match="temperature must be a number > 0"):
            dist_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=-1.0)
        with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\)"):
            dist_loss(torch.zeros(2, 3), torch.zeros(2, 4))
        with pytest.raises(
            ValueError, match=r"\(2, 3, 4, 4\) and teacher logits \(2, 4, 8, 8\).*same N and C"
        ):
            dist_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 8, 8))
        with pytest.raises(ValueError, match=r"\(N, C\) logits of the same shape, or \(N, C, H, W\) maps"):
            dist_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
        with pytest.raises(KeyError, match="tapped"):
            DIST(teacher_layer="fc")({"output": torch.zeros(2, 3)}, {"output": torch.zeros(2, 3)})
