import math
from decimal import Decimal, localcontext

import pytest
import torch

from lightningkd.distillers.dkd import DKD
from lightningkd.functional.dkd import dkd_loss, dkd_terms
from tests.distiller_tester import DistillerTester, kl_by_hand


# ---- the paper's equations in plain Python (log space, so extreme logits stay exact) -------------------
def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _binary(z: list[float], y: int, T: float) -> list[float]:
    """log [p_y, sum_{c != y} p_c] of softmax(z / T)."""
    zz = [v / T for v in z]
    norm = _logsumexp(zz)
    return [zz[y] - norm, _logsumexp([v for c, v in enumerate(zz) if c != y]) - norm]


def _non_target(z: list[float], y: int, T: float) -> list[float]:
    """log-softmax of z / T over the classes other than y (renormalised)."""
    zz = [v / T for c, v in enumerate(z) if c != y]
    norm = _logsumexp(zz)
    return [v - norm for v in zz]


def tckd_by_hand(zs, zt, ys, T: float) -> float:
    return (
        T * T * sum(kl_by_hand(_binary(t, y, T), _binary(s, y, T)) for s, t, y in zip(zs, zt, ys)) / len(zs)
    )


def nckd_by_hand(zs, zt, ys, T: float) -> float:
    return (
        T
        * T
        * sum(kl_by_hand(_non_target(t, y, T), _non_target(s, y, T)) for s, t, y in zip(zs, zt, ys))
        / len(zs)
    )


def kd_by_hand(s: list[float], t: list[float], T: float) -> float:
    ls = [v / T - _logsumexp([u / T for u in s]) for v in s]
    lt = [v / T - _logsumexp([u / T for u in t]) for v in t]
    return T * T * kl_by_hand(lt, ls)


def tckd_by_decimal(zs, zt, ys, T: float) -> float:
    """TCKD with 50-digit decimals: probabilities summed directly, ``T^2 * sum KL / N``."""
    with localcontext() as ctx:
        ctx.prec = 50
        temperature = Decimal(T)

        def binary(z: list[float], y: int) -> tuple[Decimal, Decimal]:
            e = [(Decimal(v) / temperature).exp() for v in z]
            p = e[y] / sum(e)
            return p, 1 - p

        total = Decimal(0)
        for s, t, y in zip(zs, zt, ys):
            (ps, qs), (pt, qt) = binary(s, y), binary(t, y)
            total += pt * (pt / ps).ln() + qt * (qt / qs).ln()
        return float(total * temperature * temperature / len(zs))


ZS = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 2.0], [0.3, 0.3, -0.7, 1.1]]
ZT = [[2.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, -2.0], [2.5, -0.5, 0.0, 1.0]]
YS = [0, 2, 3]


def _t(data, dtype=torch.float32):
    return torch.tensor(data, dtype=dtype)


class TestDKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.dkd.DKD\n"
        "init_args: {alpha: 1.0, beta: 2.0, temperature: 4.0, weight: 1.0}"
    )

    term_names = ("tckd", "nckd")

    def make(self) -> DKD:
        return DKD(alpha=1.0, beta=8.0, temperature=4.0)

    def twin(self, distiller, student, teacher, batch):
        return dkd_loss(
            student["output"],
            teacher["output"],
            batch["target"],
            distiller.alpha,
            distiller.beta,
            distiller.temperature,
        )

    def inputs(self):
        return (
            {"output": torch.randn(8, 10, requires_grad=True)},
            {"output": torch.randn(8, 10)},
            {"target": torch.randint(0, 10, (8,))},
        )

    def test_needs_labels(self) -> None:
        assert DKD.needs_labels

    @pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
    def test_known_value(self, T: float) -> None:
        expected = 1.0 * tckd_by_hand(ZS, ZT, YS, T) + 8.0 * nckd_by_hand(ZS, ZT, YS, T)
        got = DKD(alpha=1.0, beta=8.0, temperature=T)(
            {"output": _t(ZS)}, {"output": _t(ZT)}, {"target": torch.tensor(YS)}
        )
        assert got.item() == pytest.approx(expected, rel=1e-5)
        got64 = dkd_loss(_t(ZS, torch.float64), _t(ZT, torch.float64), torch.tensor(YS), 1.0, 8.0, T)
        assert got64.item() == pytest.approx(expected, rel=1e-12)

    def test_terms_are_weighted_by_alpha_and_beta(self) -> None:
        terms = DKD(alpha=0.5, beta=3.0, temperature=2.0).terms(
            {"output": _t(ZS, torch.float64)}, {"output": _t(ZT, torch.float64)}, {"target": torch.tensor(YS)}
        )
        assert list(terms) == ["tckd", "nckd"]
        assert terms["tckd"].item() == pytest.approx(0.5 * tckd_by_hand(ZS, ZT, YS, 2.0), rel=1e-12)
        assert terms["nckd"].item() == pytest.approx(3.0 * nckd_by_hand(ZS, ZT, YS, 2.0), rel=1e-12)

    def test_alpha_only_is_binary_kl_by_hand(self) -> None:
        got = dkd_loss(_t(ZS, torch.float64), _t(ZT, torch.float64), torch.tensor(YS), alpha=1.0, beta=0.0)
        assert got.item() == pytest.approx(tckd_by_hand(ZS, ZT, YS, 4.0), rel=1e-12)

    def test_beta_only_is_non_target_kl_by_hand(self) -> None:
        got = dkd_loss(_t(ZS, torch.float64), _t(ZT, torch.float64), torch.tensor(YS), alpha=0.0, beta=1.0)
        assert got.item() == pytest.approx(nckd_by_hand(ZS, ZT, YS, 4.0), rel=1e-12)

    def test_terms_in_float32(self) -> None:
        tckd, nckd = dkd_terms(_t(ZS), _t(ZT), torch.tensor(YS), temperature=2.0)
        assert tckd.item() == pytest.approx(tckd_by_hand(ZS, ZT, YS, 2.0), rel=1e-5)
        assert nckd.item() == pytest.approx(nckd_by_hand(ZS, ZT, YS, 2.0), rel=1e-5)

    @pytest.mark.parametrize("T", [1.0, 2.0, 3.0, 4.0, 8.0])
    @pytest.mark.parametrize("magnitude", [1.0, 4.0, 20.0])
    def test_binary_term_in_float32_matches_float64(self, T: float, magnitude: float) -> None:
        # 100 classes, logits uniform in [-magnitude, magnitude]: the official form (a difference of two
        # log-sum-exps for log(1 - p_y)) is off by up to ~1e-3 here, mostly where the distributions are close
        g = torch.Generator().manual_seed(int(10 * T + magnitude))
        for batch in (4, 64):
            zs = (2 * torch.rand(batch, 100, generator=g) - 1) * magnitude
            zt = (2 * torch.rand(batch, 100, generator=g) - 1) * magnitude
            y = torch.randint(0, 100, (batch,), generator=g)
            tckd32 = dkd_terms(zs, zt, y, T)[0]
            tckd64 = dkd_terms(zs.double(), zt.double(), y, T)[0]
            assert tckd32.dtype == torch.float32
            assert tckd32.item() == pytest.approx(tckd64.item(), rel=1e-5)

    def test_binary_term_matches_a_50_digit_computation(self) -> None:
        # close student and teacher (the cancellation-prone case) and far ones, 5 classes, logits up to 20
        zs = [[20.0, -3.5, 0.25, 7.0, -20.0], [0.5, 0.25, -0.5, 1.0, 0.0], [-19.0, 18.0, 2.0, -1.0, 0.5]]
        zt = [[19.75, -3.25, 0.5, 7.0, -19.5], [0.5, 0.375, -0.5, 1.0, 0.125], [15.0, -12.0, 2.5, 3.0, 0.0]]
        ys = [0, 1, 2]
        for T in (1.0, 4.0):
            expected = tckd_by_decimal(zs, zt, ys, T)
            assert dkd_terms(_t(zs), _t(zt), torch.tensor(ys), T)[0].item() == pytest.approx(
                expected, rel=1e-5
            )
            got64 = dkd_terms(_t(zs, torch.float64), _t(zt, torch.float64), torch.tensor(ys), T)[0].item()
            assert got64 == pytest.approx(expected, rel=1e-12)

    def test_paper_decomposition_of_kd(self) -> None:
        # Paper Eq. (1)-(5): KD = TCKD + (1 - p_y^teacher) * NCKD, per sample.
        for s, t, y in zip(ZS, ZT, YS):
            for T in (1.0, 4.0):
                tckd, nckd = dkd_terms(_t([s], torch.float64), _t([t], torch.float64), torch.tensor([y]), T)
                p_target_teacher = math.exp(_binary(t, y, T)[0])
                got = tckd.item() + (1.0 - p_target_teacher) * nckd.item()
                assert got == pytest.approx(kd_by_hand(s, t, T), rel=1e-12)

    def test_all_equal_logits_give_zero(self) -> None:
        zs = torch.full((3, 5), 0.7)
        zt = torch.full((3, 5), -2.0)
        target = torch.tensor([0, 4, 2])
        assert dkd_loss(zs, zt, target).item() == pytest.approx(0.0, abs=1e-6)
        assert dkd_loss(zt, zt, target).item() == 0.0

    def test_underflowing_probabilities_stay_finite_and_exact(self) -> None:
        # The student's target probability is ~exp(-400), 0 in float32: a plain log gives inf (official code).
        zs = [[-200.0, 200.0, 0.0, 150.0]]
        zt = [[200.0, -200.0, 0.0, 100.0]]
        ys = [0]
        tckd, nckd = dkd_terms(_t(zs), _t(zt), torch.tensor(ys), temperature=1.0)
        assert torch.isfinite(tckd) and torch.isfinite(nckd)
        assert tckd.item() == pytest.approx(tckd_by_hand(zs, zt, ys, 1.0), rel=1e-5)
        assert nckd.item() == pytest.approx(nckd_by_hand(zs, zt, ys, 1.0), rel=1e-5)

    def test_non_target_term_ignores_the_target_logit(self) -> None:
        # The official "- 1000 * gt_mask" trick breaks once |z| / T approaches 1000; dropping the column does not.
        zs = [[5000.0, 1.0, 2.0, 0.5]]
        zt = [[4000.0, 2.0, 0.0, 1.0]]
        _, nckd = dkd_terms(_t(zs, torch.float64), _t(zt, torch.float64), torch.tensor([0]), temperature=1.0)
        assert nckd.item() == pytest.approx(nckd_by_hand(zs, zt, [0], 1.0), rel=1e-12)
        assert nckd.item() > 0.1

    def test_gradcheck(self) -> None:
        torch.manual_seed(0)
        zs = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        zt = torch.randn(3, 5, dtype=torch.float64)
        target = torch.tensor([4, 0, 2])
        assert torch.autograd.gradcheck(lambda z: dkd_loss(z, zt, target, 1.0, 2.0, 2.0), (zs,))

    def test_gradcheck_close_and_far_distributions(self) -> None:
        # both branches of the binary term: a student close to the teacher (log1p/expm1 forms) and far from it
        torch.manual_seed(1)
        zt = 3 * torch.randn(4, 6, dtype=torch.float64)
        target = torch.tensor([0, 5, 2, 3])
        for zs0 in (
            zt + 0.05 * torch.randn(4, 6, dtype=torch.float64),
            3 * torch.randn(4, 6, dtype=torch.float64),
        ):
            zs = zs0.clone().requires_grad_(True)
            assert torch.autograd.gradcheck(lambda z: dkd_terms(z, zt, target, 2.0)[0], (zs,))

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="temperature"):
            DKD(temperature=0.0)
        with pytest.raises(ValueError, match="alpha"):
            DKD(alpha=-1.0)
        with pytest.raises(ValueError, match="beta"):
            DKD(beta=-0.5)
        with pytest.raises(ValueError, match="beta must be a number >= 0"):
            dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), beta=-1.0)
        with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\)"):
            dkd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"student logits \(3, 3\) and teacher logits \(2, 3\)"):
            dkd_loss(torch.zeros(3, 3), torch.zeros(2, 3), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"target \(2, 1\) must have shape \(N,\)"):
            dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0], [1]]))
        with pytest.raises(ValueError, match=r"target \(3,\) must have shape \(N,\) = \(2,\)"):
            dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\).*max 3"):
            dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]))
        with pytest.raises(ValueError, match=r"\[0, 3\).*min -1"):
            dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([-1, 0]))
        with pytest.raises(TypeError, match="integer"):
            dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match="2 classes"):
            dkd_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 0]))
        with pytest.raises(ValueError, match="labels"):
            DKD()({"output": torch.zeros(2, 3)}, {"output": torch.zeros(2, 3)})
        with pytest.raises(KeyError, match="tapped"):
            DKD(student_layer="fc")(
                {"output": torch.zeros(2, 3)}, {"output": torch.zeros(2, 3)}, {"target": torch.tensor([0, 1])}
            )
