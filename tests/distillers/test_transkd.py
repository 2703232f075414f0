import math

import numpy as np
import pytest
import torch
from torch import nn

from lightningkd.adapters import map_to_tokens, resample_to
from lightningkd.distillers.transkd import (
    SEGFORMER_EMBEDDINGS,
    SEGFORMER_STAGES,
    CrossSelectiveFusion,
    SelectiveFusion,
    TransKD,
)
from lightningkd.functional.transkd import (
    transkd_fuse,
    transkd_hcl_levels,
    transkd_hcl_loss,
    transkd_pea_loss,
    transkd_terms,
)
from lightningkd.taps import FeatureTap
from tests.distiller_tester import DistillerTester


# ---- independent re-derivations (numpy loops from the paper's / official code's equations) --------------
def adaptive_pool_np(x: np.ndarray, side: int) -> np.ndarray:
    """Adaptive average pooling of ``(N, C, H, W)`` to ``side x side`` with PyTorch's bins
    ``[floor(i H / side), ceil((i + 1) H / side))``, by loops."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, side, side))
    for i in range(side):
        y0, y1 = (i * h) // side, -((-(i + 1) * h) // side)
        for j in range(side):
            x0, x1 = (j * w) // side, -((-(j + 1) * w) // side)
            out[:, :, i, j] = x[:, :, y0:y1, x0:x1].mean(axis=(2, 3))
    return out


def hcl_np(student: list[np.ndarray], teacher: list[np.ndarray]) -> float:
    """ReviewKD's HCL as TransKD's ``hcl``: levels 4, 2, 1 used when smaller than the height, weights
    halving per used level, divided by one plus the used weights; summed over stages."""
    total = 0.0
    for s, t in zip(student, teacher):
        loss, weight, denominator = float(((s - t) ** 2).mean()), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= s.shape[2]:
                continue
            weight /= 2
            loss += weight * float(((adaptive_pool_np(s, level) - adaptive_pool_np(t, level)) ** 2).mean())
            denominator += weight
        total += loss / denominator
    return total


def bn_np(x: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    """Eval-mode BatchNorm from its running statistics."""
    mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    g, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    return (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + bn.eps) * g[:, None, None] + b[
        :, None, None
    ]


def conv_np(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Stride-1 cross-correlation with 'same' zero padding, by loops over the kernel offsets."""
    k = w.shape[-1]
    pad = k // 2
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], xp[:, :, dy : dy + h, dx : dx + wd])
    return out if bias is None else out + bias[None, :, None, None]


def selective_fusion_np(
    stage: SelectiveFusion, x: np.ndarray, residual: np.ndarray
) -> tuple[np.ndarray, ...]:
    """One eval-mode SK stage of the official ``train/CSF.py`` from the module's weights, in numpy."""

    def weight(m):
        return m.weight.detach().numpy()

    x = bn_np(conv_np(x, weight(stage.conv1[0])), stage.conv1[1])
    # nearest upsampling of the deeper stage's map by an integer factor
    fy, fx = x.shape[2] // residual.shape[2], x.shape[3] // residual.shape[3]
    y = residual.repeat(fy, axis=2).repeat(fx, axis=3)
    s = (x + y).mean(axis=(2, 3), keepdims=True)
    z = np.maximum(bn_np(conv_np(s, weight(stage.fc[0])), stage.fc[1]), 0.0)
    logits = np.stack([conv_np(z, weight(h), h.bias.detach().numpy()) for h in stage.fcs], axis=1)
    a = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    fused = a[:, 0] * x + a[:, 1] * y
    return bn_np(conv_np(fused, weight(stage.conv2[0])), stage.conv2[1]), fused, a


# ---- the shared checks ------------------------------------------------------------------------------------
def _small(**overrides) -> TransKD:
    args = dict(
        student_stages=["s1", "s2"],
        teacher_stages=["t1", "t2"],
        student_channels=[4, 8],
        teacher_channels=[6, 12],
        student_embeddings=["e1", "e2"],
        teacher_embeddings=["f1", "f2"],
        embedding_weights=[0.5, 1.0],
        hcl_weight=1.5,
        mid_channels=8,
    )
    return TransKD(**{**args, **overrides})


def _inputs(student_sizes, teacher_sizes, batch: int = 2):
    s = {
        "s1": torch.randn(batch, 4, *student_sizes[0], requires_grad=True),
        "s2": torch.randn(batch, 8, *student_sizes[1], requires_grad=True),
        "e1": torch.randn(batch, math.prod(teacher_sizes[0]), 4, requires_grad=True),
        "e2": torch.randn(batch, math.prod(teacher_sizes[1]), 8, requires_grad=True),
    }
    t = {
        "t1": torch.randn(batch, 6, *teacher_sizes[0]),
        "t2": torch.randn(batch, 12, *teacher_sizes[1]),
        "f1": torch.randn(batch, math.prod(teacher_sizes[0]), 6),
        "f2": torch.randn(batch, math.prod(teacher_sizes[1]), 12),
    }
    return s, t, None


class TestTransKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.TransKD\n"
        "init_args: {student_stages: ['backbone:1', 'backbone:2'], teacher_stages: ['backbone:low', "
        "'backbone:high'], student_channels: [64, 160], teacher_channels: [40, 960], student_embeddings: null, "
        "teacher_embeddings: null, hcl_weight: 2.0, resize_mode: nearest}"
    )
    term_names = ("hcl", "pea")

    def make(self) -> TransKD:
        return _small()

    def inputs(self):
        return _inputs([(8, 10), (4, 5)], [(8, 10), (4, 5)])

    def resized_inputs(self):
        # a stride-8 CNN-like student (two stages at 8x10) against a 4/8-strided teacher grid
        return _inputs([(16, 20), (16, 20)], [(8, 10), (4, 5)])

    def twin(self, distiller, student, teacher, batch):
        t_maps = [teacher["t1"], teacher["t2"]]
        fused = distiller.csf([student["s1"], student["s2"]])
        fused = [resample_to(f, tuple(t.shape[-2:]), "bilinear") for f, t in zip(fused, t_maps)]
        s_emb = [p(student[k]) for p, k in zip(distiller.projections, ("e1", "e2"))]
        return sum(
            transkd_terms(
                fused,
                t_maps,
                s_emb,
                [teacher["f1"], teacher["f2"]],
                hcl_weight=distiller.hcl_weight,
                embedding_weights=distiller.embedding_weights,
            ).values()
        )

    # ---- HCL ------------------------------------------------------------------------------------------
    def test_hcl_levels_and_denominators(self) -> None:
        assert transkd_hcl_levels(8) == [(4, 0.5), (2, 0.25), (1, 0.125)]  # 1 + 0.875 = 1.875
        assert transkd_hcl_levels(5) == [(4, 0.5), (2, 0.25), (1, 0.125)]
        assert transkd_hcl_levels(4) == [(2, 0.5), (1, 0.25)]  # level 4 skipped: weights restart at 1/2
        assert transkd_hcl_levels(2) == [(1, 0.5)]
        assert transkd_hcl_levels(1) == []

    def test_hcl_by_hand_with_all_three_levels(self) -> None:
        # 8x8 map: +1 on the left half, -1 on the right, teacher 0. Full MSE 1; 4x4 and 2x2 pools keep
        # the +-1 (MSE 1); the 1x1 pool averages to 0. (1 + 1/2 + 1/4 + 0) / 1.875.
        s = torch.ones(1, 1, 8, 8, dtype=torch.float64)
        s[..., 4:] = -1
        t = torch.zeros_like(s)
        expected = (1 + 0.5 + 0.25 + 0.125 * 0) / 1.875
        assert transkd_hcl_loss([s], [t]).item() == pytest.approx(expected, rel=1e-12)

    def test_hcl_by_hand_when_the_map_is_smaller_than_a_level(self) -> None:
        # 3x3 map with a single 3 in the corner: level 4 is skipped (4 >= 3), level 2 gets weight 1/2 and
        # level 1 weight 1/4, denominator 1.75. Adaptive 2x2 bins of a 3x3 map cover rows/cols [0,2), [1,3).
        s = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        s[0, 0, 0, 0] = 3.0
        t = torch.zeros_like(s)
        full = 9 / 9
        level2 = (3 / 4) ** 2 / 4  # only the top-left bin holds the 3, averaged over 4 pixels
        level1 = (3 / 9) ** 2
        expected = (full + 0.5 * level2 + 0.25 * level1) / 1.75
        assert transkd_hcl_loss([s], [t]).item() == pytest.approx(expected, rel=1e-12)
        # a 1x1 map uses no level: plain MSE
        assert transkd_hcl_loss([torch.full((1, 2, 1, 1), 2.0)], [torch.zeros(1, 2, 1, 1)]).item() == 4.0

    def test_hcl_by_hand_on_a_wide_map_checks_the_height(self) -> None:
        # 2x5: only level 1 applies (2 >= 2 skips level 2), weight 1/2, denominator 1.5
        s = torch.zeros(1, 1, 2, 5, dtype=torch.float64)
        s[0, 0, 0] = torch.tensor([1.0, 2, 3, 4, 5])
        expected = (55 / 10 + 0.5 * (15 / 10) ** 2) / 1.5
        assert transkd_hcl_loss([s], [torch.zeros_like(s)]).item() == pytest.approx(expected, rel=1e-12)

    def test_hcl_matches_the_loop_reference_on_random_stages(self) -> None:
        torch.manual_seed(0)
        shapes = [(2, 3, 16, 20), (2, 5, 7, 9), (2, 4, 3, 5), (2, 2, 1, 2)]
        s = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
        t = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
        expected = hcl_np([x.numpy() for x in s], [x.numpy() for x in t])
        assert transkd_hcl_loss(s, t).item() == pytest.approx(expected, rel=1e-10)

    # ---- PEA ------------------------------------------------------------------------------------------
    def test_pea_by_hand(self) -> None:
        s = [torch.full((1, 2, 3), 2.0), torch.tensor([[[1.0, -1.0, 3.0]]])]
        t = [torch.zeros(1, 2, 3), torch.zeros(1, 1, 3)]
        expected = 0.1 * 4 + 0.5 * (1 + 1 + 9) / 3
        assert transkd_pea_loss(s, t, weights=(0.1, 0.5)).item() == pytest.approx(expected, rel=1e-6)

    def test_pea_through_the_distiller_applies_each_stage_projection(self) -> None:
        kd = _small(
            student_stages=["s1"], teacher_stages=["t1"], student_channels=[2], teacher_channels=[3],
            student_embeddings=["e1"], teacher_embeddings=["f1"], embedding_weights=[0.1],
        )  # fmt: skip
        with torch.no_grad():
            kd.projections[0].proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
            kd.projections[0].proj.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        s = {"s1": torch.randn(2, 2, 4, 4), "e1": torch.tensor([[1.0, 2.0]]).expand(2, 16, 2)}
        t = {"t1": torch.randn(2, 3, 4, 4), "f1": torch.zeros(2, 16, 3)}
        # every token projects to (1, 2, 1 + 2 + 1) = (1, 2, 4): MSE (1 + 4 + 16) / 3 = 7, times 0.1
        assert kd.terms(s, t)["pea"].item() == pytest.approx(0.7, rel=1e-6)
        assert isinstance(kd.projections[0].proj, nn.Linear)

    def test_pea_is_off_without_embeddings(self) -> None:
        kd = _small(student_embeddings=None, teacher_embeddings=None)
        s, t, _ = self.inputs()
        assert list(kd.terms(s, t)) == ["hcl"] and kd.term_names == ("hcl",)
        assert kd.student_layers == ("s1", "s2") and kd.teacher_layers == ("t1", "t2")
        assert len(kd.projections) == 0

    def test_hcl_term_is_scaled_by_hcl_weight(self) -> None:
        torch.manual_seed(0)
        kd = _small().eval()
        s, t, _ = self.inputs()
        fused = kd.fused_maps([s["s1"], s["s2"]], [t["t1"], t["t2"]])
        expected = 1.5 * hcl_np(
            [f.detach().double().numpy() for f in fused], [t["t1"].double().numpy(), t["t2"].double().numpy()]
        )
        assert kd.terms(s, t)["hcl"].item() == pytest.approx(expected, rel=1e-5)

    # ---- CSF ------------------------------------------------------------------------------------------
    def test_csf_shapes_structure_and_direction(self) -> None:
        torch.manual_seed(0)
        csf = CrossSelectiveFusion(student_channels=[32, 64, 160, 256], teacher_channels=[64, 128, 320, 512])
        maps = [torch.randn(2, c, 16 // 2**i, 20 // 2**i) for i, c in enumerate([32, 64, 160, 256])]
        out = csf(maps)
        assert [tuple(o.shape) for o in out] == [
            (2, 64, 16, 20),
            (2, 128, 8, 10),
            (2, 320, 4, 5),
            (2, 512, 2, 2),
        ]
        # the official SK sizes: 1x1 reduce without bias, 3x3 expand without bias, d = max(64/16, 32) = 32
        first, deepest = csf.stages[0], csf.stages[-1]
        assert first.conv1[0].weight.shape == (64, 32, 1, 1) and first.conv1[0].bias is None
        assert first.conv2[0].weight.shape == (64, 64, 3, 3) and first.conv2[0].bias is None
        assert first.fc[0].weight.shape == (32, 64, 1, 1) and first.fc[0].bias is None
        assert [tuple(h.weight.shape) for h in first.fcs] == [(64, 32, 1, 1)] * 2 and first.fcs[
            0
        ].bias is not None
        assert not deepest.fuse and not hasattr(deepest, "fc")
        # fused from the deepest stage up: a deeper input changes shallower outputs, never the reverse
        csf.eval()
        with torch.no_grad():
            base = csf(maps)
            shallow_changed = csf([maps[0] + 1, *maps[1:]])
            deep_changed = csf([*maps[:3], maps[3] + 1])
        assert all(torch.equal(a, b) for a, b in zip(base[1:], shallow_changed[1:]))
        assert not torch.allclose(base[0], deep_changed[0])

    def test_fusion_weights_sum_to_one(self) -> None:
        torch.manual_seed(0)
        stage = SelectiveFusion(8, 16, 12, fuse=True)
        x, y = torch.randn(3, 16, 6, 6), torch.randn(3, 16, 6, 6)
        logits = stage.branch_logits(x, y)
        assert logits.shape == (3, 2, 16, 1, 1)
        fused, weights = transkd_fuse(x, y, logits)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 16, 1, 1))
        assert bool((weights > 0).all() and (weights < 1).all())
        torch.testing.assert_close(fused, weights[:, 0] * x + weights[:, 1] * y)
        # equal logits: the plain average
        fused, _ = transkd_fuse(
            torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 3.0), torch.zeros(1, 2, 2, 1, 1)
        )
        torch.testing.assert_close(fused, torch.full((1, 2, 2, 2), 2.0))

    def test_selective_fusion_matches_numpy_reference(self) -> None:
        torch.manual_seed(0)
        stage = SelectiveFusion(5, 8, 7, fuse=True).double()
        for bn in (stage.conv1[1], stage.conv2[1], stage.fc[1]):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
        stage.eval()
        x, residual = (
            torch.randn(2, 5, 6, 8, dtype=torch.float64),
            torch.randn(2, 8, 3, 4, dtype=torch.float64),
        )
        out, fused = stage(x, residual)
        out_np, fused_np, _ = selective_fusion_np(stage, x.numpy(), residual.numpy())
        np.testing.assert_allclose(out.detach().numpy(), out_np, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fused.detach().numpy(), fused_np, rtol=1e-10, atol=1e-12)

    def test_kaiming_uniform_init_of_the_main_convolutions(self) -> None:
        torch.manual_seed(0)
        stage = SelectiveFusion(256, 64, 512, fuse=False)
        # kaiming_uniform_(a=1): bound = sqrt(6 / ((1 + a^2) fan_in)) = sqrt(3 / fan_in)
        for conv, fan_in in ((stage.conv1[0], 256), (stage.conv2[0], 64 * 9)):
            bound = math.sqrt(3 / fan_in)
            assert conv.weight.abs().max().item() <= bound
            # PyTorch's default (a = sqrt(5)) stops at 1 / sqrt(fan_in), sqrt(3) times smaller
            assert conv.weight.abs().max().item() > 0.95 * bound
            assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)

    def test_batch_of_one_fails_in_training_and_works_in_eval(self) -> None:
        kd = _small()
        s, t, _ = _inputs([(8, 10), (4, 5)], [(8, 10), (4, 5)], batch=1)
        with pytest.raises(ValueError, match=r"at least 2 images per batch in training.*batch_size >= 2"):
            kd(s, t)
        assert torch.isfinite(kd.eval()(s, t))

    # ---- errors -----------------------------------------------------------------------------------------
    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match=r"teacher_stages has 1 entries for 2 student stages"):
            _small(teacher_stages=["t1"])
        with pytest.raises(ValueError, match=r"student_channels has 3 entries for 2 student stages"):
            _small(student_channels=[4, 8, 16])
        with pytest.raises(ValueError, match=r"teacher_channels\[1\] must be a positive integer"):
            _small(teacher_channels=[6, 0])
        with pytest.raises(ValueError, match="both student_embeddings and teacher_embeddings"):
            _small(teacher_embeddings=None)
        with pytest.raises(ValueError, match=r"embedding_weights has 4 entries for 2 student embeddings"):
            _small(embedding_weights=[0.1, 0.1, 0.5, 1.0])
        with pytest.raises(ValueError, match=r"embedding_weights\[0\] must be a number >= 0"):
            _small(embedding_weights=[-1.0, 1.0])
        with pytest.raises(ValueError, match="hcl_weight must be a number >= 0"):
            _small(hcl_weight=-1.0)
        with pytest.raises(ValueError, match="resize_mode must be one of"):
            _small(resize_mode="cubic")
        with pytest.raises(ValueError, match="embedding_layout must be one of"):
            _small(embedding_layout="nhwc")
        with pytest.raises(ValueError, match="non-empty list of layer names"):
            _small(student_stages="s1")
        with pytest.raises(ValueError, match=r"3 embeddings and only 2 stages"):
            _small(
                embedding_layout="map", student_embeddings=["a", "b", "c"], teacher_embeddings=["d", "e", "f"],
                student_embedding_channels=[1, 1, 1], teacher_embedding_channels=[1, 1, 1],
                embedding_weights=[1, 1, 1],
            )  # fmt: skip

    def test_mismatched_channels_name_the_layer_and_shapes(self) -> None:
        kd = self.make()
        s, t, _ = self.inputs()
        bad = {**s, "s2": torch.randn(2, 9, 4, 5)}
        with pytest.raises(
            ValueError, match=r"built for 8 channels at the student stage 's2', got \(2, 9, 4, 5\)"
        ):
            kd(bad, t)
        bad = {**t, "t1": torch.randn(2, 5, 8, 10)}
        with pytest.raises(
            ValueError, match=r"built for 6 channels at the teacher stage 't1', got \(2, 5, 8, 10\)"
        ):
            kd(s, bad)
        bad = {**t, "f2": torch.randn(2, 20, 11)}
        with pytest.raises(
            ValueError, match=r"teacher embedding 'f2' gave \(2, 20, 11\); expected \(N, L, 12\)"
        ):
            kd(s, bad)
        bad = {**s, "e1": torch.randn(2, 80, 5)}
        with pytest.raises(
            ValueError, match=r"student embedding 'e1' gave \(2, 80, 5\); expected \(N, L, 4\)"
        ):
            kd(bad, t)
        bad = {**s, "e1": torch.randn(2, 81, 4)}
        with pytest.raises(ValueError, match=r"same batch and token count"):
            kd(bad, t)
        bad = {**t, "t2": torch.randn(3, 12, 4, 5)}
        with pytest.raises(ValueError, match="disagree on the batch size"):
            kd(s, bad)
        with pytest.raises(KeyError, match="tapped"):
            kd({"s1": s["s1"]}, t)

    def test_token_map_mix_ups_fail_clearly(self) -> None:
        kd = self.make()
        s, t, _ = self.inputs()
        # patch-embedding tokens named as a stage
        with pytest.raises(
            ValueError, match=r"student stage 's1' gave \(2, 80, 4\), \(N, L, C\) tokens.*backbone:0"
        ):
            kd({**s, "s1": s["e1"]}, t)
        with pytest.raises(ValueError, match=r"teacher stage 't2' gave .*tokens"):
            kd(s, {**t, "t2": t["f2"]})
        # a stage map named as an embedding
        with pytest.raises(
            ValueError, match=r"student embedding 'e1'.*\(N, C, H, W\) map.*backbone.layers.0.0:0.*'map'"
        ):
            kd({**s, "e1": s["s1"]}, t)
        with pytest.raises(
            ValueError, match=r"teacher embedding 'f1'.*a CNN teacher has no patch embeddings"
        ):
            kd(s, {**t, "f1": t["t1"]})
        # the map layout given tokens
        kd = _small(embedding_layout="map")
        with pytest.raises(ValueError, match=r"as a \(N, 4, H, W\) map.*looks like tokens"):
            kd(s, t)

    def test_map_layout_resamples_to_the_teacher_grid_from_its_stage_map(self) -> None:
        torch.manual_seed(0)
        kd = _small(embedding_layout="map").eval()
        s, t, _ = _inputs([(16, 20), (16, 20)], [(8, 10), (4, 5)])
        s["e1"], s["e2"] = torch.randn(2, 4, 16, 20), torch.randn(2, 8, 16, 20)  # CNN maps at stride 4
        terms = kd.terms(s, t)
        projected = [
            map_to_tokens(resample_to(p(s[k]), tuple(t[m].shape[-2:]), "bilinear"))
            for p, k, m in zip(kd.projections, ("e1", "e2"), ("t1", "t2"))
        ]
        assert [tuple(p.shape) for p in projected] == [(2, 80, 6), (2, 20, 12)]
        expected = transkd_pea_loss(projected, [t["f1"], t["f2"]], (0.5, 1.0))
        assert terms["pea"].item() == pytest.approx(expected.item(), rel=1e-6)
        with pytest.raises(ValueError, match=r"stage map 't1' \(8x10 = 80\).*'f1' has 81 tokens"):
            kd(s, {**t, "f1": torch.randn(2, 81, 6)})


# ---- real models: SegFormer-B0 student, B2 teacher, and a CNN on either side ----------------------------
# Building the mmseg models takes a few seconds each on CPU; the module-scoped fixtures build each once.
SEGFORMER = "segformer/segformer_mit-b{}_8xb1-160k_cityscapes-1024x1024"
B0_CHANNELS, B2_CHANNELS = [32, 64, 160, 256], [64, 128, 320, 512]


@pytest.fixture(scope="module")
def b0():
    from lightningkd.models import MMSegSegmenter

    torch.manual_seed(0)
    return MMSegSegmenter(SEGFORMER.format(0), num_classes=5)


@pytest.fixture(scope="module")
def b2():
    from lightningkd.models import MMSegSegmenter

    torch.manual_seed(1)
    return MMSegSegmenter(SEGFORMER.format(2), num_classes=5).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def fcn_r18():
    from lightningkd.models import MMSegSegmenter

    torch.manual_seed(2)
    return MMSegSegmenter("fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024", num_classes=5, aux_head=False)


def _run(kd: TransKD, student: nn.Module, teacher: nn.Module, images: torch.Tensor):
    s_tap, t_tap = FeatureTap(student, kd.student_layers), FeatureTap(teacher, kd.teacher_layers)
    try:
        s = s_tap(images)
        with torch.no_grad():
            t = t_tap(images)
    finally:
        s_tap.remove()
        t_tap.remove()
    return s, t


@pytest.mark.parametrize("size", [(64, 64), (64, 80)], ids=["64x64", "64x80"])
def test_segformer_b0_from_b2_through_the_tapped_layers(b0, b2, size) -> None:
    torch.manual_seed(0)
    kd = TransKD()  # the defaults: MiT-B0 -> MiT-B2 stage maps and patch embeddings
    assert kd.student_stages == SEGFORMER_STAGES and kd.teacher_embeddings == SEGFORMER_EMBEDDINGS
    b0.train().zero_grad()
    s, t = _run(kd, b0, b2, torch.randn(2, 3, *size))
    h, w = size
    for i, (cs, ct) in enumerate(zip(B0_CHANNELS, B2_CHANNELS)):
        grid = (math.ceil(h / 2 ** (i + 2)), math.ceil(w / 2 ** (i + 2)))  # stride 4, 8, 16, 32
        assert tuple(s[SEGFORMER_STAGES[i]].shape) == (2, cs, *grid)
        assert tuple(t[SEGFORMER_STAGES[i]].shape) == (2, ct, *grid)
        assert tuple(s[SEGFORMER_EMBEDDINGS[i]].shape) == (2, grid[0] * grid[1], cs)
        assert tuple(t[SEGFORMER_EMBEDDINGS[i]].shape) == (2, grid[0] * grid[1], ct)
    terms = kd.terms(s, t)
    assert list(terms) == ["hcl", "pea"] and all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert b0.backbone.layers[0][0].projection.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in kd.parameters())


def test_segformer_patch_embedding_tap_is_after_its_layernorm(b0) -> None:
    names = [f"backbone.layers.{i}.0.norm" for i in range(4)] + list(SEGFORMER_EMBEDDINGS)
    with FeatureTap(b0, names) as tap, torch.no_grad():
        features = tap(torch.randn(2, 3, 64, 80))
    for i in range(4):
        assert torch.equal(features[f"backbone.layers.{i}.0:0"], features[f"backbone.layers.{i}.0.norm"])
    assert isinstance(b0.backbone.layers[0][0].norm, nn.LayerNorm)


def test_segformer_student_from_a_cnn_teacher_resizes_the_fused_maps(b0, fcn_r18) -> None:
    # FCN-R18-d8 stages are at strides 4, 8, 8, 8; SegFormer's at 4, 8, 16, 32. A CNN teacher has no
    # patch embeddings: PEA off.
    fcn_r18.eval().requires_grad_(False)
    kd = TransKD(teacher_channels=[64, 128, 256, 512], student_embeddings=None, teacher_embeddings=None)
    b0.train().zero_grad()
    s, t = _run(kd, b0, fcn_r18, torch.randn(2, 3, 64, 80))
    assert [tuple(t[n].shape[-2:]) for n in SEGFORMER_STAGES] == [(16, 20), (8, 10), (8, 10), (8, 10)]
    assert [tuple(s[n].shape[-2:]) for n in SEGFORMER_STAGES] == [(16, 20), (8, 10), (4, 5), (2, 3)]
    fused = kd.fused_maps([s[n] for n in SEGFORMER_STAGES], [t[n] for n in SEGFORMER_STAGES])
    assert [tuple(f.shape) for f in fused] == [
        (2, 64, 16, 20),
        (2, 128, 8, 10),
        (2, 256, 8, 10),
        (2, 512, 8, 10),
    ]
    loss = kd(s, t)
    assert list(kd.terms(s, t)) == ["hcl"] and torch.isfinite(loss)
    loss.backward()
    assert b0.backbone.layers[3][0].projection.weight.grad.abs().sum() > 0


def test_cnn_student_from_a_segformer_teacher_with_map_embeddings(b2, fcn_r18) -> None:
    # The CNN student's first two stages stand in for patch embeddings: projected, resampled to the
    # teacher's (non-square) grid read from its stage maps, flattened to tokens.
    fcn_r18.train().requires_grad_(True).zero_grad()
    kd = TransKD(
        student_stages=["backbone:0", "backbone:1", "backbone:2", "backbone:3"],
        student_channels=[64, 128, 256, 512],
        teacher_channels=B2_CHANNELS,
        student_embeddings=["backbone.layer1", "backbone.layer2"],
        teacher_embeddings=list(SEGFORMER_EMBEDDINGS[:2]),
        embedding_layout="map",
        embedding_weights=[0.1, 0.1],
    )
    assert kd.student_embedding_channels == (64, 128) and kd.teacher_embedding_channels == (64, 128)
    s, t = _run(kd, fcn_r18, b2, torch.randn(2, 3, 64, 80))
    terms = kd.terms(s, t)
    assert list(terms) == ["hcl", "pea"] and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert fcn_r18.backbone.stem[0].weight.grad.abs().sum() > 0  # (mmseg zero-inits each block's last BN)
