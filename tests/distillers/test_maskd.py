"""MasKD: receptive-token masks, the Dice diversity, the masked feature loss and the distiller."""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from lightningkd.distillers import MasKD, PerLevel
from lightningkd.distillers.maskd import ReceptiveTokens, load_mask_tokens, save_mask_tokens
from lightningkd.functional.maskd import dice_diversity, maskd_loss, token_masks
from tests.distiller_tester import DistillerTester, parse_distiller

# ---- the definitions in plain Python (independent of the code under test) ---------------------------
N, C, H, W, T = 2, 3, 3, 3, 4
CS = 2  # the student's channels before the align conv in the custom-mask case


def values(n: int, c: int, phase: float, scale: float = 1.0) -> list:
    """A deterministic ``n x c x H x W`` nested list of floats (exact in float64)."""
    return [
        [
            [
                [scale * math.sin(phase + 0.9 * (((i * c + j) * H + y) * W + x)) for x in range(W)]
                for y in range(H)
            ]
            for j in range(c)
        ]
        for i in range(n)
    ]


# tokens and weights are multiples of powers of two: exact in the float32 a token file stores
TOKENS = [[1.5, -0.75, 1.0], [-1.25, 2.0, 0.5], [0.25, 0.875, -1.75], [2.25, -1.5, 0.75]]
HEAD3 = [[[[((((o * C + c) * 3 + ky) * 3 + kx) % 7 - 3) / 8 for kx in range(3)] for ky in range(3)] for c in range(C)] for o in range(C)]  # fmt: skip
HEAD3_BIAS = [0.0625, -0.125, 0.25]
HEAD1 = [[((t * C + c) % 5 - 2) / 4 for c in range(C)] for t in range(T)]
HEAD1_BIAS = [0.5, -0.25, 0.0, 0.125]
ALIGN = [[0.5, -0.25], [0.75, 1.0], [-1.0, 0.375]]  # (C, CS)
ALIGN_BIAS = [0.125, -0.5, 0.25]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def masks_by_hand(feat: list, tokens: list) -> list:
    """``m[n][t][h][w] = sigmoid(sum_c K[t][c] F[n][c][h][w])``."""
    return [
        [
            [
                [sigmoid(sum(tok[c] * feat[n][c][y][x] for c in range(len(tok)))) for x in range(W)]
                for y in range(H)
            ]
            for tok in tokens
        ]
        for n in range(len(feat))
    ]


def dice_by_hand(masks: list, eps: float = 1e-12) -> float:
    """Mean over images and ordered pairs i != j of 2<m_i, m_j> / ((|m_i|^2 + eps) + (|m_j|^2 + eps))."""
    total, count = 0.0, 0
    for per_image in masks:
        flat = [[v for row in m for v in row] for m in per_image]
        for i, mi in enumerate(flat):
            for j, mj in enumerate(flat):
                if i == j:
                    continue
                inner = sum(a * b for a, b in zip(mi, mj))
                total += 2 * inner / ((sum(a * a for a in mi) + eps) + (sum(b * b for b in mj) + eps))
                count += 1
    return total / count


def loss_by_hand(s: list, t: list, masks: list, weights: list | None = None, eps: float = 0.0) -> float:
    """Per (n, t, c): sum_hw (m S - m T)^2 / (sum_hw m + eps); mean over c; then mean over (n, t), or
    mean over n of sum_t w[n][t] * (mean over c)."""
    per_image = []
    for n in range(len(s)):
        per_token = []
        for m in masks[n]:
            d = []
            for c in range(len(s[n])):
                num = sum(
                    (m[y][x] * s[n][c][y][x] - m[y][x] * t[n][c][y][x]) ** 2
                    for y in range(H)
                    for x in range(W)
                )
                d.append(num / (sum(m[y][x] for y in range(H) for x in range(W)) + eps))
            per_token.append(sum(d) / len(d))
        if weights is None:
            per_image.append(sum(per_token) / len(per_token))
        else:
            per_image.append(sum(w * v for w, v in zip(weights[n], per_token)))
    return sum(per_image) / len(per_image)


def weights_by_hand(feat: list) -> list:
    """The head: Conv3x3(C, C, padding 1) -> global average pool -> Conv1x1(C, T) -> softmax over T."""
    out = []
    for n in range(len(feat)):
        pooled = []
        for o in range(C):
            acc = 0.0
            for y in range(H):
                for x in range(W):
                    v = HEAD3_BIAS[o]
                    for c in range(C):
                        for ky in range(3):
                            for kx in range(3):
                                yy, xx = y + ky - 1, x + kx - 1
                                if 0 <= yy < H and 0 <= xx < W:
                                    v += HEAD3[o][c][ky][kx] * feat[n][c][yy][xx]
                    acc += v
            pooled.append(acc / (H * W))
        logits = [HEAD1_BIAS[t] + sum(HEAD1[t][o] * pooled[o] for o in range(C)) for t in range(T)]
        top = max(logits)
        exps = [math.exp(z - top) for z in logits]
        out.append([e / sum(exps) for e in exps])
    return out


def align_by_hand(s: list) -> list:
    """The 1x1 align conv with bias, CS -> C channels."""
    return [
        [
            [
                [ALIGN_BIAS[o] + sum(ALIGN[o][c] * s[n][c][y][x] for c in range(CS)) for x in range(W)]
                for y in range(H)
            ]
            for o in range(C)
        ]
        for n in range(len(s))
    ]


def product(a: list, b: list) -> list:
    return [[[[u * v for u, v in zip(ra, rb)] for ra, rb in zip(ma, mb)] for ma, mb in zip(na, nb)] for na, nb in zip(a, b)]  # fmt: skip


def as_tensor(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def hand_tokens(weighted: bool) -> ReceptiveTokens:
    module = ReceptiveTokens(channels=C, num_tokens=T, weighted=weighted)
    with torch.no_grad():
        module.tokens.copy_(torch.tensor(TOKENS))
        if weighted:
            module.weight_head[0].weight.copy_(torch.tensor(HEAD3))
            module.weight_head[0].bias.copy_(torch.tensor(HEAD3_BIAS))
            module.weight_head[2].weight.copy_(torch.tensor(HEAD1)[:, :, None, None])
            module.weight_head[2].bias.copy_(torch.tensor(HEAD1_BIAS))
    return module


@pytest.fixture
def hand_file(tmp_path) -> Path:
    """A token file with the hand-set tokens of layer ``"t"`` (plain) and ``"tw"`` (with the weight head)."""
    return save_mask_tokens(tmp_path / "tokens.pt", {"t": hand_tokens(False), "tw": hand_tokens(True)})


S_FEAT, T_FEAT = values(N, C, 0.3), values(N, C, 1.1, scale=1.5)
S_SMALL = values(N, CS, 2.0)  # the student before its align conv


# ---- known values ---------------------------------------------------------------------------------------
def test_masks_and_dice_by_hand() -> None:
    expected = masks_by_hand(T_FEAT, TOKENS)
    got = token_masks(as_tensor(T_FEAT), as_tensor(TOKENS))
    assert got.shape == (N, T, H, W) and got.dtype == torch.float64
    torch.testing.assert_close(got, as_tensor(expected), rtol=1e-12, atol=0)
    assert dice_diversity(got).item() == pytest.approx(dice_by_hand(expected), rel=1e-12)
    assert dice_diversity(got, eps=0.5).item() == pytest.approx(dice_by_hand(expected, eps=0.5), rel=1e-12)
    # disjoint masks: 0; identical masks: 1 (up to the eps); all-zero masks: 0, not NaN
    disjoint = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    assert dice_diversity(disjoint).item() == 0.0
    assert dice_diversity(torch.full((2, 3, 2, 2), 0.3, dtype=torch.float64)).item() == pytest.approx(1.0)
    assert dice_diversity(torch.zeros(1, 2, 4)).item() == 0.0


def test_loss_by_hand_unweighted_weighted_and_eps() -> None:
    s, t = as_tensor(S_FEAT), as_tensor(T_FEAT)
    m = masks_by_hand(T_FEAT, TOKENS)
    masks = as_tensor(m)
    assert maskd_loss(s, t, masks).item() == pytest.approx(loss_by_hand(S_FEAT, T_FEAT, m), rel=1e-12)
    got = maskd_loss(s, t, masks, eps=1e-5).item()
    assert got == pytest.approx(loss_by_hand(S_FEAT, T_FEAT, m, eps=1e-5), rel=1e-12)
    assert got != pytest.approx(maskd_loss(s, t, masks).item(), rel=1e-9)  # the eps is seen
    w = weights_by_hand(T_FEAT)
    got = maskd_loss(s, t, masks, token_weights=as_tensor(w), eps=0.25).item()
    assert got == pytest.approx(loss_by_hand(S_FEAT, T_FEAT, m, w, eps=0.25), rel=1e-12)
    # the mask enters squared in the numerator, linearly in the normaliser: a constant mask a gives
    # a^2 sum (S - T)^2 / (a HW), i.e. a times the plain mean squared error
    constant = torch.full((N, T, H, W), 0.25, dtype=torch.float64)
    mse = (s - t).pow(2).mean().item()
    assert maskd_loss(s, t, constant).item() == pytest.approx(0.25 * mse, rel=1e-12)


def test_distiller_by_hand_plain_and_weighted(hand_file) -> None:
    s, t = as_tensor(S_FEAT).requires_grad_(), as_tensor(T_FEAT)
    m = masks_by_hand(T_FEAT, TOKENS)
    plain = MasKD(tokens=str(hand_file), student_layer="s", teacher_layer="t", channels=C, eps=1e-5).double()
    assert plain.align is None and plain.masker.weight_head is None
    got = plain({"s": s}, {"t": t})
    assert got.item() == pytest.approx(loss_by_hand(S_FEAT, T_FEAT, m, eps=1e-5), rel=1e-12)
    torch.testing.assert_close(plain.spatial_masks({"s": s}, {"t": t}), as_tensor(m), rtol=1e-12, atol=0)

    weighted = MasKD(
        tokens=str(hand_file), student_layer="s", teacher_layer="t", token_layer="tw", channels=C
    ).double()
    w = weights_by_hand(T_FEAT)
    torch.testing.assert_close(weighted.masker.token_weights(t), as_tensor(w), rtol=1e-12, atol=0)
    got = weighted({"s": s}, {"t": t})
    assert got.item() == pytest.approx(loss_by_hand(S_FEAT, T_FEAT, m, w), rel=1e-12)


def test_custom_mask_by_hand(hand_file) -> None:
    """After the warm-up: mask = m(teacher) x m(aligned student), in the numerator and the normaliser."""
    maskd = MasKD(
        tokens=str(hand_file), student_layer="s", teacher_layer="t", token_layer="tw", channels=C,
        student_channels=CS, custom_mask=True, custom_mask_warmup=0,
    ).double()  # fmt: skip
    with torch.no_grad():
        maskd.align.weight.copy_(as_tensor(ALIGN)[:, :, None, None])
        maskd.align.bias.copy_(as_tensor(ALIGN_BIAS))
    aligned = align_by_hand(S_SMALL)
    custom = product(masks_by_hand(T_FEAT, TOKENS), masks_by_hand(aligned, TOKENS))
    expected = loss_by_hand(aligned, T_FEAT, custom, weights_by_hand(T_FEAT))
    s, t = {"s": as_tensor(S_SMALL)}, {"t": as_tensor(T_FEAT)}
    torch.testing.assert_close(maskd.spatial_masks(s, t), as_tensor(custom), rtol=1e-12, atol=0)
    assert maskd(s, t).item() == pytest.approx(expected, rel=1e-12)
    # the functional form with the same mask
    masks = token_masks(t["t"], maskd.masker.tokens) * token_masks(maskd.align(s["s"]), maskd.masker.tokens)
    got = maskd_loss(maskd.align(s["s"]), t["t"], masks, token_weights=maskd.masker.token_weights(t["t"]))
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ---- the shared checks --------------------------------------------------------------------------------
_DIR = Path(tempfile.mkdtemp(prefix="lightningkd-maskd-test-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
TOKEN_FILE = _DIR / "tokens.pt"
FILE_LAYERS = {
    "t": (6, 4, True),
    "backbone:0": (8, 6, True),
    "backbone:p6": (8, 6, True),
    "logits": (6, 3, False),
}


def token_file() -> Path:
    """The shared token file (written once; ``make`` needs it outside of any fixture)."""
    if not TOKEN_FILE.exists():
        g = torch.Generator().manual_seed(0)
        modules = {}
        for layer, (channels, num_tokens, weighted) in FILE_LAYERS.items():
            module = ReceptiveTokens(channels, num_tokens, weighted)
            with torch.no_grad():  # larger than the N(0, 0.01^2) init, so that the masks vary
                module.tokens.copy_(0.5 * torch.randn(num_tokens, channels, generator=g))
            modules[layer] = module
        save_mask_tokens(TOKEN_FILE, modules)
    return TOKEN_FILE


class TestMasKD(DistillerTester):
    yaml_config = f"""
class_path: lightningkd.distillers.MasKD
init_args:
  tokens: {token_file()}
  student_layer: "backbone:0"
  teacher_layer: "backbone:0"
  channels: 8
  student_channels: 4
  align: true
  custom_mask: true
  custom_mask_warmup: 10
  eps: 1.0e-5
  weight: 7.0
"""

    def make(self) -> MasKD:
        return MasKD(
            tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=6, student_channels=4,
            custom_mask=True, custom_mask_warmup=0, eps=1e-5,
        )  # fmt: skip

    def inputs(self):
        return ({"s": torch.randn(2, 4, 5, 6, requires_grad=True)}, {"t": torch.randn(2, 6, 5, 6)}, None)

    def twin(self, distiller, student, teacher, batch):
        s, t = distiller.align(student["s"]), teacher["t"]
        tokens = distiller.masker.tokens
        masks = token_masks(t, tokens) * token_masks(s.detach(), tokens)  # warm-up 0: the custom mask
        return maskd_loss(s, t, masks, token_weights=distiller.masker.token_weights(t), eps=distiller.eps)

    def test_gradients_reach_student_and_adapters(self) -> None:
        """The align conv and the student get gradients; the tokens and their head are frozen (no grad)."""
        torch.manual_seed(0)
        distiller = self.make()
        student, teacher, batch = self.inputs()
        distiller(student, teacher, batch).backward()
        assert student["s"].grad is not None and student["s"].grad.abs().sum() > 0
        trainable = {name for name, p in distiller.named_parameters() if p.requires_grad}
        assert trainable == {"align.weight", "align.bias"}
        for name, p in distiller.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name

    def test_builds_from_yaml_reads_the_named_tokens(self) -> None:
        spec = yaml.safe_load(self.yaml_config)
        assert Path(spec["init_args"]["tokens"]) == token_file()
        parse_distiller(spec)  # the shared check builds it; here the tokens it read
        built = MasKD(**spec["init_args"])
        expected = load_mask_tokens(token_file(), "backbone:0")
        assert torch.equal(built.masker.tokens, expected.tokens)
        assert built.tokens_file == str(token_file()) and built.weight == 7.0


# ---- behaviour ----------------------------------------------------------------------------------------
def pair(cs: int = 6, ct: int = 6, grad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, cs, 4, 5, generator=g).requires_grad_(grad)
    return {"s": s}, {"t": torch.randn(2, ct, 4, 5, generator=g)}


def test_tokens_frozen_align_trains() -> None:
    torch.manual_seed(0)
    maskd = MasKD(tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=6, align=True)
    assert maskd.align is not None and maskd.align.in_channels == 6  # align: even at equal channels
    frozen = {k: v.clone() for k, v in maskd.masker.state_dict().items()}
    align = maskd.align.weight.detach().clone()
    assert not any(p.requires_grad for p in maskd.masker.parameters())
    optimizer = torch.optim.SGD([p for p in maskd.parameters() if p.requires_grad], lr=1.0)
    s, t = pair(grad=True)
    maskd(s, t).backward()
    optimizer.step()
    for key, value in maskd.masker.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert not torch.equal(maskd.align.weight, align)
    # a plain SGD over every parameter (as mmcv's lr_mult 0 would give) leaves the tokens unchanged too
    torch.optim.SGD(maskd.parameters(), lr=1.0, weight_decay=0.1).step()
    assert torch.equal(maskd.masker.tokens, frozen["tokens"])


def test_calls_count_training_calls_and_are_saved() -> None:
    maskd = MasKD(tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=6)
    s, t = pair()
    assert maskd.calls.item() == 0 and maskd.calls.dtype == torch.long
    for _ in range(3):
        maskd(s, t)
    assert maskd.calls.item() == 3
    maskd.eval()
    maskd(s, t)
    maskd.spatial_masks(s, t)
    assert maskd.calls.item() == 3
    state = maskd.state_dict()
    assert state["calls"].item() == 3
    fresh = MasKD(tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=6)
    fresh.load_state_dict(state)
    assert fresh.calls.item() == 3


def test_custom_mask_starts_after_the_warm_up() -> None:
    maskd = MasKD(
        tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=6, student_channels=4,
        custom_mask=True, custom_mask_warmup=2,
    )  # fmt: skip
    s, t = pair(cs=4, grad=True)
    tokens, weights = maskd.masker.tokens, maskd.masker.token_weights(t["t"])

    def expected(custom: bool) -> torch.Tensor:
        aligned = maskd.align(s["s"])
        masks = token_masks(t["t"], tokens)
        if custom:
            masks = masks * token_masks(aligned, tokens).detach()
        return maskd_loss(aligned, t["t"], masks, token_weights=weights)

    teacher_only, custom = expected(False).item(), expected(True).item()
    assert teacher_only != pytest.approx(custom, rel=1e-3)
    got = []
    for _ in range(4):
        got.append(maskd(s, t).item())
    assert got == pytest.approx([teacher_only, teacher_only, custom, custom], rel=1e-6)
    # eval keeps the mask of the current count; a fresh (or reset) count goes back to the teacher's mask
    assert maskd.eval()(s, t).item() == pytest.approx(custom, rel=1e-6)
    maskd.calls.zero_()
    assert maskd(s, t).item() == pytest.approx(teacher_only, rel=1e-6)
    torch.testing.assert_close(maskd.spatial_masks(s, t), token_masks(t["t"], tokens))
    # without custom_mask the count never changes the mask
    plain = MasKD(
        tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=6, student_channels=4
    )
    plain.load_state_dict(maskd.state_dict())
    plain.calls.fill_(100)
    assert plain(s, t).item() == pytest.approx(teacher_only, rel=1e-6)


def test_custom_mask_carries_no_gradient() -> None:
    maskd = MasKD(
        tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=6, custom_mask=True,
        custom_mask_warmup=0,
    )  # fmt: skip
    s, t = pair(grad=True)
    maskd(s, t).backward()
    got = s["s"].grad.clone()
    s["s"].grad = None
    tokens = maskd.masker.tokens
    with torch.no_grad():
        masks = token_masks(t["t"], tokens) * token_masks(s["s"], tokens)
    maskd_loss(s["s"], t["t"], masks, token_weights=maskd.masker.token_weights(t["t"])).backward()
    torch.testing.assert_close(got, s["s"].grad)


def test_errors_name_the_file_the_layer_and_the_channels(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"read 6 channels.*\(4, 6\).*channels is 5"):
        MasKD(tokens=str(token_file()), student_layer="s", teacher_layer="t", channels=5)
    missing = tmp_path / "none" / "tokens.pt"
    with pytest.raises(FileNotFoundError) as info:
        MasKD(tokens=str(missing), teacher_layer="t", channels=6)
    assert str(missing) in str(info.value) and "lightningkd fit --config" in str(info.value)
    with pytest.raises(KeyError) as info:
        MasKD(tokens=str(token_file()), teacher_layer="backbone:1", channels=8)
    message = str(info.value)
    assert "'backbone:1'" in message and str(token_file()) in message
    assert all(repr(layer) in message for layer in FILE_LAYERS)
    torch.save({"tokens": torch.zeros(2, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a MasKD token file"):
        MasKD(tokens=str(tmp_path / "other.pt"), teacher_layer="t", channels=6)
    # the file is kept unless overwrite
    path = save_mask_tokens(tmp_path / "x.pt", {"a": ReceptiveTokens(3, 2)})
    with pytest.raises(FileExistsError, match="overwrite"):
        save_mask_tokens(path, {"a": ReceptiveTokens(3, 2)})
    replacement = ReceptiveTokens(5, 3, weighted=True)
    save_mask_tokens(path, {"b": replacement}, overwrite=True)
    loaded = load_mask_tokens(path, "b")
    assert loaded.weighted and torch.equal(loaded.tokens, replacement.tokens)


def test_rejects_bad_arguments_and_inputs() -> None:
    file = str(token_file())
    with pytest.raises(ValueError, match="custom_mask_warmup"):
        MasKD(tokens=file, teacher_layer="t", channels=6, custom_mask_warmup=-1)
    with pytest.raises(ValueError, match="eps"):
        MasKD(tokens=file, teacher_layer="t", channels=6, eps=-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        ReceptiveTokens(4, 1)
    maskd = MasKD(tokens=file, student_layer="s", teacher_layer="t", channels=6, student_channels=4)
    with pytest.raises(ValueError, match=r"built for 4 student and 6 teacher channels"):
        maskd(*pair(cs=6))
    with pytest.raises(ValueError, match="same batch size and spatial size"):
        maskd({"s": torch.zeros(2, 4, 3, 5)}, {"t": torch.zeros(2, 6, 4, 5)})
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="4 channels but the map"):
        token_masks(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"masks must be \(N, T, H, W\)"):
        maskd_loss(x, x, torch.zeros(2, 2, 3, 4))
    with pytest.raises(ValueError, match="token_weights"):
        maskd_loss(x, x, torch.zeros(2, 2, 4, 4), token_weights=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2 masks"):
        dice_diversity(torch.zeros(2, 1, 4))


def test_per_level_reads_each_levels_tokens() -> None:
    torch.manual_seed(0)
    template = MasKD(
        tokens=str(token_file()), channels=8, student_channels=4, align=True, custom_mask=True,
        custom_mask_warmup=1, weight=7.0,
    )  # fmt: skip
    per_level = PerLevel(distiller=template, levels=["0", "p6"])
    sizes = {"0": (6, 8), "p6": (3, 4)}
    for level in sizes:
        copy = per_level.level(level)
        expected = load_mask_tokens(token_file(), f"backbone:{level}")
        assert copy.teacher_layers == (f"backbone:{level}",)
        for key, value in expected.state_dict().items():
            assert torch.equal(copy.masker.state_dict()[key], value), (level, key)
        assert not any(p.requires_grad for p in copy.masker.parameters())
    assert not torch.equal(per_level.level("0").masker.tokens, per_level.level("p6").masker.tokens)
    assert not torch.equal(per_level.level("0").align.weight, per_level.level("p6").align.weight)
    # the sum over levels of 7 x each level's loss, each level counting its own calls
    g = torch.Generator().manual_seed(1)
    s = {f"backbone:{lv}": torch.randn(2, 4, *hw, generator=g) for lv, hw in sizes.items()}
    t = {f"backbone:{lv}": torch.randn(2, 8, *hw, generator=g) for lv, hw in sizes.items()}
    for _ in range(2):  # the second call is past the warm-up: the custom mask at every level
        total = per_level(s, t)
        expected = 0.0
        for level in sizes:
            alone = MasKD(
                tokens=str(token_file()), student_layer=f"backbone:{level}", teacher_layer=f"backbone:{level}",
                channels=8, student_channels=4, align=True, custom_mask=True, custom_mask_warmup=1,
            )  # fmt: skip
            state = per_level.level(level).state_dict()
            state["calls"] = state["calls"] - 1  # the count before this call
            alone.load_state_dict(state)
            expected += 7.0 * alone(s, t).item()
        assert total.item() == pytest.approx(expected, rel=1e-6)
    assert [per_level.level(lv).calls.item() for lv in sizes] == [2, 2]
