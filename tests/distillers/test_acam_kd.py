import math

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers import ACAMKD, PerLevel
from lightningkd.functional.acam_kd import acam_masks, acam_terms, cross_attention_fusion
from tests.distiller_tester import DistillerTester

TERMS = ("channel", "spatial", "diversity")
DICE_EPS = 1e-12


# ---- the definition in plain Python (nested lists of floats; independent of the code under test) ------
# Per image, a map is a list of C rows of P = H * W values (row-major positions p = h * W + w).
def listed(x: torch.Tensor) -> list:
    """A float64 tensor as nested Python lists; the last two dims of an (N, C, H, W) map are flattened."""
    x = x.detach().double()
    if x.ndim == 4:
        x = x.flatten(2)
    return x.tolist()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def conv1x1_by_hand(x: list, weight: list, bias: list) -> list:
    """A 1x1 conv of one image ``[C_in][P]``: at every position ``W x + b`` -> ``[C_out][P]``."""
    positions = len(x[0])
    return [
        [sum(w_row[c] * x[c][p] for c in range(len(x))) + b for p in range(positions)]
        for w_row, b in zip(weight, bias)
    ]


def avg_pool_by_hand(x: list, h: int, w: int, k: int) -> tuple[list, int, int]:
    """``k x k`` average pooling with stride ``k`` and ceil_mode (the last windows average the positions
    that exist) of one image ``[C][h * w]`` -> ``([C][oh * ow], oh, ow)``."""
    oh, ow = -(-h // k), -(-w // k)
    out = []
    for row in x:
        pooled = []
        for i in range(oh):
            for j in range(ow):
                cells = [
                    row[r * w + c]
                    for r in range(i * k, min(i * k + k, h))
                    for c in range(j * k, min(j * k + k, w))
                ]
                pooled.append(sum(cells) / len(cells))
        out.append(pooled)
    return out, oh, ow


def fusion_by_hand(q: list, k: list, v: list) -> list:
    """``F = V softmax(Q^T K / sqrt(C_q))^T`` of one image: ``F[c][i] = sum_j V[c][j] A[i][j]`` with row
    ``i`` of ``A`` teacher position ``i``'s softmax over the student positions ``j``."""
    c_q, p_q, p_k = len(q), len(q[0]), len(k[0])
    out = [[0.0] * p_q for _ in v]
    for i in range(p_q):
        scores = [sum(q[d][i] * k[d][j] for d in range(c_q)) / math.sqrt(c_q) for j in range(p_k)]
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        z = sum(e)
        for c, v_row in enumerate(v):
            out[c][i] = sum(v_row[j] * e[j] / z for j in range(p_k))
    return out


def masks_by_hand(fused: list, channel_tokens: list, spatial_tokens: list) -> tuple[list, list]:
    """Channel masks ``[M][C]``: ``sigmoid(m_c * mean_p F[c])`` (``m_c`` one scalar per mask, or one per
    channel); spatial masks ``[M][P]``: ``sigmoid(sum_c m_s[c] F[c][p])``."""
    positions = len(fused[0])
    pooled = [sum(row) / positions for row in fused]
    channel = [
        [sigmoid(tok[0 if len(tok) == 1 else c] * pooled[c]) for c in range(len(fused))]
        for tok in channel_tokens
    ]
    spatial = [
        [sigmoid(sum(tok[c] * fused[c][p] for c in range(len(fused)))) for p in range(positions)]
        for tok in spatial_tokens
    ]
    return channel, spatial


def dice_by_hand(masks_per_image: list) -> float:
    """Mean over images and ordered pairs ``i != j`` of ``2 <m_i, m_j> / ((|m_i|^2 + eps) + (|m_j|^2 + eps))``."""
    values = []
    for masks in masks_per_image:
        for i, a in enumerate(masks):
            for j, b in enumerate(masks):
                if i != j:
                    dot = sum(x * y for x, y in zip(a, b))
                    values.append(
                        2 * dot / ((sum(x * x for x in a) + DICE_EPS) + (sum(y * y for y in b) + DICE_EPS))
                    )
    return sum(values) / len(values)


def terms_by_hand(
    students: list,
    teachers: list,
    channel_masks: list,
    spatial_masks: list,
    *,
    power: int,
    normalize: bool,
    diversity: str,
    alpha: float = 1.0,
    lam: float = 1.0,
) -> dict[str, float]:
    """``L_c``, ``L_s`` and the Dice diversity from the formulation (methods-verified.md section 2.1):
    ``L_c = 1/M sum_m [sum_k Mc[m,k]^p sum_p D[k,p]^2] / (P sum_k Mc[m,k])`` (or ``/ (P C)``), ``L_s``
    likewise over positions, both averaged over images."""
    l_c, l_s = [], []
    for s, t, cm, sm in zip(students, teachers, channel_masks, spatial_masks):
        c, positions = len(t), len(t[0])
        sq = [[(t[k][p] - s[k][p]) ** 2 for p in range(positions)] for k in range(c)]
        per_channel = [sum(row) for row in sq]
        per_position = [sum(sq[k][p] for k in range(c)) for p in range(positions)]
        l_c.append(
            sum(
                sum(mask[k] ** power * per_channel[k] for k in range(c))
                / (positions * (sum(mask) if normalize else c))
                for mask in cm
            )
            / len(cm)
        )
        l_s.append(
            sum(
                sum(mask[p] ** power * per_position[p] for p in range(positions))
                / (c * (sum(mask) if normalize else positions))
                for mask in sm
            )
            / len(sm)
        )
    out = {"channel": alpha * sum(l_c) / len(l_c), "spatial": alpha * sum(l_s) / len(l_s)}
    if diversity != "none":
        dice = dice_by_hand(spatial_masks)
        if diversity == "both":
            dice += dice_by_hand(channel_masks)
        out["diversity"] = lam * dice
    return out


def distiller_by_hand(acam: ACAMKD, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """The whole ACAM-KD pipeline of ``acam`` (its current weights) in plain Python."""
    p = {k: v.detach().double().tolist() for k, v in acam.named_parameters()}

    def conv(x: list, name: str) -> list:
        weight = [[column[0][0] for column in row] for row in p[f"{name}.weight"]]  # (C_out, C_in, 1, 1)
        return conv1x1_by_hand(x, weight, p.get(f"{name}.bias", [0.0] * len(weight)))

    _, _, h, w = teacher.shape
    aligned, teachers, channel_masks, spatial_masks = [], [], [], []
    for s, t in zip(listed(student), listed(teacher)):
        s = conv(s, "align") if acam.align is not None else s
        source, kh, kw = s, h, w
        if acam.key_stride > 1:
            source, kh, kw = avg_pool_by_hand(s, h, w, acam.key_stride)
        fused = fusion_by_hand(conv(t, "query"), conv(source, "key"), conv(source, "value"))
        cm, sm = masks_by_hand(fused, p["channel_tokens"], p["spatial_tokens"])
        aligned.append(s)
        teachers.append(t)
        channel_masks.append(cm)
        spatial_masks.append(sm)
    return terms_by_hand(
        aligned,
        teachers,
        channel_masks,
        spatial_masks,
        power=acam.mask_power,
        normalize=acam.normalize_by_mask_sum,
        diversity=acam.diversity if acam.diversity_weight else "none",
        alpha=acam.alpha,
        lam=acam.diversity_weight,
    )


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def materialised_fusion(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The reference: the full ``P_q x P_k`` attention ``softmax(Q^T K / sqrt(C_q))``, then ``V A^T``."""
    attention = torch.softmax(query.transpose(1, 2) @ key / math.sqrt(query.shape[1]), dim=-1)
    return value @ attention.transpose(1, 2)


# ---- the functional form against the plain-Python definition -----------------------------------------
@pytest.mark.parametrize("p_k", [6, 2, 9])
def test_fusion_known_values(p_k: int) -> None:
    q, k, v = randn(2, 2, 6, seed=0), randn(2, 2, p_k, seed=1), randn(2, 4, p_k, seed=2)
    got = cross_attention_fusion(q, k, v)
    assert got.shape == (2, 4, 6) and got.dtype == torch.float64
    expected = [fusion_by_hand(*image) for image in zip(q.tolist(), k.tolist(), v.tolist())]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-13)


def test_fusion_hand_values() -> None:
    # one query, two keys with scores 0 and 2 / sqrt(2): weights e^0 and e^sqrt(2), normalised
    q = torch.tensor([[[1.0], [1.0]]], dtype=torch.float64)  # (1, 2, 1)
    k = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)  # (1, 2, 2)
    v = torch.tensor([[[1.0, 3.0], [0.0, 0.0], [-2.0, 2.0]]], dtype=torch.float64)  # (1, 3, 2)
    a1 = math.exp(math.sqrt(2)) / (1 + math.exp(math.sqrt(2)))
    expected = [1 + 2 * a1, 0.0, -2 + 4 * a1]
    assert cross_attention_fusion(q, k, v)[0, :, 0].tolist() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("width", ["scalar", "elementwise"])
def test_masks_known_values(width: str) -> None:
    fused = randn(2, 4, 2, 3, seed=3)
    channel_tokens = randn(3, 1 if width == "scalar" else 4, seed=4, scale=2.0)
    spatial_tokens = randn(3, 4, seed=5)
    channel, spatial = acam_masks(fused, channel_tokens, spatial_tokens)
    assert channel.shape == (2, 3, 4) and spatial.shape == (2, 3, 2, 3)
    for n, image in enumerate(listed(fused)):
        cm, sm = masks_by_hand(image, channel_tokens.tolist(), spatial_tokens.tolist())
        assert channel[n].tolist() == [pytest.approx(row, rel=1e-13) for row in cm]
        assert spatial[n].flatten(1).tolist() == [pytest.approx(row, rel=1e-13) for row in sm]
    if width == "scalar":  # the channel masks of one image are sigmoid(a_m v): equal where v = 0
        fused = torch.zeros(1, 4, 2, 3, dtype=torch.float64)
        assert torch.equal(
            acam_masks(fused, channel_tokens, spatial_tokens)[0], torch.full((1, 3, 4), 0.5).double()
        )


@pytest.mark.parametrize("diversity", ["spatial", "both", "none"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("power", [1, 2])
def test_terms_known_values(power: int, normalize: bool, diversity: str) -> None:
    s, t = randn(2, 4, 2, 3, seed=6), randn(2, 4, 2, 3, seed=7)
    channel = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    spatial = torch.rand(2, 3, 2, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = acam_terms(
        s, t, channel, spatial, mask_power=power, normalize_by_mask_sum=normalize, diversity=diversity,
        channel_weight=0.7, spatial_weight=0.7, diversity_weight=1.3,
    )  # fmt: skip
    expected = terms_by_hand(
        listed(s), listed(t), channel.tolist(), spatial.flatten(2).tolist(),
        power=power, normalize=normalize, diversity=diversity, alpha=0.7, lam=1.3,
    )  # fmt: skip
    assert tuple(got) == tuple(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float64 and got[key].ndim == 0
        assert got[key].item() == pytest.approx(value, rel=1e-12), key


def test_terms_closed_forms() -> None:
    s, t = randn(2, 3, 2, 3, seed=10), randn(2, 3, 2, 3, seed=11)
    mse = ((s - t) ** 2).mean().item()
    ones_c, ones_s = torch.ones(2, 2, 3, dtype=torch.float64), torch.ones(2, 2, 2, 3, dtype=torch.float64)
    for power in (1, 2):  # all-one masks give the plain mean squared error whatever the reading
        for normalize in (True, False):
            got = acam_terms(s, t, ones_c, ones_s, mask_power=power, normalize_by_mask_sum=normalize)
            assert got["channel"].item() == pytest.approx(mse, rel=1e-13)
            assert got["spatial"].item() == pytest.approx(mse, rel=1e-13)
            assert got["diversity"].item() == pytest.approx(1.0, rel=1e-12)  # identical masks
    # constant masks c: normalised, the mask weighs p - 1 times (c^p / c); else c^p times
    half_c, half_s = ones_c / 2, ones_s / 2
    for power in (1, 2):
        got = acam_terms(s, t, half_c, half_s, mask_power=power, diversity="none")
        assert got["channel"].item() == pytest.approx(0.5 ** (power - 1) * mse, rel=1e-13)
        got = acam_terms(
            s, t, half_c, half_s, mask_power=power, normalize_by_mask_sum=False, diversity="none"
        )
        assert got["spatial"].item() == pytest.approx(0.5**power * mse, rel=1e-13)
    # disjoint spatial masks: no overlap, Dice 0
    disjoint = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    disjoint[0, 0, 0, 0] = disjoint[0, 1, 0, 1] = 1.0
    got = acam_terms(s[:1, :, :1, :2], t[:1, :, :1, :2], torch.ones(1, 2, 3, dtype=torch.float64), disjoint)
    assert got["diversity"].item() == 0.0


def test_terms_weights_drop_terms() -> None:
    s, t = randn(1, 2, 2, 2, seed=12), randn(1, 2, 2, 2, seed=13)
    c, sp = torch.full((1, 3, 2), 0.3).double(), torch.full((1, 3, 2, 2), 0.6).double()
    assert tuple(acam_terms(s, t, c, sp, channel_weight=0.0)) == ("spatial", "diversity")
    assert tuple(acam_terms(s, t, c, sp, diversity_weight=0.0)) == ("channel", "spatial")
    assert tuple(acam_terms(s, t, c[:, :1], sp[:, :1])) == ("channel", "spatial")  # one mask: no pair
    with pytest.raises(ValueError, match="every term has weight 0"):
        acam_terms(s, t, c, sp, channel_weight=0.0, spatial_weight=0.0, diversity="none")


# ---- the distiller end to end, weights set by hand ---------------------------------------------------
def hand_set(acam: ACAMKD, seed: int) -> ACAMKD:
    """float64, and every parameter overwritten with a known draw (tokens big enough to matter)."""
    acam = acam.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in acam.named_parameters():
            scale = 1.5 if "tokens" in name else 0.6
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return acam


END_TO_END = [
    dict(),
    dict(student_channels=3, channel_mask="elementwise"),
    dict(student_channels=3, key_stride=2, mask_power=2, normalize_by_mask_sum=False, diversity="both"),
    dict(key_stride=2, channel_mask="elementwise", diversity="none", alpha=0.5),
    dict(student_channels=5, mask_power=2, alpha=2.0, diversity_weight=0.25, detach_student=False),
]


@pytest.mark.parametrize(
    "kwargs", END_TO_END, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default"
)
def test_distiller_end_to_end_known_values(kwargs: dict) -> None:
    acam = hand_set(
        ACAMKD(student_layer="s", teacher_layer="t", channels=4, num_masks=3, query_channels=2, **kwargs),
        seed=14,
    )
    assert acam.query.weight.shape == (2, 4, 1, 1) and acam.value.weight.shape == (4, 4, 1, 1)
    student = randn(2, kwargs.get("student_channels", 4), 2, 3, seed=15)
    teacher = randn(2, 4, 2, 3, seed=16)
    got = acam.terms({"s": student}, {"t": teacher})
    expected = distiller_by_hand(acam, student, teacher)
    assert tuple(got) == tuple(expected)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, rel=1e-11), key
    assert acam({"s": student}, {"t": teacher}).item() == pytest.approx(
        math.fsum(expected.values()), rel=1e-11
    )


def test_avg_pool_by_hand_is_ceil_mode() -> None:
    """The helper the end-to-end check uses matches the distiller's pooling on odd sizes."""
    x = randn(1, 2, 5, 7, seed=17)
    pooled, oh, ow = avg_pool_by_hand(listed(x)[0], 5, 7, 2)
    assert (oh, ow) == (3, 4)
    torch_pooled = F.avg_pool2d(x, 2, ceil_mode=True).flatten(2)[0]
    assert torch_pooled.tolist() == [pytest.approx(row, rel=1e-14) for row in pooled]
    assert pooled[0][-1] == x[0, 0, 4, 6].item()  # the corner window holds one position


# ---- the fused path against a materialised attention -------------------------------------------------
@pytest.mark.parametrize(
    ("c_q", "c", "p_q", "p_k"),
    [(2, 4, 6, 6), (2, 4, 35, 12), (4, 4, 12, 35), (3, 8, 300, 600), (1, 5, 7, 1)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_materialised(dtype, c_q: int, c: int, p_q: int, p_k: int) -> None:
    q = randn(2, c_q, p_q, seed=18, scale=2.0).to(dtype).requires_grad_()
    k = randn(2, c_q, p_k, seed=19, scale=2.0).to(dtype).requires_grad_()
    v = randn(2, c, p_k, seed=20).to(dtype).requires_grad_()
    upstream = randn(2, c, p_q, seed=21).to(dtype)
    got = cross_attention_fusion(q, k, v)
    expected = materialised_fusion(q, k, v)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    assert got.dtype == dtype and got.shape == (2, c, p_q)
    torch.testing.assert_close(got, expected, **tol)
    grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, **(tol if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)))


@pytest.mark.parametrize(("c_q", "c"), [(3, 8), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_kernel_is_used(dtype, c_q: int, c: int) -> None:
    """Restricted to the flash kernel, the fusion still runs (forward and backward): it does not fall
    back to the math path, which holds the whole P_q x P_k attention (a transposed, non-unit-stride
    operand silently did)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = randn(2, c_q, 40, seed=30).to(dtype).requires_grad_()
    k = randn(2, c_q, 25, seed=31).to(dtype).requires_grad_()
    v = randn(2, c, 25, seed=32).to(dtype).requires_grad_()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = cross_attention_fusion(q, k, v)
        out.float().square().sum().backward()
    assert out.shape == (2, c, 40) and all(x.grad is not None for x in (q, k, v))
    # and the distiller's own call (transposed conv outputs of a map) takes the same path
    acam = ACAMKD(student_layer="s", teacher_layer="t", channels=6, num_masks=2, key_stride=2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        acam({"s": torch.randn(1, 6, 5, 7, requires_grad=True)}, {"t": torch.randn(1, 6, 5, 7)}).backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_distiller_key_stride_on_odd_sizes(dtype) -> None:
    """key_stride 2 on a 5 x 7 map: 12 keys (3 x 4, ceil_mode) for 35 queries, as the materialised path."""
    torch.manual_seed(22)
    acam = ACAMKD(
        student_layer="s", teacher_layer="t", channels=6, student_channels=4, num_masks=3, key_stride=2
    )
    acam = acam.to(dtype)
    with torch.no_grad():
        for tokens in (acam.channel_tokens, acam.spatial_tokens):
            tokens.normal_(0.0, 1.0)
    s, t = randn(2, 4, 5, 7, seed=23).to(dtype), randn(2, 6, 5, 7, seed=24).to(dtype)
    seen = []
    acam.key.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    channel, spatial = acam.attention_masks(acam.align(s), t)
    assert seen == [(2, 6, 3, 4)]
    source = F.avg_pool2d(acam.align(s), 2, ceil_mode=True)
    fused = materialised_fusion(
        acam.query(t).flatten(2), acam.key(source).flatten(2), acam.value(source).flatten(2)
    )
    expected = acam_masks(fused.reshape(2, 6, 5, 7), acam.channel_tokens, acam.spatial_tokens)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(channel, expected[0], **tol)
    torch.testing.assert_close(spatial, expected[1], **tol)
    assert torch.equal(acam.spatial_masks({"s": s}, {"t": t}), spatial.detach())


# ---- the shared distiller checks ---------------------------------------------------------------------
class TestACAMKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.ACAMKD\n"
        "init_args: {student_layer: output, teacher_layer: output, channels: 19, num_masks: 19,"
        " mask_power: 2, normalize_by_mask_sum: false, detach_student: false, diversity: both,"
        " channel_mask: elementwise, key_stride: 2, alpha: 0.5, diversity_weight: 2.0}"
    )
    term_names = TERMS

    def make(self) -> ACAMKD:
        return ACAMKD(student_layer="s", teacher_layer="t", channels=6, num_masks=3)

    def inputs(self):
        return ({"s": torch.randn(2, 6, 5, 7, requires_grad=True)}, {"t": torch.randn(2, 6, 5, 7)}, None)

    def twin(self, distiller, student, teacher, batch):
        s, t = student["s"], teacher["t"]
        s = s if distiller.align is None else distiller.align(s)
        source = s.detach() if distiller.detach_student else s
        if distiller.key_stride > 1:
            source = F.avg_pool2d(source, distiller.key_stride, ceil_mode=True)
        fused = cross_attention_fusion(
            distiller.query(t).flatten(2),
            distiller.key(source).flatten(2),
            distiller.value(source).flatten(2),
        ).reshape(t.shape)
        channel, spatial = acam_masks(fused, distiller.channel_tokens, distiller.spatial_tokens)
        terms = acam_terms(
            s, t, channel, spatial, mask_power=distiller.mask_power,
            normalize_by_mask_sum=distiller.normalize_by_mask_sum, diversity=distiller.diversity,
            channel_weight=distiller.alpha, spatial_weight=distiller.alpha,
            diversity_weight=distiller.diversity_weight,
        )  # fmt: skip
        return sum(terms.values())


class TestACAMKDAligned(TestACAMKD):
    """Student channels differ (the align conv), and every uncertain choice away from its default."""

    yaml_config = (
        "class_path: lightningkd.distillers.ACAMKD\n"
        "init_args: {student_layer: 'neck:0', teacher_layer: 'neck:0', channels: 256, student_channels: 128,"
        " num_masks: 6, query_channels: 64, weight: 2.0}"
    )

    def make(self) -> ACAMKD:
        return ACAMKD(
            student_layer="s", teacher_layer="t", channels=6, student_channels=4, num_masks=4, query_channels=2,
            mask_power=2, normalize_by_mask_sum=False, detach_student=False, diversity="both",
            channel_mask="elementwise", key_stride=2, alpha=0.7, diversity_weight=1.5,
        )  # fmt: skip

    def inputs(self):
        return ({"s": torch.randn(2, 4, 5, 7, requires_grad=True)}, {"t": torch.randn(2, 6, 5, 7)}, None)


# ---- behaviour ---------------------------------------------------------------------------------------
def _student_grad(acam: ACAMKD, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = s.detach().clone().requires_grad_()
    acam.zero_grad(set_to_none=True)
    acam({"s": s}, {"t": t}).backward()
    return s.grad


def test_detach_student_gradient_comes_from_the_masked_losses_only() -> None:
    torch.manual_seed(25)
    acam = ACAMKD(student_layer="s", teacher_layer="t", channels=4, num_masks=3, student_channels=3).double()
    with torch.no_grad():
        acam.spatial_tokens.normal_(0.0, 1.0)
        acam.channel_tokens.normal_(0.0, 1.0)
    s, t = randn(2, 3, 4, 5, seed=26), randn(2, 4, 4, 5, seed=27)
    detached = _student_grad(acam, s, t)
    # the key and value convs still learn (through the masks), as do the query conv and the tokens
    for module in (acam.key, acam.value, acam.query):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert acam.spatial_tokens.grad.abs().sum() > 0 and acam.channel_tokens.grad.abs().sum() > 0
    # the same gradient as the masked losses with the masks held fixed
    leaf = s.clone().requires_grad_()
    aligned = acam.align(leaf)
    channel, spatial = acam.attention_masks(aligned, t)
    fixed = acam_terms(aligned, t, channel.detach(), spatial.detach(), diversity="none")
    (expected,) = torch.autograd.grad(sum(fixed.values()), leaf)
    torch.testing.assert_close(detached, expected, rtol=1e-12, atol=1e-14)
    # without the detach the mask branch adds its own gradient
    acam.detach_student = False
    attached = _student_grad(acam, s, t)
    assert not torch.allclose(attached, detached, rtol=1e-6, atol=1e-9)
    # and both settings give the same loss value
    acam.detach_student = True
    value = acam({"s": s}, {"t": t}).item()
    acam.detach_student = False
    assert acam({"s": s}, {"t": t}).item() == value


@pytest.mark.parametrize("channel_mask", ["scalar", "elementwise"])
def test_tokens_and_projections_get_gradients(channel_mask: str) -> None:
    torch.manual_seed(28)
    acam = ACAMKD(student_layer="s", teacher_layer="t", channels=5, num_masks=2, channel_mask=channel_mask)
    assert acam.channel_tokens.shape == ((2, 1) if channel_mask == "scalar" else (2, 5))
    assert acam.spatial_tokens.shape == (2, 5) and acam.query_channels == 2
    acam({"s": torch.randn(2, 5, 3, 4, requires_grad=True)}, {"t": torch.randn(2, 5, 3, 4)}).backward()
    for name in (
        "channel_tokens",
        "spatial_tokens",
        "query.weight",
        "query.bias",
        "key.weight",
        "value.weight",
    ):
        grad = acam.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # no key bias: it would add q_i . b to every score of query i, which the softmax cancels
    assert acam.key.bias is None


def test_reset_parameters_and_token_init() -> None:
    acam = ACAMKD(channels=64, num_masks=40, channel_mask="elementwise")
    torch.manual_seed(29)
    acam.reset_parameters()
    first = {k: v.detach().clone() for k, v in acam.state_dict().items()}
    torch.manual_seed(29)
    acam.reset_parameters()
    assert all(torch.equal(v, acam.state_dict()[k]) for k, v in first.items())
    for tokens in (acam.channel_tokens, acam.spatial_tokens):  # N(0, 0.01^2), 2560 draws each
        assert abs(tokens.mean().item()) < 0.001 and tokens.std().item() == pytest.approx(0.01, rel=0.06)
    assert acam.align is None
    assert set(acam.state_dict()) == {
        "query.weight", "query.bias", "key.weight", "value.weight", "value.bias",
        "channel_tokens", "spatial_tokens",
    }  # fmt: skip
    assert "align.weight" in ACAMKD(channels=8, student_channels=4).state_dict()
    assert ACAMKD(channels=8, student_channels=8).align is None


def test_per_level_reinitialises_every_level() -> None:
    torch.manual_seed(30)
    template = ACAMKD(channels=6, student_channels=4, num_masks=3)
    before = {k: v.detach().clone() for k, v in template.state_dict().items()}
    levels = ["0", "1", "p6"]
    per_level = PerLevel(distiller=template, levels=levels, student_layer="s", teacher_layer="t")
    copies = [per_level.level(level) for level in levels]
    for name in (
        "channel_tokens",
        "spatial_tokens",
        "query.weight",
        "key.weight",
        "value.weight",
        "align.weight",
    ):
        params = [c.get_parameter(name) for c in copies]
        for i in range(len(params)):
            for j in range(i + 1, len(params)):
                assert not torch.equal(params[i], params[j]), name
                assert params[i].data_ptr() != params[j].data_ptr(), name
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in before.items())  # template untouched
    with torch.no_grad():
        copies[0].spatial_tokens.zero_()
    assert torch.count_nonzero(copies[1].spatial_tokens) > 0
    # the sum over levels is the sum of the levels run on their own
    sizes = {"0": (5, 6), "1": (3, 3), "p6": (2, 3)}
    s = {f"s:{lv}": torch.randn(2, 4, *sizes[lv]) for lv in levels}
    t = {f"t:{lv}": torch.randn(2, 6, *sizes[lv]) for lv in levels}
    terms = per_level.terms(s, t)
    assert tuple(terms) == tuple(f"{lv}/{term}" for lv in levels for term in TERMS)
    expected = 0.0
    for level in levels:
        alone = ACAMKD(student_layer=f"s:{level}", teacher_layer=f"t:{level}", channels=6, student_channels=4,
                       num_masks=3)  # fmt: skip
        alone.load_state_dict(per_level.level(level).state_dict())
        expected += alone({f"s:{level}": s[f"s:{level}"]}, {f"t:{level}": t[f"t:{level}"]}).item()
    assert per_level(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask_power must be 1 or 2, got 3"):
        ACAMKD(mask_power=3)
    with pytest.raises(ValueError, match="mask_power must be 1 or 2, got True"):
        ACAMKD(mask_power=True)
    with pytest.raises(ValueError, match="diversity must be one of"):
        ACAMKD(diversity="cosine")
    with pytest.raises(ValueError, match="alpha is 0 and there is no diversity term"):
        ACAMKD(alpha=0.0, diversity="none")
    with pytest.raises(ValueError, match="alpha is 0 and there is no diversity term"):
        ACAMKD(alpha=0.0, diversity_weight=0.0)
    with pytest.raises(ValueError, match="alpha is 0 and there is no diversity term"):
        ACAMKD(alpha=0.0, num_masks=1)  # one mask: no pair, no diversity
    assert ACAMKD(alpha=0.0, channels=4, num_masks=2).alpha == 0.0  # the diversity alone is a loss
    with pytest.raises(ValueError, match="channel_mask must be one of"):
        ACAMKD(channel_mask="vector")
    with pytest.raises(ValueError, match=r"query_channels \(9\) must not exceed channels \(8\)"):
        ACAMKD(channels=8, query_channels=9)
    with pytest.raises(ValueError, match="key_stride must be a positive integer"):
        ACAMKD(key_stride=0)
    with pytest.raises(ValueError, match="alpha"):
        ACAMKD(alpha=-1.0)
    with pytest.raises(ValueError, match="num_masks must be a positive integer"):
        ACAMKD(num_masks=0)
    acam = ACAMKD(student_layer="s", teacher_layer="t", channels=6, student_channels=4, num_masks=2)
    with pytest.raises(
        ValueError, match=r"built for 4 student and 6 teacher channels.*\(2, 5, 3, 3\).*\(2, 6, 3, 3\)"
    ):
        acam({"s": torch.zeros(2, 5, 3, 3)}, {"t": torch.zeros(2, 6, 3, 3)})
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*\(2, 7, 3, 3\)"):
        acam({"s": torch.zeros(2, 4, 3, 3)}, {"t": torch.zeros(2, 7, 3, 3)})
    with pytest.raises(ValueError, match="same batch size and spatial size"):
        acam({"s": torch.zeros(2, 4, 3, 4)}, {"t": torch.zeros(2, 6, 3, 3)})
    with pytest.raises(KeyError, match="tapped"):
        acam({"x": torch.zeros(2, 4, 3, 3)}, {"t": torch.zeros(2, 6, 3, 3)})


def test_functional_rejects_bad_inputs() -> None:
    x = torch.zeros(1, 4, 5)
    with pytest.raises(ValueError, match=r"\(N, C, P\) key, got \(4, 5\)"):
        cross_attention_fusion(x[:, :2], x[0], x)
    with pytest.raises(ValueError, match=r"disagree: got \(1, 2, 5\), \(1, 3, 5\) and \(1, 4, 5\)"):
        cross_attention_fusion(x[:, :2], x[:, :3], x)
    with pytest.raises(ValueError, match="disagree"):
        cross_attention_fusion(x[:, :2], x[:, :2], x[:, :, :4])
    with pytest.raises(ValueError, match="query width 4 exceeds the value width 3"):
        cross_attention_fusion(x, x, x[:, :3])
    fused = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"spatial_tokens must be \(M, 4\), got \(3, 5\)"):
        acam_masks(fused, torch.ones(3, 1), torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"channel_tokens must be \(3, 1\) or \(3, 4\), got \(3, 2\)"):
        acam_masks(fused, torch.ones(3, 2), torch.ones(3, 4))
    with pytest.raises(ValueError, match="fused map"):
        acam_masks(fused[0], torch.ones(3, 1), torch.ones(3, 4))
    c, sp = torch.ones(2, 3, 4), torch.ones(2, 3, 3, 3)
    with pytest.raises(ValueError, match="mask_power must be 1 or 2, got 3"):
        acam_terms(fused, fused, c, sp, mask_power=3)
    with pytest.raises(ValueError, match="diversity must be one of"):
        acam_terms(fused, fused, c, sp, diversity="channel")
    with pytest.raises(ValueError, match=r"student map \(2, 3, 3, 3\) and the teacher map \(2, 4, 3, 3\)"):
        acam_terms(fused[:, :3], fused, c, sp)
    with pytest.raises(ValueError, match=r"channel_masks must be \(2, M, 4\)"):
        acam_terms(fused, fused, c[:, :, :3], sp)
    with pytest.raises(ValueError, match=r"spatial_masks must be \(2, 3, 3, 3\), got \(2, 2, 3, 3\)"):
        acam_terms(fused, fused, c, sp[:, :2])


@pytest.mark.parametrize("power", [1, 2])
def test_terms_from_logits_equal_the_masks_and_stay_finite_where_sigmoids_underflow(power: int) -> None:
    from lightningkd.functional.acam_kd import acam_terms

    torch.manual_seed(40)
    s, t = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 4, 5)
    channel_logits, spatial_logits = torch.randn(2, 4, 3), torch.randn(2, 4, 4, 5)
    by_logits = acam_terms(s, t, channel_logits, spatial_logits, mask_power=power, logits=True)
    by_masks = acam_terms(s, t, channel_logits.sigmoid(), spatial_logits.sigmoid(), mask_power=power)
    for key in by_masks:
        torch.testing.assert_close(by_logits[key], by_masks[key])
    # every sigmoid of one spatial mask underflows to exactly 0 in float32: the mask-sum ratio of the plain
    # masks is 0 / 0, the log-space one is the error at the mask's least negative logit (power 1)
    collapsed = spatial_logits.clone()
    collapsed[0, 1] = -1000.0
    collapsed[0, 1, 2, 3] = -900.0
    logits = collapsed.requires_grad_(True)
    assert bool((logits[0, 1].sigmoid() == 0).all())
    terms = acam_terms(s, t, channel_logits, logits, mask_power=power, logits=True, diversity="none")
    assert torch.isfinite(terms["spatial"])
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(logits.grad).all()
    plain = acam_terms(
        s, t, channel_logits.sigmoid(), logits.detach().sigmoid(), mask_power=power, diversity="none"
    )
    assert torch.isnan(plain["spatial"])  # what the logits path avoids
    if power == 1:  # the collapsed mask weighs only its least negative position: its error alone
        error = (t - s.detach()).pow(2).sum(1)[0, 2, 3] / 3
        per_mask = error.item()
        rest = [
            (
                (spatial_logits[n, j].detach().sigmoid() * (t - s.detach()).pow(2).sum(1)[n] / 3).sum()
                / spatial_logits[n, j].detach().sigmoid().sum()
            ).item()
            for n in range(2)
            for j in range(4)
            if (n, j) != (0, 1)
        ]
        assert terms["spatial"].item() == pytest.approx((per_mask + sum(rest)) / 8, rel=1e-5)
