import math

import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.bpkd import BPKD
from lightningkd.functional.bpkd import boundary_masks, bpkd_loss, bpkd_terms
from tests.distiller_tester import DistillerTester, kl_by_hand, log_softmax_by_hand, parse_distiller

IGNORE = 255


# ---- the reconstructed equations in plain Python (independent of the code under test) ----------------
def _bins(size_in: int, size_out: int) -> list[range]:
    """Adaptive average-pooling bins: floor(i*H/h) .. ceil((i+1)*H/h)."""
    return [
        range(math.floor(i * size_in / size_out), math.ceil((i + 1) * size_in / size_out))
        for i in range(size_out)
    ]


def edges_by_hand(labels: list[list[int]], c: int, k: int, neutral: bool = True) -> list[list[float]]:
    """Edge of class c at label resolution, from its definition on k x k windows (clipped at the border)."""
    H, W, r = len(labels), len(labels[0]), k // 2
    out = [[0.0] * W for _ in range(H)]
    for y in range(H):
        for x in range(W):
            window = [
                labels[v][u]
                for v in range(max(0, y - r), min(H, y + r + 1))
                for u in range(max(0, x - r), min(W, x + r + 1))
            ]
            if neutral:
                # labelled pixel whose window holds class c and a labelled pixel of another class
                edge = labels[y][x] != IGNORE and c in window and any(v not in (c, IGNORE) for v in window)
            else:
                # dilate(G) - erode(G) of the one-hot with ignored pixels zero in every channel
                edge = (c in window) and not all(v == c for v in window)
            out[y][x] = 1.0 if edge else 0.0
    return out


def pool_by_hand(m: list[list[float]], size: tuple[int, int]) -> list[list[float]]:
    rows, cols = _bins(len(m), size[0]), _bins(len(m[0]), size[1])
    return [[sum(m[y][x] for y in ry for x in rx) / (len(ry) * len(rx)) for rx in cols] for ry in rows]


def masks_by_hand(labels, num_classes, k, size, neutral=True):
    """(edge, body) as nested lists [n][c][i][j]."""
    edges, bodies = [], []
    for lab in labels:
        valid = [[0.0 if v == IGNORE else 1.0 for v in row] for row in lab]
        pooled_valid = pool_by_hand(valid, size)
        e_img, b_img = [], []
        for c in range(num_classes):
            e = pool_by_hand(edges_by_hand(lab, c, k, neutral), size)
            e_img.append(e)
            if neutral:
                b_img.append([[pv - ev for pv, ev in zip(pr, er)] for pr, er in zip(pooled_valid, e)])
            else:
                b_img.append([[1.0 - ev for ev in er] for er in e])
        edges.append(e_img)
        bodies.append(b_img)
    return edges, bodies


def bpkd_by_hand(zs, zt, labels, *, k, T, alpha, count_mode="soft_sum", pre=True, Tb=None, neutral=True):
    """(L_edge, L_body) from methods-verified 1.2, with plain loops. zs, zt: [n][c][i][j]."""
    N, C, h, w = len(zs), len(zs[0]), len(zs[0][0]), len(zs[0][0][0])
    Tb = T if Tb is None else Tb
    edges, bodies = masks_by_hand(labels, C, k, (h, w), neutral)
    edge_total = 0.0
    for n in range(N):
        E = edges[n]
        per_image = 0.0
        phi = {}
        for i in range(h):
            for j in range(w):
                ms = [E[c][i][j] if pre else 1.0 for c in range(C)]
                ls = log_softmax_by_hand([zs[n][c][i][j] * ms[c] / T for c in range(C)])
                lt = log_softmax_by_hand([zt[n][c][i][j] * ms[c] / T for c in range(C)])
                phi[i, j] = T * T * kl_by_hand(lt, ls)
        for c in range(C):
            cells = [E[c][i][j] for i in range(h) for j in range(w)]
            n_c = sum(cells) if count_mode == "soft_sum" else sum(1 for v in cells if v > 0)
            n_c = max(n_c, 1.0)
            per_image += sum(E[c][i][j] * phi[i, j] for i in range(h) for j in range(w)) / n_c
        edge_total += per_image
    edge = alpha * edge_total / N

    body_total = 0.0
    for n in range(N):
        for c in range(C):
            B = [bodies[n][c][i][j] for i in range(h) for j in range(w)]
            s = [zs[n][c][i][j] for i in range(h) for j in range(w)]
            t = [zt[n][c][i][j] for i in range(h) for j in range(w)]
            if pre:
                ls = log_softmax_by_hand([a * b / Tb for a, b in zip(s, B)])
                lt = log_softmax_by_hand([a * b / Tb for a, b in zip(t, B)])
                body_total += kl_by_hand(lt, ls)
            else:
                ls = log_softmax_by_hand([a / Tb for a in s])
                lt = log_softmax_by_hand([a / Tb for a in t])
                body_total += sum(b * math.exp(x) * (x - y) for b, x, y in zip(B, lt, ls))
    body = Tb * Tb * body_total / (N * C)
    return edge, body


# 8x8 map: a 4x4 square of class 1 on class 0
SQUARE = [[1 if 2 <= y <= 5 and 2 <= x <= 5 else 0 for x in range(8)] for y in range(8)]

# drawn by hand: with a 3x3 kernel, both the inner and the outer ring of the square are edge pixels
SQUARE_EDGE_K3 = [
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 1, 0],
    [0, 1, 1, 1, 1, 1, 1, 0],
    [0, 1, 1, 0, 0, 1, 1, 0],
    [0, 1, 1, 0, 0, 1, 1, 0],
    [0, 1, 1, 1, 1, 1, 1, 0],
    [0, 1, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
]

# the same edge averaged over 2x2 cells (logit size 4x4), counted by hand
SQUARE_EDGE_K3_POOLED = [
    [0.25, 0.5, 0.5, 0.25],
    [0.5, 0.75, 0.75, 0.5],
    [0.5, 0.75, 0.75, 0.5],
    [0.25, 0.5, 0.5, 0.25],
]


def _labels(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).unsqueeze(0)


def _mixed_labels() -> torch.Tensor:
    """(2, 8, 8) labels with 3 classes, irregular regions and ignored pixels."""
    a = [[0] * 8 for _ in range(8)]
    for y in range(8):
        for x in range(8):
            if x + y > 8:
                a[y][x] = 2
            if 1 <= y <= 3 and 1 <= x <= 4:
                a[y][x] = 1
    a[6][0] = a[7][0] = a[7][1] = IGNORE
    b = [[(x // 3 + y // 4) % 3 for x in range(8)] for y in range(8)]
    b[0][5] = b[0][6] = b[1][6] = IGNORE
    return torch.tensor([a, b], dtype=torch.long)


class TestBPKD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.bpkd.BPKD\n"
        "init_args: {num_classes: 19, edge_width: 7, temperature: 4.0, edge_weight: 50.0, body_weight: 20.0}"
    )

    term_names = ("edge", "body")

    def make(self) -> BPKD:
        return BPKD(num_classes=3, edge_width=3)

    def twin(self, distiller, student, teacher, batch):
        return bpkd_loss(
            student["output"],
            teacher["output"],
            batch["target"],
            edge_weight=distiller.edge_weight,
            body_weight=distiller.body_weight,
            edge_width=distiller.edge_width,
            temperature=distiller.temperature,
            alpha_edge=distiller.alpha_edge,
            count_mode=distiller.count_mode,
            ignore_mode=distiller.ignore_mode,
        )

    def resized_inputs(self):
        return self.inputs()  # student 4x4, teacher 8x8 logits

    def inputs(self):
        target = torch.zeros(2, 16, 16, dtype=torch.long)
        target[:, 4:12, 3:10] = 1
        target[1, 10:, 8:] = 2
        target[0, :2, :5] = IGNORE
        # teacher logits at a different size: resized to the student's
        return (
            {"output": torch.randn(2, 3, 4, 4, requires_grad=True)},
            {"output": torch.randn(2, 3, 8, 8)},
            {"target": target},
        )

    # ---- masks ----
    def test_masks_on_a_hand_drawn_square(self) -> None:
        y = _labels(SQUARE)
        edge, body = boundary_masks(y, num_classes=2, size=(8, 8), edge_width=3)
        expected = torch.tensor(SQUARE_EDGE_K3, dtype=torch.float32)
        # both classes share the same trimap edge in a two-class map
        assert torch.equal(edge[0, 0], expected) and torch.equal(edge[0, 1], expected)
        assert torch.equal(body[0, 1], 1 - expected)
        edge, body = boundary_masks(y, num_classes=2, size=(4, 4), edge_width=3)
        pooled = torch.tensor(SQUARE_EDGE_K3_POOLED)
        assert torch.equal(edge[0, 1], pooled) and torch.equal(body[0, 1], 1 - pooled)
        # distiller helper: same masks
        e2, b2 = BPKD(num_classes=2, edge_width=3).masks(y, (4, 4))
        assert torch.equal(e2, edge) and torch.equal(b2, body)

    def test_wider_kernel_and_non_integer_ratio(self) -> None:
        y = _mixed_labels()
        for k, size in ((5, (3, 3)), (3, (5, 3)), (7, (8, 8)), (1, (4, 4))):
            edge, body = boundary_masks(y, 3, size, edge_width=k)
            e_hand, b_hand = masks_by_hand(y.tolist(), 3, k, size)
            assert torch.allclose(edge, torch.tensor(e_hand), atol=1e-6), (k, size)
            assert torch.allclose(body, torch.tensor(b_hand), atol=1e-6), (k, size)
        # a 1x1 kernel has no edges at all
        assert boundary_masks(y, 3, (4, 4), edge_width=1)[0].sum() == 0

    def test_background_ignore_mode_is_the_literal_one_hot(self) -> None:
        y = _mixed_labels()
        edge, body = boundary_masks(y, 3, (4, 4), edge_width=3, ignore_mode="background")
        e_hand, b_hand = masks_by_hand(y.tolist(), 3, 3, (4, 4), neutral=False)
        assert torch.allclose(edge, torch.tensor(e_hand), atol=1e-6)
        assert torch.allclose(body, torch.tensor(b_hand), atol=1e-6)

    def test_a_region_changed_to_ignore_loses_its_edges(self) -> None:
        rows = [[IGNORE if v == 1 else 0 for v in row] for row in SQUARE]
        edge, body = boundary_masks(_labels(rows), 2, (8, 8), edge_width=3)
        assert edge.sum() == 0  # neither the square's edge (class 1) nor the hole's rim (class 0)
        valid = torch.tensor([[0.0 if v == IGNORE else 1.0 for v in row] for row in rows])
        assert torch.equal(body[0, 0], valid) and torch.equal(body[0, 1], valid)
        # the literal reading keeps the rim of the ignored hole as an edge of class 0 (and ignored pixels)
        edge_bg, _ = boundary_masks(_labels(rows), 2, (8, 8), edge_width=3, ignore_mode="background")
        assert torch.equal(edge_bg[0, 0], torch.tensor(SQUARE_EDGE_K3, dtype=torch.float32))
        assert edge_bg[0, 1].sum() == 0

    def test_ignore_neither_creates_nor_hides_edges(self) -> None:
        # ignored strip inside class 0, away from the square: no new edge anywhere
        rows = [row[:] for row in SQUARE]
        rows[7] = [IGNORE] * 8
        edge, _ = boundary_masks(_labels(rows), 2, (8, 8), edge_width=3)
        expected = torch.tensor(SQUARE_EDGE_K3, dtype=torch.float32)
        expected[7] = 0  # ignored pixels are never edges; the row above keeps its edges
        assert torch.equal(edge[0, 0], expected) and torch.equal(edge[0, 1], expected)

    # ---- loss values ----
    @pytest.mark.parametrize(
        "kwargs",
        [
            dict(k=3, T=2.0, alpha=2.0),
            dict(k=5, T=1.0, alpha=1.5, count_mode="nonzero_count"),
            dict(k=3, T=4.0, alpha=2.0, pre=False),
            dict(k=3, T=2.0, alpha=2.0, Tb=3.0),
            dict(k=3, T=2.0, alpha=2.0, neutral=False),
        ],
        ids=["default", "count", "post-mask-only", "body-T", "background"],
    )
    def test_known_value(self, kwargs) -> None:
        torch.manual_seed(0)
        y = _mixed_labels()
        zs, zt = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
        edge_hand, body_hand = bpkd_by_hand(zs.tolist(), zt.tolist(), y.tolist(), **kwargs)
        edge, body = bpkd_terms(
            zs,
            zt,
            y,
            edge_width=kwargs["k"],
            temperature=kwargs["T"],
            body_temperature=kwargs.get("Tb"),
            alpha_edge=kwargs["alpha"],
            count_mode=kwargs.get("count_mode", "soft_sum"),
            mask_logits_before_softmax=kwargs.get("pre", True),
            ignore_mode="neutral" if kwargs.get("neutral", True) else "background",
        )
        assert edge.item() == pytest.approx(edge_hand, rel=1e-10)
        assert body.item() == pytest.approx(body_hand, rel=1e-10)
        assert edge_hand > 0 and body_hand > 0

    def test_distiller_combines_the_terms(self) -> None:
        torch.manual_seed(1)
        y = _mixed_labels()
        zs, zt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        edge_hand, body_hand = bpkd_by_hand(zs.tolist(), zt.tolist(), y.tolist(), k=3, T=4.0, alpha=2.0)
        bpkd = BPKD(num_classes=3, edge_width=3, edge_weight=5.0, body_weight=3.0)
        got = bpkd({"output": zs}, {"output": zt}, {"target": y})
        assert got.item() == pytest.approx(3.0 * body_hand + 5.0 * edge_hand, rel=1e-5)
        terms = bpkd.terms({"output": zs}, {"output": zt}, {"target": y})
        assert list(terms) == ["edge", "body"]  # each already multiplied by its weight
        assert terms["edge"].item() == pytest.approx(5.0 * edge_hand, rel=1e-5)
        assert terms["body"].item() == pytest.approx(3.0 * body_hand, rel=1e-5)
        assert bpkd_loss(zs, zt, y, edge_width=3, edge_weight=5.0, body_weight=3.0).item() == pytest.approx(
            got.item(), rel=1e-6
        )

    def test_teacher_logits_are_resized_to_the_student(self) -> None:
        torch.manual_seed(2)
        y = _mixed_labels()
        zs, zt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
        resized = F.interpolate(zt, size=(4, 4), mode="bilinear", align_corners=False)
        a = bpkd_terms(zs, zt, y, edge_width=3)
        b = bpkd_terms(zs, resized, y, edge_width=3)
        assert all(torch.allclose(u, v) for u, v in zip(a, b))

    def test_count_mode_soft_sum_is_never_smaller(self) -> None:
        torch.manual_seed(3)
        y = _mixed_labels()
        zs, zt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        soft = bpkd_terms(zs, zt, y, edge_width=3, count_mode="soft_sum")
        count = bpkd_terms(zs, zt, y, edge_width=3, count_mode="nonzero_count")
        assert soft[0].item() > count[0].item()  # soft edge fractions (< 1) give smaller n_c
        assert soft[1].item() == count[1].item()  # the body loss does not use n_c

    def test_mask_before_softmax_changes_both_terms(self) -> None:
        torch.manual_seed(4)
        y = _mixed_labels()
        zs, zt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        pre = bpkd_terms(zs, zt, y, edge_width=3, mask_logits_before_softmax=True)
        post = bpkd_terms(zs, zt, y, edge_width=3, mask_logits_before_softmax=False)
        assert pre[0].item() != pytest.approx(post[0].item(), rel=1e-3)
        assert pre[1].item() != pytest.approx(post[1].item(), rel=1e-3)

    def test_logits_of_fully_ignored_cells_have_no_effect(self) -> None:
        # with the default (neutral, masks before softmax) a logit cell whose label pixels are all ignored
        # has zero edge and body masks, so its logits never enter the loss
        torch.manual_seed(5)
        y = _mixed_labels()
        y[:, 0:2, 2:4] = IGNORE  # the 2x2 label block of logit cell (0, 1)
        zs, zt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        zs2, zt2 = zs.clone(), zt.clone()
        zs2[:, :, 0, 1] += torch.tensor([5.0, -3.0, 2.0])
        zt2[:, :, 0, 1] -= torch.tensor([1.0, 4.0, -2.0])
        bpkd = BPKD(num_classes=3, edge_width=3)
        a = bpkd.terms({"output": zs}, {"output": zt}, {"target": y})
        b = bpkd.terms({"output": zs2}, {"output": zt2}, {"target": y})
        assert all(a[k].item() == pytest.approx(b[k].item(), rel=1e-6) for k in ("edge", "body"))
        # a cell that is only partly ignored does take part
        zs3 = zs.clone()
        zs3[:, :, 3, 0] += 3.0
        c = bpkd.terms({"output": zs3}, {"output": zt}, {"target": y})
        assert c["body"].item() != pytest.approx(a["body"].item(), rel=1e-4)

    def test_identical_logits_give_zero(self) -> None:
        y = _mixed_labels()
        z = torch.randn(2, 3, 4, 4)
        assert BPKD(num_classes=3)(
            {"output": z}, {"output": z.clone()}, {"target": y}
        ).item() == pytest.approx(0.0, abs=1e-6)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="edge_width must be an odd positive integer"):
            BPKD(num_classes=3, edge_width=4)
        with pytest.raises(ValueError, match="edge_width must be an odd positive integer"):
            BPKD(num_classes=3, edge_width=0)
        with pytest.raises(ValueError, match="edge_width must be an odd"):
            boundary_masks(torch.zeros(1, 4, 4, dtype=torch.long), 2, (2, 2), edge_width=2)
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            BPKD(num_classes=0)
        with pytest.raises(ValueError, match="temperature must be a number > 0"):
            BPKD(num_classes=3, temperature=0.0)
        with pytest.raises(ValueError, match="count_mode must be one of"):
            BPKD(num_classes=3, count_mode="hard")
        with pytest.raises(ValueError, match="ignore_mode must be one of"):
            BPKD(num_classes=3, ignore_mode="skip")
        with pytest.raises(ValueError, match="edge_weight must be a number >= 0"):
            BPKD(num_classes=3, edge_weight=-1.0)
        bpkd = BPKD(num_classes=3, edge_width=3)
        z = {"output": torch.zeros(2, 3, 4, 4)}
        with pytest.raises(ValueError, match="needs the ground-truth labels"):
            bpkd(z, z, None)
        bad = _mixed_labels()
        bad[0, 0, 0] = 3  # a class id >= num_classes that is not the ignore label
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*\[3\]"):
            bpkd(z, z, {"target": bad})
        bad[0, 0, 0] = -1
        with pytest.raises(ValueError, match=r"ignore_index=255, found \[-1\]"):
            bpkd(z, z, {"target": bad})
        with pytest.raises(TypeError, match="integer class labels"):
            bpkd(z, z, {"target": torch.zeros(2, 8, 8)})
        with pytest.raises(ValueError, match=r"\(N, H_label, W_label\).*\(2, 3, 8, 8\)"):
            bpkd(z, z, {"target": torch.zeros(2, 3, 8, 8, dtype=torch.long)})
        with pytest.raises(ValueError, match="built for num_classes=3"):
            bpkd(
                {"output": torch.zeros(2, 4, 4, 4)},
                {"output": torch.zeros(2, 4, 4, 4)},
                {"target": _mixed_labels()},
            )
        with pytest.raises(ValueError, match="same batch size and number of classes"):
            bpkd_terms(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 4, 4), _mixed_labels())
        with pytest.raises(KeyError, match="tapped"):
            bpkd({"logits": torch.zeros(2, 3, 4, 4)}, z, {"target": _mixed_labels()})
        with pytest.raises(ValueError, match="body_weight must be a number >= 0"):
            bpkd_loss(z["output"], z["output"], _mixed_labels(), body_weight=-2.0)

    @pytest.mark.parametrize("key,value", [("count_mode", "soft"), ("ignore_mode", "ignore")])
    def test_yaml_mode_typo_fails_at_parse_time(self, key: str, value: str) -> None:
        spec = {"class_path": "lightningkd.distillers.BPKD", "init_args": {"num_classes": 3, key: value}}
        with pytest.raises(Exception, match=rf"(?s){key}.*Got value: {value}"):
            parse_distiller(spec)
