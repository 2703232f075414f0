import math

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.at import AT
from lightningkd.functional.at import at_loss, attention_map
from tests.distiller_tester import DistillerTester, parity_cases, parse_distiller, tensor

Nested = list  # (N, C, H, W) as nested Python lists


def map_by_hand(feat: Nested, p: float = 2.0) -> list[list[float]]:
    """Paper + official code: mean over channels of |A|^p, flattened, divided by its L2 norm (eps 1e-12)."""
    maps = []
    for sample in feat:
        C, H, W = len(sample), len(sample[0]), len(sample[0][0])
        row = [sum(abs(sample[c][h][w]) ** p for c in range(C)) / C for h in range(H) for w in range(W)]
        norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
        maps.append([v / norm for v in row])
    return maps


def at_by_hand(s: Nested, t: Nested, p: float = 2.0) -> float:
    """Mean over batch and positions of the squared difference of the normalised maps."""
    qs, qt = map_by_hand(s, p), map_by_hand(t, p)
    diffs = [(a - b) ** 2 for rs, rt in zip(qs, qt) for a, b in zip(rs, rt)]
    return sum(diffs) / len(diffs)


def block_mean(feat: Nested, fh: int, fw: int) -> Nested:
    """Adaptive average pooling by integer factors = mean over non-overlapping fh x fw blocks."""
    out = []
    for sample in feat:
        chans = []
        for ch in sample:
            H, W = len(ch) // fh, len(ch[0]) // fw
            chans.append(
                [
                    [
                        sum(ch[i * fh + a][j * fw + b] for a in range(fh) for b in range(fw)) / (fh * fw)
                        for j in range(W)
                    ]
                    for i in range(H)
                ]
            )
        out.append(chans)
    return out


class TestAT(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.at.AT\n"
        "init_args: {student_layers: [layer2, layer3], teacher_layers: [layer2, layer3], p: 2.0, weight: 1000.0}"
    )

    term_names = ("a", "b")

    def make(self) -> AT:
        return AT(student_layers=["a", "b"], teacher_layers=["ta", "tb"])

    def twin(self, distiller, student, teacher, batch):
        return sum(
            at_loss(student[s], teacher[t], distiller.p, distiller.resize)
            for s, t in zip(distiller.student_layers, distiller.teacher_layers)
        )

    def resized_inputs(self):
        return (
            {
                "a": torch.randn(2, 4, 8, 6, requires_grad=True),
                "b": torch.randn(2, 6, 4, 4, requires_grad=True),
            },
            {"ta": torch.randn(2, 8, 4, 3), "tb": torch.randn(2, 12, 8, 8)},
            None,
        )

    def inputs(self):
        # first pair: different channels AND spatial sizes; second: different channels only
        return (
            {
                "a": torch.randn(2, 4, 8, 8, requires_grad=True),
                "b": torch.randn(2, 6, 4, 4, requires_grad=True),
            },
            {"ta": torch.randn(2, 8, 4, 4), "tb": torch.randn(2, 12, 4, 4)},
            None,
        )

    def test_known_value(self) -> None:
        torch.manual_seed(1)
        s, t = torch.randn(2, 3, 2, 3), torch.randn(2, 5, 2, 3)
        expected = at_by_hand(s.tolist(), t.tolist())
        assert at_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
        got = AT(student_layers=["x"], teacher_layers=["y"])({"x": s}, {"y": t})
        assert got.item() == pytest.approx(expected, rel=1e-6)

    def test_attention_map_by_hand(self) -> None:
        x = [[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 0.0], [2.0, 1.0]]]]  # (1, 2, 2, 2)
        # mean_c x^2 = [1, 2, 2, 5], norm sqrt(34)
        expected = [v / math.sqrt(34.0) for v in (1.0, 2.0, 2.0, 5.0)]
        assert attention_map(torch.tensor(x, dtype=torch.float64))[0].tolist() == pytest.approx(
            expected, rel=1e-12
        )
        # p = 1 uses |x|: mean_c |x| = [1, 1, 1, 2], norm sqrt(7)
        expected1 = [v / math.sqrt(7.0) for v in (1.0, 1.0, 1.0, 2.0)]
        got1 = attention_map(torch.tensor(x, dtype=torch.float64), p=1)[0].tolist()
        assert got1 == pytest.approx(expected1, rel=1e-12)
        assert attention_map(torch.zeros(1, 2, 2, 2)).abs().sum().item() == 0.0  # eps keeps zeros finite

    def test_p_other_than_two(self) -> None:
        torch.manual_seed(2)
        s, t = torch.randn(2, 3, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
        assert at_loss(s, t, p=3.0).item() == pytest.approx(
            at_by_hand(s.tolist(), t.tolist(), 3.0), rel=1e-10
        )

    @pytest.mark.parametrize("case", parity_cases("at"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        p = case["hyper"]["p"]
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            s = tensor(case["inputs"]["student_feat"], dtype)
            t = tensor(case["inputs"]["teacher_feat"], dtype)
            assert at_loss(s, t, p=p).item() == pytest.approx(case[key], rel=rel)
            got = AT(student_layers=["s"], teacher_layers=["t"], p=p)({"s": s}, {"t": t})
            assert got.item() == pytest.approx(case[key], rel=rel)

    @pytest.mark.parametrize("case", parity_cases("at"), ids=lambda c: c["name"])
    def test_parity_attention_maps(self, case) -> None:
        inter = case["intermediate_float64"]
        for side in ("student", "teacher"):
            feat = tensor(case["inputs"][f"{side}_feat"], torch.float64)
            ref = tensor(inter[f"{side}_attention"], torch.float64)
            torch.testing.assert_close(attention_map(feat), ref, rtol=1e-10, atol=1e-14)

    def test_sum_over_pairs(self) -> None:
        torch.manual_seed(3)
        s1, t1 = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)
        s2, t2 = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 3, 3)
        at = AT(student_layers=["s1", "s2"], teacher_layers=["t1", "t2"])
        got = at({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}).item()
        expected = at_by_hand(s1.tolist(), t1.tolist()) + at_by_hand(s2.tolist(), t2.tolist())
        assert got == pytest.approx(expected, rel=1e-6)

    def test_terms_are_the_pairs(self) -> None:
        torch.manual_seed(3)
        s1, t1 = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)
        s2, t2 = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 3, 3)
        terms = AT(student_layers=["s1", "s2"], teacher_layers=["t1", "t2"]).terms(
            {"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}
        )
        assert list(terms) == ["s1", "s2"]
        assert terms["s1"].item() == pytest.approx(at_by_hand(s1.tolist(), t1.tolist()), rel=1e-6)
        assert terms["s2"].item() == pytest.approx(at_by_hand(s2.tolist(), t2.tolist()), rel=1e-6)
        # a student layer used twice: the terms are numbered instead
        twice = AT(student_layers=["s1", "s1"], teacher_layers=["t1", "t2"])
        assert list(twice.terms({"s1": s1}, {"t1": t1, "t2": t1})) == ["pair0", "pair1"]

    def test_mismatched_spatial_pools_the_larger_map(self) -> None:
        torch.manual_seed(4)
        s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
        expected = at_by_hand(block_mean(s.tolist(), 2, 2), t.tolist())
        assert at_loss(s, t).item() == pytest.approx(expected, rel=1e-10)
        # teacher larger than student: the teacher map is pooled
        expected_rev = at_by_hand(t.tolist(), block_mean(s.tolist(), 2, 2))
        assert at_loss(t, s).item() == pytest.approx(expected_rev, rel=1e-10)
        # non-square, each side pooled to the smaller one: student (4, 2), teacher (2, 4) -> (2, 2)
        s2, t2 = torch.randn(1, 2, 4, 2, dtype=torch.float64), torch.randn(1, 3, 2, 4, dtype=torch.float64)
        expected2 = at_by_hand(block_mean(s2.tolist(), 2, 1), block_mean(t2.tolist(), 1, 2))
        assert at_loss(s2, t2).item() == pytest.approx(expected2, rel=1e-10)

    def test_mismatched_spatial_interpolate_student(self) -> None:
        torch.manual_seed(5)
        s, t = torch.randn(2, 3, 3, 3, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
        resized = F.interpolate(s, size=(6, 6), mode="bilinear", align_corners=False)
        expected = at_by_hand(resized.tolist(), t.tolist())
        assert at_loss(s, t, resize="interpolate_student").item() == pytest.approx(expected, rel=1e-10)
        at = AT(student_layers=["s"], teacher_layers=["t"], resize="interpolate_student")
        assert at({"s": s}, {"t": t}).item() == pytest.approx(expected, rel=1e-10)

    def test_identical_attention_gives_zero(self) -> None:
        x = torch.randn(2, 4, 5, 5)
        assert at_loss(x, 2 * x.repeat(1, 3, 1, 1)).item() == pytest.approx(0.0, abs=1e-12)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="same length"):
            AT(student_layers=["a", "b"], teacher_layers=["a"])
        with pytest.raises(ValueError, match="non-empty list"):
            AT(student_layers=[], teacher_layers=[])
        with pytest.raises(ValueError, match="non-empty list"):
            AT(student_layers="layer1", teacher_layers="layer1")
        with pytest.raises(ValueError, match="p must be"):
            AT(student_layers=["a"], teacher_layers=["a"], p=0.0)
        with pytest.raises(ValueError, match="resize must be one of"):
            AT(student_layers=["a"], teacher_layers=["a"], resize="nearest")
        with pytest.raises(ValueError, match="weight"):
            AT(student_layers=["a"], teacher_layers=["a"], weight=-1.0)
        with pytest.raises(ValueError, match=r"\(2, 4, 4, 4\).*\(3, 4, 4, 4\).*batch"):
            at_loss(torch.zeros(2, 4, 4, 4), torch.zeros(3, 4, 4, 4))
        with pytest.raises(ValueError, match=r"\(2, 16\).*\(2, 4, 4, 4\)"):
            at_loss(torch.zeros(2, 16), torch.zeros(2, 4, 4, 4))
        with pytest.raises(ValueError, match="resize must be one of"):
            at_loss(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 2, 2), resize="bogus")
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            attention_map(torch.zeros(2, 4, 4))
        with pytest.raises(KeyError, match="tapped"):
            AT(student_layers=["a"], teacher_layers=["a"])(
                {"b": torch.zeros(1, 1, 2, 2)}, {"a": torch.zeros(1, 1, 2, 2)}
            )

    def test_yaml_resize_typo_fails_at_parse_time(self) -> None:
        spec = {
            "class_path": "lightningkd.distillers.AT",
            "init_args": {"student_layers": ["a"], "teacher_layers": ["a"]},
        }
        spec["init_args"]["resize"] = "pool_large"
        with pytest.raises(Exception, match=r"(?s)resize.*pool_larger.*Got value: pool_large"):
            parse_distiller(spec)
