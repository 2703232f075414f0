import math

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.skd import SKD, PairwiseSimilarityKD
from lightningkd.functional.skd import skd_loss
from tests.distiller_tester import DistillerTester, parity_cases, parse_distiller, tensor


def nodes_by_hand(img: list, kh: int, kw: int) -> list[list[float]]:
    """Non-overlapping kh x kw max pooling (ceil mode: border windows keep what is left) -> node vectors."""
    C, H, W = len(img), len(img[0]), len(img[0][0])
    nodes = []
    for i in range(math.ceil(H / kh)):
        for j in range(math.ceil(W / kw)):
            rows = range(i * kh, min((i + 1) * kh, H))
            cols = range(j * kw, min((j + 1) * kw, W))
            nodes.append([max(img[c][r][q] for r in rows for q in cols) for c in range(C)])
    return nodes


def similarity_by_hand(nodes: list[list[float]], original: bool) -> list[list[float]]:
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / (norm + 1e-8) if original else x / max(norm, 1e-12) for x in v]

    units = [unit(v) for v in nodes]
    return [[sum(a * b for a, b in zip(u, v)) for v in units] for u in units]


def skd_by_hand(fs: list, ft: list, original: bool, pool_scale: float = 0.5) -> float:
    """Mean over images and node pairs of (a_t - a_s)^2 (the paper's pair-wise term), plain Python."""
    H, W = len(ft[0][0]), len(ft[0][0][0])
    kh, kw = (int(H * pool_scale), int(W * pool_scale)) if original else (2, 2)
    total, count = 0.0, 0
    for s_img, t_img in zip(fs, ft):
        a_s = similarity_by_hand(nodes_by_hand(s_img, kh, kw), original)
        a_t = similarity_by_hand(nodes_by_hand(t_img, kh, kw), original)
        for row_s, row_t in zip(a_s, a_t):
            for x, y in zip(row_s, row_t):
                total += (y - x) ** 2
                count += 1
    return total / count


class TestPairwiseSimilarityKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.skd.PairwiseSimilarityKD\n"
        "init_args: {student_layer: psp, teacher_layer: psp, pooling: original, pool_scale: 0.5, weight: 0.5}"
    )

    def make(self) -> PairwiseSimilarityKD:
        return PairwiseSimilarityKD(student_layer="s", teacher_layer="t")

    def twin(self, distiller, student, teacher, batch):
        return skd_loss(student["s"], teacher["t"], distiller.pooling, distiller.pool_scale)

    def resized_inputs(self):
        return ({"s": torch.randn(2, 8, 6, 8, requires_grad=True)}, {"t": torch.randn(2, 16, 12, 16)}, None)

    def inputs(self):
        # the channel counts differ: only similarities are compared
        return ({"s": torch.randn(2, 8, 8, 8, requires_grad=True)}, {"t": torch.randn(2, 16, 8, 8)}, None)

    @pytest.mark.parametrize("pooling", ["original", "fixed_2x2"])
    @pytest.mark.parametrize("size", [(8, 8), (5, 7)])
    def test_known_value(self, pooling: str, size: tuple[int, int]) -> None:
        torch.manual_seed(0)
        fs = torch.randn(2, 3, *size, dtype=torch.float64)
        ft = torch.randn(2, 5, *size, dtype=torch.float64)
        expected = skd_by_hand(fs.tolist(), ft.tolist(), original=pooling == "original")
        assert skd_loss(fs, ft, pooling).item() == pytest.approx(expected, rel=1e-10)
        skd = PairwiseSimilarityKD(student_layer="s", teacher_layer="t", pooling=pooling)
        assert skd({"s": fs}, {"t": ft}).item() == pytest.approx(expected, rel=1e-10)

    def test_known_value_other_pool_scale(self) -> None:
        torch.manual_seed(1)
        fs, ft = torch.randn(1, 4, 9, 9, dtype=torch.float64), torch.randn(1, 6, 9, 9, dtype=torch.float64)
        expected = skd_by_hand(
            fs.tolist(), ft.tolist(), original=True, pool_scale=0.25
        )  # 2x2 windows, 5x5 nodes
        got = PairwiseSimilarityKD(student_layer="s", teacher_layer="t", pool_scale=0.25)(
            {"s": fs}, {"t": ft}
        )
        assert got.item() == pytest.approx(expected, rel=1e-10)

    @pytest.mark.parametrize("case", parity_cases("skd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        pooling = "original" if "CriterionPairWise" in case["hyper"]["implementation"] else "fixed_2x2"
        skd = PairwiseSimilarityKD(
            student_layer="s",
            teacher_layer="t",
            pooling=pooling,
            pool_scale=case["hyper"].get("pool_scale", 0.5),
        )
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            fs = tensor(case["inputs"]["student_feat"], dtype)
            ft = tensor(case["inputs"]["teacher_feat"], dtype)
            assert skd_loss(fs, ft, pooling).item() == pytest.approx(case[key], rel=rel)
            assert skd({"s": fs}, {"t": ft}).item() == pytest.approx(case[key], rel=rel)
        if pooling == "original":  # the official float32 cast, applied by the caller
            fs = tensor(case["inputs"]["student_feat"], torch.float64).float()
            ft = tensor(case["inputs"]["teacher_feat"], torch.float64).float()
            official = case["cross_check"]["official_code_with_its_float32_cast_on_float64_inputs"]
            assert skd_loss(fs, ft).item() == pytest.approx(official, rel=1e-4)

    def test_implementations_differ_only_in_the_normaliser_on_4x4_maps(self) -> None:
        # on 4x4 maps both use 2x2 windows; the values agree, but only "original" detaches the norm
        torch.manual_seed(2)
        ft = torch.randn(2, 6, 4, 4, dtype=torch.float64)
        grads = {}
        for pooling in ("original", "fixed_2x2"):
            fs = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            fs.requires_grad_(True)
            loss = skd_loss(fs, ft, pooling)
            loss.backward()
            grads[pooling] = (loss.item(), fs.grad, fs.detach())
        assert grads["original"][0] == pytest.approx(grads["fixed_2x2"][0], rel=1e-6)
        # <d loss / d node, node> per 2x2 window: 0 for a scale-invariant normaliser, not with a detached norm
        radial = {
            k: F.avg_pool2d(g * x, 2).mul(4).sum(dim=1).abs().max().item() for k, (_, g, x) in grads.items()
        }
        assert radial["fixed_2x2"] < 1e-12
        assert radial["original"] > 1e-6

    def test_teacher_resized_to_student(self) -> None:
        torch.manual_seed(4)
        fs, ft = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 5, 12, 12, dtype=torch.float64)
        resized = F.interpolate(ft, size=(6, 6), mode="bilinear", align_corners=False)
        for pooling in ("original", "fixed_2x2"):
            expected = skd_by_hand(fs.tolist(), resized.tolist(), original=pooling == "original")
            assert skd_loss(fs, ft, pooling).item() == pytest.approx(expected, rel=1e-10)

    def test_invariant_to_positive_scale(self) -> None:
        torch.manual_seed(5)
        fs, ft = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
        assert skd_loss(3.0 * fs, ft).item() == pytest.approx(skd_loss(fs, ft).item(), rel=1e-7)
        assert SKD is PairwiseSimilarityKD

    def test_rejects_bad_arguments(self) -> None:
        kwargs = dict(student_layer="s", teacher_layer="t")
        with pytest.raises(ValueError, match="pooling must be one of"):
            PairwiseSimilarityKD(**kwargs, pooling="avg")
        with pytest.raises(ValueError, match="pooling must be one of"):
            skd_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), pooling="2x2")
        for scale in (0.0, 1.5, True):
            with pytest.raises(ValueError, match=r"pool_scale must be a number in \(0, 1\]"):
                PairwiseSimilarityKD(**kwargs, pool_scale=scale)
        with pytest.raises(ValueError, match="no effect with pooling='fixed_2x2'"):
            PairwiseSimilarityKD(**kwargs, pooling="fixed_2x2", pool_scale=0.25)
        with pytest.raises(ValueError, match="weight"):
            PairwiseSimilarityKD(**kwargs, weight=-1.0)
        with pytest.raises(
            ValueError, match=r"1x8 map with pool_scale=0.5 gives a pooling window of \(0, 4\)"
        ):
            skd_loss(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
        with pytest.raises(ValueError, match=r"student \(2, 3, 4, 4\) and teacher \(3, 3, 4, 4\)"):
            skd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
        with pytest.raises(ValueError, match=r"\(N, C, H, W\).*student \(2, 3\)"):
            PairwiseSimilarityKD(**kwargs)({"s": torch.zeros(2, 3)}, {"t": torch.zeros(2, 3, 4, 4)})
        with pytest.raises(KeyError, match="tapped"):
            PairwiseSimilarityKD(**kwargs)({"s": torch.zeros(2, 3, 4, 4)}, {"x": torch.zeros(2, 3, 4, 4)})

    def test_yaml_pooling_typo_fails_at_parse_time(self) -> None:
        spec = {
            "class_path": "lightningkd.distillers.SKD",
            "init_args": {"student_layer": "s", "teacher_layer": "t", "pooling": "fixed_2X2"},
        }
        with pytest.raises(Exception, match=r"(?s)pooling.*Got value: fixed_2X2"):
            parse_distiller(spec)
