import itertools
import math

import pytest
import torch

from lightningkd.distillers.rkd import RKD
from lightningkd.functional.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss, rkd_terms
from tests.distiller_tester import DistillerTester, parity_cases, tensor


# ---- the paper's equations in plain Python, with the official reductions ----------------------------------
def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _distances(x: list[list[float]]) -> list[list[float]]:
    """Euclidean distances divided by their mean over the N(N-1) pairs i != j (diagonal 0)."""
    n = len(x)
    d = [[math.dist(x[i], x[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    mu = sum(map(sum, d)) / (n * (n - 1))
    return [[v / mu for v in row] for row in d]


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v] if norm > 0 else [0.0] * len(v)


def _cosines(x: list[list[float]]) -> list[float]:
    """cos of the angle at anchor i between x_j and x_k, for all N^3 triples (0 for degenerate ones)."""
    out = []
    for i, j, k in itertools.product(range(len(x)), repeat=3):
        u = _unit([a - b for a, b in zip(x[j], x[i])])
        v = _unit([a - b for a, b in zip(x[k], x[i])])
        out.append(sum(a * b for a, b in zip(u, v)))
    return out


def rkd_by_hand(s: list[list[float]], t: list[list[float]]) -> tuple[float, float]:
    n = len(s)
    ds, dt = _distances(s), _distances(t)
    distance = sum(_smooth_l1(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    angle = sum(_smooth_l1(a - b) for a, b in zip(_cosines(s), _cosines(t))) / n**3
    return distance, angle


S = [[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [2.0, 0.0, -1.0], [-1.0, 0.5, 1.5]]
T = [
    [1.0, 0.0, 0.0, 2.0, 1.0],
    [0.0, 3.0, -1.0, 0.0, 0.0],
    [2.0, 2.0, 2.0, -1.0, 0.5],
    [0.0, 0.0, 1.0, 1.0, 1.0],
]


class TestRKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.rkd.RKD\n"
        "init_args: {student_layer: avgpool, teacher_layer: avgpool, distance_weight: 25.0, angle_weight: 50.0}"
    )

    term_names = ("distance", "angle")

    def make(self) -> RKD:
        return RKD(student_layer="avgpool", teacher_layer="layer4")

    def twin(self, distiller, student, teacher, batch):
        return rkd_loss(
            student["avgpool"], teacher["layer4"], distiller.distance_weight, distiller.angle_weight
        )

    def resized_inputs(self):
        # un-pooled maps of different sizes: both are global-average-pooled
        return (
            {"avgpool": torch.randn(8, 16, 3, 3, requires_grad=True)},
            {"layer4": torch.randn(8, 32, 2, 2)},
            None,
        )

    def inputs(self):
        return (
            {"avgpool": torch.randn(8, 16, 1, 1, requires_grad=True)},
            {"layer4": torch.randn(8, 32, 2, 2)},
            None,
        )

    def test_known_value(self) -> None:
        distance, angle = rkd_by_hand(S, T)
        assert distance > 0 and angle > 0
        s64, t64 = torch.tensor(S, dtype=torch.float64), torch.tensor(T, dtype=torch.float64)
        assert rkd_distance_loss(s64, t64).item() == pytest.approx(distance, rel=1e-12)
        assert rkd_angle_loss(s64, t64).item() == pytest.approx(angle, rel=1e-12)
        got = RKD(student_layer="s", teacher_layer="t", distance_weight=2.0, angle_weight=3.0)(
            {"s": torch.tensor(S)}, {"t": torch.tensor(T)}
        )
        assert got.item() == pytest.approx(2.0 * distance + 3.0 * angle, rel=1e-5)
        terms = RKD(student_layer="s", teacher_layer="t", distance_weight=2.0, angle_weight=3.0).terms(
            {"s": s64}, {"t": t64}
        )
        assert terms["distance"].item() == pytest.approx(2.0 * distance, rel=1e-12)
        assert terms["angle"].item() == pytest.approx(3.0 * angle, rel=1e-12)
        assert [v.item() for v in rkd_terms(s64, t64)] == pytest.approx([distance, angle], rel=1e-12)

    @pytest.mark.parametrize("case", parity_cases("rkd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        hyper = case["hyper"]
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            s = tensor(case["inputs"]["student_emb"], dtype)
            t = tensor(case["inputs"]["teacher_emb"], dtype)
            assert rkd_distance_loss(s, t).item() == pytest.approx(case[key]["distance"], rel=rel)
            assert rkd_angle_loss(s, t).item() == pytest.approx(case[key]["angle"], rel=rel)
            total = rkd_loss(s, t, hyper["distance_weight"], hyper["angle_weight"])
            assert total.item() == pytest.approx(case[key]["weighted_total"], rel=rel)

    def test_feature_maps_are_average_pooled(self) -> None:
        torch.manual_seed(0)
        s = torch.randn(5, 6, 3, 3, dtype=torch.float64)
        t = torch.randn(5, 4, 1, 1, dtype=torch.float64)
        s_pooled = s.sum(dim=(2, 3)) / 9
        t_flat = t.reshape(5, 4)
        assert rkd_loss(s, t).item() == pytest.approx(rkd_loss(s_pooled, t_flat).item(), rel=1e-12)

    def test_no_gradient_reaches_the_teacher(self) -> None:
        torch.manual_seed(0)
        s = torch.randn(6, 8, requires_grad=True)
        t = torch.randn(6, 12, requires_grad=True)
        rkd_loss(s, t).backward()
        assert t.grad is None
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0

    def test_duplicate_embeddings_stay_finite(self) -> None:
        s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, -1.0]], requires_grad=True)
        t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.0, -1.0]])
        loss = rkd_loss(s, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(TypeError):
            RKD()  # the layers must be named
        with pytest.raises(ValueError, match="distance_weight"):
            RKD(student_layer="a", teacher_layer="b", distance_weight=-1.0)
        with pytest.raises(ValueError, match="angle_weight must be a number >= 0"):
            rkd_loss(torch.zeros(3, 2), torch.zeros(3, 2), angle_weight=-1.0)
        with pytest.raises(ValueError, match=r"student embeddings \(4, 8\) and teacher embeddings \(3, 8\)"):
            rkd_loss(torch.zeros(4, 8), torch.zeros(3, 8))
        with pytest.raises(ValueError, match=r"at least 2 samples.*\(1, 8\).*\(1, 16\)"):
            rkd_distance_loss(torch.zeros(1, 8), torch.zeros(1, 16))
        with pytest.raises(ValueError, match=r"student \(4,\) and teacher \(4, 8\)"):
            rkd_angle_loss(torch.zeros(4), torch.zeros(4, 8))
        with pytest.raises(KeyError, match="tapped"):
            RKD(student_layer="avgpool", teacher_layer="avgpool")(
                {"output": torch.zeros(2, 3)}, {"avgpool": torch.zeros(2, 3)}
            )
