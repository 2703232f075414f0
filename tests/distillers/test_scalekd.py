import math
from collections import OrderedDict

import lightning as L
import numpy as np
import pytest
import scipy.fft
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightningkd.adapters import map_to_tokens, tokens_to_map
from lightningkd.distillers import KD, Distiller, PerLevel, ScaleKD
from lightningkd.distillers.scalekd import CrossAttentionProjector
from lightningkd.functional.scalekd import (
    dct_2d,
    dct_matrix,
    dfm_dc_removed_loss,
    dfm_loss,
    idct_2d,
    remove_dc,
    scalekd_logit_loss,
    scalekd_terms,
)
from lightningkd.modules import ClassificationDistillationModule
from tests.distiller_tester import DistillerTester
from tests.toys import toy_classifier, toy_loader

TERMS = ("s3", "s3_alt", "s4", "s4_alt", "kd")


# ---- the paper's equations in plain Python / numpy loops (independent of the code under test) -----------
def dct_by_hand(x: np.ndarray) -> np.ndarray:
    """2-D DCT-II without normalisation of one ``(H, W)`` array, as explicit cosine sums:
    ``X[u, v] = sum_i sum_j 2 cos(pi u (2i+1) / 2H) 2 cos(pi v (2j+1) / 2W) x[i, j]``."""
    h, w = x.shape
    out = np.zeros((h, w))
    for u in range(h):
        for v in range(w):
            out[u, v] = sum(
                2 * math.cos(math.pi * u * (2 * i + 1) / (2 * h))
                * 2 * math.cos(math.pi * v * (2 * j + 1) / (2 * w))
                * x[i, j]
                for i in range(h)
                for j in range(w)
            )  # fmt: skip
    return out


def idct_by_hand(coef: np.ndarray) -> np.ndarray:
    """The inverse (scaled DCT-III) as explicit sums: ``x[i, j] = sum_u sum_v a_u b_v X[u, v] cos() cos()``
    with ``a_0 = 1 / 2H``, ``a_u = 1 / H`` (and ``b`` likewise with ``W``)."""
    h, w = coef.shape
    a = [1 / (2 * h)] + [1 / h] * (h - 1)
    b = [1 / (2 * w)] + [1 / w] * (w - 1)
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = sum(
                a[u] * b[v] * coef[u, v]
                * math.cos(math.pi * u * (2 * i + 1) / (2 * h))
                * math.cos(math.pi * v * (2 * j + 1) / (2 * w))
                for u in range(h)
                for v in range(w)
            )  # fmt: skip
    return out


def remove_dc_by_hand(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)``: per channel, DCT by hand, DC coefficient zeroed, inverse by hand."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            coef = dct_by_hand(x[n, c])
            coef[0, 0] = 0.0
            out[n, c] = idct_by_hand(coef)
    return out


def dfm_by_hand(s: np.ndarray, t: np.ndarray, alpha: float) -> float:
    """``alpha / N * sum over images and positions of |s/|s| - t/|t||^2`` with channel vectors."""
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                sv, tv = s[i, :, y, x], t[i, :, y, x]
                sn = math.sqrt(sum(v * v for v in sv))
                tn = math.sqrt(sum(v * v for v in tv))
                total += sum((a / sn - b / tn) ** 2 for a, b in zip(sv, tv))
    return alpha * total / n


def soft_ce_by_hand(zs: np.ndarray, zt: np.ndarray, alpha: float, temp: float) -> float:
    total = 0.0
    for rs, rt in zip(zs, zt):
        es = [math.exp(v / temp) for v in rs]
        et = [math.exp(v / temp) for v in rt]
        total -= sum(b / sum(et) * math.log(a / sum(es)) for a, b in zip(es, et))
    return alpha * temp**2 * total / len(zs)


def cap_by_hand(cap: CrossAttentionProjector, x: np.ndarray, query: np.ndarray | None) -> np.ndarray:
    """The CAP of one image in numpy loops (eval mode: BatchNorm with its running statistics).

    ``x`` ``(C_s, H, W)``, ``query`` ``(C_t, H_q, W_q)`` or None (the embedding rows in row-major order).
    """
    w = {k: v.detach().double().numpy() for k, v in cap.state_dict().items()}
    c_s, h, wd = x.shape
    conv_w, conv_b = w["proj_student.0.weight"], w["proj_student.0.bias"]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    conv = np.zeros((c_s, h, wd))
    for o in range(c_s):
        for i in range(h):
            for j in range(wd):
                conv[o, i, j] = conv_b[o] + (conv_w[o] * xp[:, i : i + 3, j : j + 3]).sum()
    mean, var = w["proj_student.1.running_mean"], w["proj_student.1.running_var"]
    gamma, beta = w["proj_student.1.weight"], w["proj_student.1.bias"]
    bn = (conv - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * gamma[:, None, None]
    keys = np.maximum(bn + beta[:, None, None], 0) + w["pos_embed"][0]
    keys = keys.reshape(c_s, h * wd).T  # (L, C_s), row-major positions
    hq, wq = cap.query_hw
    c_t = cap.out_channels
    if query is None:
        q_map = w["query.weight"]  # (H_q*W_q, C_t)
    else:
        q_map = query.reshape(c_t, hq * wq).T
    q_map = np.maximum(q_map @ w["proj_query.0.weight"][:, :, 0, 0].T + w["proj_query.0.bias"], 0)
    q = q_map @ w["q.weight"].T + w["q.bias"]
    k = keys @ w["k.weight"].T + w["k.bias"]
    v = keys @ w["v.weight"].T + w["v.bias"]
    heads = cap.num_heads
    d = c_t // heads
    out = np.zeros((hq * wq, c_t))
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        for i in range(hq * wq):
            logits = [float(q[i, sl] @ k[j, sl]) / math.sqrt(d) * cap.softmax_scale for j in range(h * wd)]
            top = max(logits)
            e = [math.exp(z - top) for z in logits]
            out[i, sl] = sum(e[j] / sum(e) * v[j, sl] for j in range(h * wd))
    out = out @ w["proj.weight"].T + w["proj.bias"]
    mu = out.mean(axis=1, keepdims=True)
    sd = np.sqrt(((out - mu) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    ln = (out - mu) / sd * w["norm.weight"] + w["norm.bias"]
    ffn = np.maximum(ln @ w["ffn.0.weight"].T + w["ffn.0.bias"], 0) @ w["ffn.2.weight"].T + w["ffn.2.bias"]
    return (ln + ffn).T.reshape(c_t, hq, wq)


# ---- small models ------------------------------------------------------------------------------------
def conv_teacher(c_in: int = 6, c_out: int = 8, seed: int = 0) -> nn.Module:
    """A frozen "teacher" whose module ``stage`` maps a (c_in, 4, 4) map to (c_out, 2, 2)."""
    torch.manual_seed(seed)
    stage = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.GELU())
    stage[1].running_mean.normal_()
    stage[1].running_var.uniform_(0.5, 2.0)
    return nn.Sequential(OrderedDict(stage=stage)).requires_grad_(False).eval()


class TokenStage(nn.Module):
    """A ViT-like later stage on patch tokens: (N, 16, c_in) on a 4x4 grid -> (N, 4, c_out) on 2x2."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, c = x.shape
        grid = x.transpose(1, 2).reshape(n, c, 4, 4)
        pooled = nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (N, 4, c_in)
        return nn.functional.gelu(self.fc(pooled))


def token_teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(blocks=TokenStage(6, 8))).requires_grad_(False).eval()


SMALL = dict(
    student_s3_layer="s3",
    student_s4_layer="s4",
    teacher_layer="t",
    teacher_stages=["stage"],
    student_s3_channels=5,
    student_s4_channels=7,
    teacher_s3_channels=6,
    teacher_channels=8,
    student_s3_hw=(4, 4),
    student_s4_hw=(3, 3),
    teacher_s3_hw=(4, 4),
    teacher_hw=(2, 2),
    num_heads_s3=2,
    num_heads_s4=2,
    teacher_layout="nchw",
    stage_layout="nchw",
)


def small_scalekd(**overrides) -> ScaleKD:
    return ScaleKD(**{**SMALL, **overrides})


class TestScaleKD(DistillerTester):
    """CNN maps on both sides; the teacher's later stage is a conv + BN + GELU (nchw)."""

    term_names = TERMS
    # Wider bf16/fp16 tolerance (measured: bf16 2.1e-2, fp16 1.7e-3 of the loss): the DC-removed terms
    # subtract each channel's spatial mean from the CAP outputs, and on these tiny random 2x2 maps the mean
    # is ~10^3 times the residual, so the half-precision rounding of the CAPs' and teacher stages' outputs
    # (adapters under autocast) is amplified by that ratio. The loss maths is float32: with the CAPs and
    # the teacher stages run in float32, the bf16 and fp16 losses equal the float32 loss exactly.
    half_rtol = {torch.bfloat16: 5e-2, torch.float16: 5e-3}
    yaml_config = (
        "class_path: lightningkd.distillers.ScaleKD\n"
        "init_args: {student_s3_layer: blocks.8, student_s4_layer: norm, teacher_layer: norm,"
        " teacher_stages: [layers.3, norm], student_s3_channels: 12, student_s4_channels: 12,"
        " teacher_s3_channels: 16, teacher_channels: 32, student_s3_hw: [4, 4], student_s4_hw: [4, 4],"
        " teacher_s3_hw: [4, 4], teacher_hw: [2, 2], num_heads_s3: 2, num_heads_s4: 4, student_layout: tokens,"
        " student_prefix_tokens: 1, alpha_s4: [0.08, 0.0], softmax_scale: [5.0, 4.0], kd_alpha: 0.25}"
    )

    def make(self) -> ScaleKD:
        distiller = small_scalekd()
        distiller.attach_teacher(conv_teacher())
        return distiller

    def inputs(self):
        student = {
            "s3": torch.randn(2, 5, 4, 4, requires_grad=True),
            "s4": torch.randn(2, 7, 3, 3, requires_grad=True),
            "output": torch.randn(2, 10, requires_grad=True),
        }
        return student, {"t": torch.randn(2, 8, 2, 2), "output": torch.randn(2, 10)}, None

    def twin(self, distiller, student, teacher, batch):
        terms = scalekd_terms(
            student["s3"],
            student["s4"],
            teacher["t"],
            cap_s3=distiller.cap_s3,
            cap_s3_alt=distiller.cap_s3_alt,
            cap_s4=distiller.cap_s4,
            cap_s4_alt=distiller.cap_s4_alt,
            teacher_stage=distiller.run_teacher_stages,
            alpha_s3=distiller.alpha_s3,
            alpha_s4=distiller.alpha_s4,
            student_logits=student["output"],
            teacher_logits=teacher["output"],
            kd_alpha=distiller.kd_alpha,
            temperature=distiller.temperature,
        )
        return sum(terms.values())


class TestScaleKDTokens(DistillerTester):
    """A ViT student (tokens with a class token), a Swin-like teacher (NHWC final features) whose later
    stage takes tokens; no logit term."""

    term_names = TERMS[:4]
    yaml_config = TestScaleKD.yaml_config
    # As TestScaleKD (the DC-removed views amplify the adapters' half-precision rounding by the ratio of
    # the spatial mean to the residual, ~5e3 here); measured: bf16 8.7e-2, fp16 7.0e-2 of the loss.
    half_rtol = {torch.bfloat16: 0.2, torch.float16: 0.2}

    def make(self) -> ScaleKD:
        distiller = small_scalekd(
            teacher_stages=["blocks"],
            student_layout="tokens",
            student_prefix_tokens=1,
            teacher_layout="nhwc",
            stage_layout="tokens",
            kd_alpha=0.0,
        )
        distiller.attach_teacher(token_teacher())
        return distiller

    def inputs(self):
        student = {
            "s3": torch.randn(2, 1 + 16, 5, requires_grad=True),
            "s4": torch.randn(2, 1 + 9, 7, requires_grad=True),
        }
        return student, {"t": torch.randn(2, 2, 2, 8)}, None

    def twin(self, distiller, student, teacher, batch):
        def stage(x):  # the token stage as a map-to-map function, with the distiller's layout adapters
            return tokens_to_map(distiller._stage_modules[0](map_to_tokens(x)), grid=(2, 2))

        terms = scalekd_terms(
            tokens_to_map(student["s3"], prefix_tokens=1, grid=(4, 4)),
            tokens_to_map(student["s4"], prefix_tokens=1, grid=(3, 3)),
            tokens_to_map(teacher["t"], layout="nhwc"),
            cap_s3=distiller.cap_s3,
            cap_s3_alt=distiller.cap_s3_alt,
            cap_s4=distiller.cap_s4,
            cap_s4_alt=distiller.cap_s4_alt,
            teacher_stage=stage,
            alpha_s3=distiller.alpha_s3,
            alpha_s4=distiller.alpha_s4,
        )
        return sum(terms.values())


# ---- the DCT and the two DFM views ------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(4, 4), (3, 5)], ids=["square", "non-square"])
def test_dct_matches_explicit_cosine_sums_and_scipy(hw) -> None:
    torch.manual_seed(0)
    h, w = hw
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    coef = dct_2d(x)
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(
                coef[n, c].numpy(), dct_by_hand(x[n, c].numpy()), rtol=1e-10, atol=1e-10
            )
            # scipy's unnormalised DCT-II along both axes is a second, independent reference
            ref = scipy.fft.dct(scipy.fft.dct(x[n, c].numpy(), type=2, axis=0), type=2, axis=1)
            np.testing.assert_allclose(coef[n, c].numpy(), ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(
                idct_2d(coef)[n, c].numpy(), idct_by_hand(coef[n, c].numpy()), atol=1e-10
            )
    torch.testing.assert_close(idct_2d(coef), x, rtol=0, atol=1e-10)
    # one matrix per axis; for a square map the two are the same matrix
    assert torch.equal(dct_matrix(h, dtype=torch.float64), dct_matrix(hw[0], dtype=torch.float64))
    np.testing.assert_allclose(
        dct_matrix(w, dtype=torch.float64).numpy(), scipy.fft.dct(np.eye(w), type=2, axis=0), atol=1e-12
    )
    np.testing.assert_allclose(
        dct_matrix(w, inverse=True, dtype=torch.float64).numpy(), scipy.fft.idct(np.eye(w), type=2, axis=0),
        atol=1e-12,
    )  # fmt: skip


@pytest.mark.parametrize("hw", [(4, 4), (3, 5), (1, 6)], ids=["square", "non-square", "one-row"])
def test_removing_the_dc_coefficient_subtracts_the_spatial_mean(hw) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, *hw, dtype=torch.float64) + 5.0
    got = remove_dc(x)
    np.testing.assert_allclose(got.numpy(), remove_dc_by_hand(x.numpy()), atol=1e-10)
    # the property the paper uses: the DC-removed view is the map minus each channel's spatial mean
    torch.testing.assert_close(got, x - x.mean(dim=(2, 3), keepdim=True), rtol=0, atol=1e-10)


def test_dfm_direct_view_by_hand() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 2, 3, dtype=torch.float64), torch.randn(2, 3, 2, 3, dtype=torch.float64)
    expected = dfm_by_hand(s.numpy(), t.numpy(), 0.08)
    assert dfm_loss(s, t, alpha=0.08).item() == pytest.approx(expected, rel=1e-12)
    # two positions of one image, worked by hand: (3, 4) vs (0, 1) -> (0.6, 0.8) vs (0, 1): 0.36 + 0.04;
    # (1, 0) vs (1, 0): 0. Batch of 1, alpha 1: 0.4
    s1 = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]], dtype=torch.float64)
    t1 = torch.tensor([[[[0.0, 2.0]], [[1.0, 0.0]]]], dtype=torch.float64)
    assert dfm_loss(s1, t1, alpha=1.0).item() == pytest.approx(0.4, rel=1e-12)


@pytest.mark.parametrize("hw", [(3, 3), (2, 4)], ids=["square", "non-square"])
def test_dfm_dc_removed_view_by_hand(hw) -> None:
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, *hw, dtype=torch.float64), torch.randn(2, 4, *hw, dtype=torch.float64)
    expected = dfm_by_hand(remove_dc_by_hand(s.numpy()), remove_dc_by_hand(t.numpy()), 0.06)
    assert dfm_dc_removed_loss(s, t, alpha=0.06).item() == pytest.approx(expected, rel=1e-10)
    # the view ignores a per-channel offset, the direct view does not
    offset = torch.randn(2, 4, 1, 1, dtype=torch.float64) * 3
    assert dfm_dc_removed_loss(s + offset, t, alpha=0.06).item() == pytest.approx(expected, rel=1e-10)
    assert dfm_loss(s + offset, t).item() != pytest.approx(dfm_loss(s, t).item(), rel=1e-3)


def test_logit_term_is_the_official_soft_cross_entropy() -> None:
    torch.manual_seed(4)
    zs, zt = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    for alpha, temp in ((0.5, 1.0), (1.0, 4.0)):
        expected = soft_ce_by_hand(zs.numpy(), zt.numpy(), alpha, temp)
        got = scalekd_logit_loss(zs, zt, alpha=alpha, temperature=temp)
        assert got.item() == pytest.approx(expected, rel=1e-12)
    # KD's KL differs from it by the teacher's entropy only: the same gradient
    zs.requires_grad_(True)
    (g1,) = torch.autograd.grad(scalekd_logit_loss(zs, zt, alpha=1.0, temperature=2.0), zs)
    (g2,) = torch.autograd.grad(KD(temperature=2.0)({"output": zs}, {"output": zt}), zs)
    torch.testing.assert_close(g1, g2)


# ---- the cross-attention projector ---------------------------------------------------------------------
@pytest.mark.parametrize("self_query", [True, False])
def test_cap_by_hand(self_query: bool) -> None:
    torch.manual_seed(5)
    cap = CrossAttentionProjector(
        in_channels=3, out_channels=4, in_hw=(3, 2), query_hw=(2, 3), num_heads=2, softmax_scale=5.0,
        self_query=self_query,
    ).double().eval()  # fmt: skip
    cap.proj_student[1].running_mean.normal_()
    cap.proj_student[1].running_var.uniform_(0.5, 2.0)
    cap.proj_student[1].weight.data.normal_()
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    query = None if self_query else torch.randn(2, 4, 2, 3, dtype=torch.float64)
    got = cap(x, query)
    assert got.shape == (2, 4, 2, 3)
    for n in range(2):
        q = None if query is None else query[n].numpy()
        np.testing.assert_allclose(got[n].detach().numpy(), cap_by_hand(cap, x[n].numpy(), q), atol=1e-10)


def test_cap_init_as_official() -> None:
    torch.manual_seed(6)
    cap = CrossAttentionProjector(
        in_channels=16, out_channels=32, in_hw=(14, 14), query_hw=(7, 7), num_heads=4
    )
    assert cap.pos_embed.shape == (1, 16, 14, 14)
    assert cap.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)  # trunc-normal std 0.02
    assert cap.query.weight.shape == (49, 32)
    assert cap.query.weight.std().item() == pytest.approx(1.0, rel=0.1)  # nn.Embedding: N(0, 1)
    assert [type(m) for m in cap.proj_student] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert cap.proj_student[0].kernel_size == (3, 3) and cap.proj_student[0].padding == (1, 1)
    assert [type(m) for m in cap.ffn] == [nn.Linear, nn.ReLU, nn.Linear]
    assert cap.ffn[0].out_features == 128  # 4x hidden
    no_query = CrossAttentionProjector(
        in_channels=16, out_channels=32, in_hw=(14, 14), query_hw=(7, 7), num_heads=4, self_query=False
    )
    assert no_query.query is None


@pytest.mark.parametrize(
    ("c_in", "in_hw", "c_out", "query_hw", "heads", "self_query"),
    [
        (1024, (14, 14), 768, (14, 14), 16, True),  # Swin-L -> ResNet-50, stage 3
        (2048, (7, 7), 1536, (7, 7), 24, False),  # Swin-L -> ResNet-50, stage 4 with 7x7 TPP queries
        (768, (14, 14), 768, (14, 14), 8, True),  # Swin-L -> DeiT-B, stage 3
        (768, (14, 14), 1536, (7, 7), 8, False),  # Swin-L -> DeiT-B, stage 4: 14x14 tokens -> 7x7
    ],
)
def test_cap_output_shapes_at_official_sizes(c_in, in_hw, c_out, query_hw, heads, self_query) -> None:
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        cap = CrossAttentionProjector(
            in_channels=c_in, out_channels=c_out, in_hw=in_hw, query_hw=query_hw, num_heads=heads,
            self_query=self_query,
        )  # fmt: skip
        query = None if self_query else torch.empty(2, c_out, *query_hw)
        out = cap(torch.empty(2, c_in, *in_hw), query)
    assert out.shape == (2, c_out, *query_hw)


def test_official_sizes_for_tokens_and_cnn_maps() -> None:
    """The distiller's defaults are Swin-L -> ResNet-50; a DeiT-B student reads 14x14 tokens at both stages."""
    with torch.device("meta"):
        r50 = ScaleKD()
        deit = ScaleKD(
            student_s3_layer="blocks.8", student_s4_layer="norm", student_s3_channels=768, student_s4_channels=768,
            student_s4_hw=(14, 14), num_heads_s3=8, num_heads_s4=8, student_layout="tokens",
            student_prefix_tokens=1,
        )  # fmt: skip
    assert (r50.cap_s3.in_channels, r50.cap_s3.out_channels, r50.cap_s3.query_hw) == (1024, 768, (14, 14))
    assert (r50.cap_s4.in_channels, r50.cap_s4.out_channels, r50.cap_s4.query_hw) == (2048, 1536, (7, 7))
    assert r50.cap_s4.query is None and r50.cap_s3.query is not None
    assert (r50.cap_s3.num_heads, r50.cap_s4.num_heads, r50.cap_s3_alt.softmax_scale) == (16, 24, 5.0)
    tokens = torch.empty(2, 1 + 196, 768, device="meta")
    assert deit.student_s4_to_map(tokens).shape == (2, 768, 14, 14)
    assert (deit.cap_s4.in_hw, deit.cap_s4.query_hw) == ((14, 14), (7, 7))


# ---- the whole distiller against the references -----------------------------------------------------
def test_terms_match_the_references_end_to_end() -> None:
    """Every term from the CAPs by hand, the teacher's stage, the DFM views by hand and the soft CE by hand."""
    torch.manual_seed(7)
    distiller = small_scalekd(alpha_s3=(0.5, 0.25), alpha_s4=(0.75, 1.5), kd_alpha=0.5, temperature=2.0)
    teacher = conv_teacher().double()
    distiller.attach_teacher(teacher)
    distiller = distiller.double().eval()
    s3, s4 = torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, 7, 3, 3, dtype=torch.float64)
    t, zs, zt = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 8, 2, 2), (2, 6), (2, 6)))
    got = distiller.terms({"s3": s3, "s4": s4, "output": zs}, {"t": t, "output": zt})
    assert tuple(got) == TERMS
    stage = teacher.stage
    expected = {}
    for view, key3, key4, a3, a4 in ((0, "s3", "s4", 0.5, 0.75), (1, "s3_alt", "s4_alt", 0.25, 1.5)):
        caps = (
            (distiller.cap_s3, distiller.cap_s4)
            if view == 0
            else (distiller.cap_s3_alt, distiller.cap_s4_alt)
        )
        projected = np.stack([cap_by_hand(caps[0], s3[n].numpy(), None) for n in range(2)])
        with torch.no_grad():
            q = stage(torch.from_numpy(projected)).numpy()  # TPP: the teacher's own stage
        s4_proj = np.stack([cap_by_hand(caps[1], s4[n].numpy(), q[n]) for n in range(2)])
        prep = (lambda a: a) if view == 0 else remove_dc_by_hand
        expected[key3] = dfm_by_hand(prep(q), prep(t.numpy()), a3)
        expected[key4] = dfm_by_hand(prep(s4_proj), prep(t.numpy()), a4)
    expected["kd"] = soft_ce_by_hand(zs.numpy(), zt.numpy(), 0.5, 2.0)
    for key in TERMS:
        assert got[key].item() == pytest.approx(expected[key], rel=1e-8), key


def test_gradients_pass_through_the_frozen_teacher_stage() -> None:
    """With the stage-4 and logit terms off, the stage-3 CAPs reach the loss only through the teacher's stage:
    they get gradients, the teacher's parameters get none, and changing the stage changes the loss."""
    torch.manual_seed(8)
    distiller = small_scalekd(alpha_s4=(0.0, 0.0), kd_alpha=0.0)
    teacher = conv_teacher()
    distiller.attach_teacher(teacher)
    student = {"s3": torch.randn(2, 5, 4, 4, requires_grad=True), "s4": torch.randn(2, 7, 3, 3)}
    t = {"t": torch.randn(2, 8, 2, 2)}
    loss = distiller(student, t)
    loss.backward()
    assert student["s3"].grad.abs().sum() > 0
    for name, p in distiller.cap_s3.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        teacher.stage[0].weight.mul_(2.0)
    assert distiller(student, t).item() != pytest.approx(loss.item(), rel=1e-6)


def test_teacher_stages_are_not_parameters_state_or_submodules() -> None:
    distiller = small_scalekd()
    before = (list(distiller.state_dict()), [n for n, _ in distiller.named_parameters()])
    teacher = conv_teacher()
    distiller.attach_teacher(teacher)
    assert (list(distiller.state_dict()), [n for n, _ in distiller.named_parameters()]) == before
    teacher_ids = {id(m) for m in teacher.modules()}
    assert not teacher_ids & {id(m) for m in distiller.modules()}
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in distiller.parameters()}
    assert all(k.startswith("cap_") for k in distiller.state_dict())  # only the four CAPs are saved
    assert distiller._stage_modules == (teacher.stage,)


# ---- the teacher hook in the modules ------------------------------------------------------------------
class Recorder(KD):
    """KD that records the teacher it is given."""

    def attach_teacher(self, teacher: nn.Module) -> None:
        self.attached = (
            teacher,
            all(not p.requires_grad for p in teacher.parameters()),
            not teacher.training,
        )


def test_module_attaches_the_frozen_teacher_to_every_distiller_and_per_level_forwards_it() -> None:
    student, teacher = toy_classifier(seed=0), toy_classifier(seed=1)
    direct = Recorder()
    levels = PerLevel(distiller=Recorder(), levels=["a", "b"], student_layer="stem", teacher_layer="stem")
    ClassificationDistillationModule(student, teacher, [direct, levels], num_classes=4)
    assert direct.attached == (teacher, True, True)  # frozen and in eval mode before the hook runs
    assert [levels.level(k).attached for k in ("a", "b")] == [(teacher, True, True)] * 2
    assert Distiller.attach_teacher(KD(), teacher) is None  # the default keeps nothing
    assert not hasattr(KD(), "attached")


# ---- training through Lightning ------------------------------------------------------------------------
def tiny_cnn(widths: tuple[int, int, int], num_classes: int = 4, seed: int = 0, bn_in_layer4: bool = True):
    """Stem 32 -> 8 px, layer3 8 -> 4, layer4 4 -> 2, pool, fc."""
    torch.manual_seed(seed)
    a, b, c = widths

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, a, 3, stride=4, padding=1), nn.BatchNorm2d(a), nn.ReLU()),
            layer3=block(a, b),
            layer4=block(b, c),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(c, num_classes),
        )
    )


def tiny_swin(seed: int = 1) -> nn.Module:
    """timm Swin on 32x32 images: stages 16, 8, 4, 2 px with 8, 16, 32, 64 channels."""
    torch.manual_seed(seed)
    return SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
        num_classes=4,
    )  # fmt: skip


def tiny_vit(seed: int = 0) -> nn.Module:
    """timm ViT on 32x32 images: 8-pixel patches (4x4 grid + class token), width 12, 4 blocks."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=12, depth=4, num_heads=2, num_classes=4)


class GradientProbe(L.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float | bool]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        d = pl_module.distillers[0]
        norm = lambda ps: sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None)  # noqa: E731
        self.seen.append(
            {
                "cap_s3": norm(d.cap_s3.parameters()) > 0 and norm(d.cap_s3_alt.parameters()) > 0,
                "cap_s4": norm(d.cap_s4.parameters()) > 0 and norm(d.cap_s4_alt.parameters()) > 0,
                "student": norm(pl_module.student.parameters()) > 0,
                "teacher_grad": any(p.grad is not None for p in pl_module.teacher.parameters()),
                "teacher_eval": not any(m.training for m in pl_module.teacher.modules()),
            }
        )


PAIRS = {
    # a transformer teacher (timm Swin, NHWC stages) -> a CNN student
    "swin_to_cnn": (
        lambda: tiny_cnn((8, 12, 16)),
        tiny_swin,
        dict(
            student_s3_layer="layer3", student_s4_layer="layer4", teacher_layer="norm",
            teacher_stages=["layers.3", "norm"], student_s3_channels=12, student_s4_channels=16,
            teacher_s3_channels=32, teacher_channels=64, student_s3_hw=(4, 4), student_s4_hw=(2, 2),
            teacher_s3_hw=(4, 4), teacher_hw=(2, 2), num_heads_s3=2, num_heads_s4=4,
        ),
    ),
    # a CNN teacher (BatchNorm in the stage TPP runs) -> a ViT student (tokens with a class token)
    "cnn_to_vit": (
        tiny_vit,
        lambda: tiny_cnn((8, 16, 24), seed=1),
        dict(
            student_s3_layer="blocks.2", student_s4_layer="norm", teacher_layer="layer4",
            teacher_stages=["layer4"], student_s3_channels=12, student_s4_channels=12,
            teacher_s3_channels=16, teacher_channels=24, student_s3_hw=(4, 4), student_s4_hw=(4, 4),
            teacher_s3_hw=(4, 4), teacher_hw=(2, 2), num_heads_s3=2, num_heads_s4=2, student_layout="tokens",
            student_prefix_tokens=1, teacher_layout="nchw", stage_layout="nchw",
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_training_keeps_the_teacher_frozen_and_out_of_optimizer_and_checkpoint(pair: str, tmp_path) -> None:
    make_student, make_teacher, sizes = PAIRS[pair]
    student, teacher = make_student(), make_teacher()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = ScaleKD(**sizes)
    module = ClassificationDistillationModule(student, teacher, [distiller], num_classes=4, task_weight=0.5)
    probe = GradientProbe()
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader(n=12, size=32, batch_size=4))
    assert trainer.global_step == 3 and len(probe.seen) == 3
    for step in probe.seen:
        assert step == {
            "cap_s3": True,
            "cap_s4": True,
            "student": True,
            "teacher_grad": False,
            "teacher_eval": True,
        }
    after = teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)  # BN statistics too
    assert not distiller.needs_teacher_grad
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in distiller.parameters()} <= optimised
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")]
    saved = {k for k in state if k.startswith("distillers.")}
    assert saved == {f"distillers.0.{k}" for k in distiller.state_dict()}
    assert all(k.startswith("distillers.0.cap_") for k in saved)


# ---- bad input -----------------------------------------------------------------------------------------
def test_used_before_attach_teacher_fails_clearly() -> None:
    distiller = small_scalekd(kd_alpha=0.0)
    student = {"s3": torch.randn(2, 5, 4, 4), "s4": torch.randn(2, 7, 3, 3)}
    with pytest.raises(RuntimeError, match=r"attach_teacher\(teacher\)"):
        distiller(student, {"t": torch.randn(2, 8, 2, 2)})


def test_attach_teacher_rejects_unknown_names_and_trainable_stages() -> None:
    swin = tiny_swin()
    with pytest.raises(ValueError, match=r"\['layers.4'\].*Close names: \[.*'layers.3'.*top-level paths"):
        ScaleKD(**{**PAIRS["swin_to_cnn"][2], "teacher_stages": ["layers.4", "norm"]}).attach_teacher(
            swin.requires_grad_(False)
        )
    with pytest.raises(ValueError, match="trainable parameters.*requires_grad_"):
        small_scalekd().attach_teacher(nn.Sequential(OrderedDict(stage=nn.Conv2d(6, 8, 3))))


def test_wrong_input_sizes_name_expected_and_actual() -> None:
    distiller = small_scalekd(kd_alpha=0.0)
    distiller.attach_teacher(conv_teacher())
    s3, s4, t = torch.randn(2, 5, 4, 4), torch.randn(2, 7, 3, 3), torch.randn(2, 8, 2, 2)
    with pytest.raises(
        ValueError, match=r"stage-3 features 's3' are \(2, 5, 8, 8\).*built for \(N, 5, 4, 4\)"
    ):
        distiller({"s3": torch.randn(2, 5, 8, 8), "s4": s4}, {"t": t})
    with pytest.raises(ValueError, match=r"stage-4 features 's4' are \(2, 6, 3, 3\).*\(N, 7, 3, 3\)"):
        distiller({"s3": s3, "s4": torch.randn(2, 6, 3, 3)}, {"t": t})
    with pytest.raises(ValueError, match=r"teacher's final features 't' are \(2, 8, 4, 4\).*\(N, 8, 2, 2\)"):
        distiller({"s3": s3, "s4": s4}, {"t": torch.randn(2, 8, 4, 4)})
    with pytest.raises(ValueError, match="batch sizes differ"):
        distiller({"s3": s3, "s4": s4}, {"t": torch.randn(3, 8, 2, 2)})
    with pytest.raises(KeyError, match="tapped"):
        distiller({"s3": s3}, {"t": t})
    tokens = small_scalekd(student_layout="tokens", student_prefix_tokens=1, kd_alpha=0.0)
    tokens.attach_teacher(conv_teacher())
    with pytest.raises(ValueError, match=r"are \(2, 16, 5\).*\(N, 1 \+ 4\*4, 5\) = \(N, 17, 5\)"):
        tokens({"s3": torch.randn(2, 16, 5), "s4": torch.randn(2, 10, 7)}, {"t": t})
    # a teacher stage that does not give the teacher's final grid
    wrong = small_scalekd(kd_alpha=0.0)
    wrong.attach_teacher(nn.Sequential(OrderedDict(stage=nn.Conv2d(6, 8, 1))).requires_grad_(False))
    with pytest.raises(ValueError, match=r"turned the CAP output \(2, 6, 4, 4\) into \(2, 8, 4, 4\)"):
        wrong({"s3": s3, "s4": s4}, {"t": t})
    # a stage that cannot take the CAP output at all
    broken = small_scalekd(kd_alpha=0.0)
    broken.attach_teacher(nn.Sequential(OrderedDict(stage=nn.Conv2d(3, 8, 1))).requires_grad_(False))
    with pytest.raises(
        RuntimeError, match=r"stages \['stage'\] failed on the stage-3 CAP output \(2, 6, 4, 4\)"
    ):
        broken({"s3": s3, "s4": s4}, {"t": t})


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_heads_s3=5 must divide the CAP's width 6"):
        small_scalekd(num_heads_s3=5)
    with pytest.raises(ValueError, match="alpha_s3 must be two numbers"):
        small_scalekd(alpha_s3=(0.08,))
    with pytest.raises(ValueError, match=r"alpha_s4\[1\] must be a number >= 0"):
        small_scalekd(alpha_s4=(0.08, -1.0))
    with pytest.raises(ValueError, match="softmax_scale must be two numbers"):
        small_scalekd(softmax_scale=5.0)
    with pytest.raises(ValueError, match="student_layout must be one of"):
        small_scalekd(student_layout="nlc")
    with pytest.raises(ValueError, match="student_prefix_tokens=1 applies to layout 'tokens' only"):
        small_scalekd(student_prefix_tokens=1)
    with pytest.raises(ValueError, match="teacher_stages must be a non-empty list"):
        small_scalekd(teacher_stages="layer4")
    with pytest.raises(ValueError, match=r"student_s3_hw must be two positive integers"):
        small_scalekd(student_s3_hw=(14,))
    with pytest.raises(ValueError, match=r"teacher_hw\[0\] must be a positive integer"):
        small_scalekd(teacher_hw=(0, 7))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        small_scalekd(temperature=0.0)
    cap = CrossAttentionProjector(in_channels=3, out_channels=4, in_hw=(2, 2), query_hw=(1, 2), num_heads=2,
                                  self_query=False)  # fmt: skip
    with pytest.raises(ValueError, match="self_query=False, so forward needs the query map"):
        cap(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"query must be .* = \(1, 4, 1, 2\), got \(1, 4, 2, 2\)"):
        cap(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"expects a student map \(N, 3, 2, 2\).*got \(1, 3, 3, 3\)"):
        cap(torch.randn(1, 3, 3, 3), torch.randn(1, 4, 1, 2))
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        dfm_loss(x, torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"dct_h must be a \(4, 4\) matrix"):
        remove_dc(x, dct_h=dct_matrix(3))
    with pytest.raises(ValueError, match="both student_logits and teacher_logits"):
        scalekd_terms(
            x, x, x, cap_s3=nn.Identity(), cap_s3_alt=nn.Identity(), cap_s4=lambda a, b: b,
            cap_s4_alt=lambda a, b: b, teacher_stage=nn.Identity(), student_logits=torch.zeros(2, 3),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"same shape \(N, K\)"):
        scalekd_logit_loss(torch.zeros(2, 3), torch.zeros(2, 4))
