import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightningkd.distillers.cirkd import CIRKDMemory, CIRKDMiniBatch
from lightningkd.functional._helpers import resize_labels
from lightningkd.functional.cirkd import cirkd_enqueue_, cirkd_memory_terms, cirkd_minibatch_loss
from tests.distiller_tester import DistillerTester, kl_by_hand, log_softmax_by_hand

IGNORE = 255
BN_EPS = 1e-5  # BatchNorm2d default; in eval mode with fresh running stats BN is x / sqrt(1 + eps)


# ---- independent re-derivations (plain Python / numpy, never the code under test) -----------------------
def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(n, 1e-12) for x in v]


def _pixels(fmap) -> list[list[float]]:
    """[c][h][w] -> list of the H*W normalised channel vectors, row-major."""
    C, H, W = len(fmap), len(fmap[0]), len(fmap[0][0])
    return [_unit([fmap[c][y][x] for c in range(C)]) for y in range(H) for x in range(W)]


def pool_by_hand(fmap, k: int = 2):
    """k x k average pooling, stride k, ceil mode: partial windows average the pixels they hold."""
    C, H, W = len(fmap), len(fmap[0]), len(fmap[0][0])
    out = []
    for c in range(C):
        rows = []
        for y0 in range(0, H, k):
            row = []
            for x0 in range(0, W, k):
                vals = [fmap[c][y][x] for y in range(y0, min(H, y0 + k)) for x in range(x0, min(W, x0 + k))]
                row.append(sum(vals) / len(vals))
            rows.append(row)
        out.append(rows)
    return out


def minibatch_by_hand(fs, ft, T: float, pooling: bool = False) -> float:
    """Paper's mini-batch pixel-to-pixel loss: mean over the B^2 pairs of batchmean KL of row softmaxes."""
    if pooling:
        fs, ft = [pool_by_hand(f) for f in fs], [pool_by_hand(f) for f in ft]
    ps, pt = [_pixels(f) for f in fs], [_pixels(f) for f in ft]
    B, HW = len(fs), len(ps[0])
    total = 0.0
    for i in range(B):
        for j in range(B):
            pair = 0.0
            for p in range(HW):
                row_s = [sum(a * b for a, b in zip(ps[i][p], ps[j][q])) / T for q in range(HW)]
                row_t = [sum(a * b for a, b in zip(pt[i][p], pt[j][q])) / T for q in range(HW)]
                pair += kl_by_hand(log_softmax_by_hand(row_t), log_softmax_by_hand(row_s))
            total += pair / HW
    return total / (B * B)


def nearest_by_hand(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Legacy nearest resize: source index floor(i * H / h)."""
    N, H, W = labels.shape
    h, w = size
    rows = [math.floor(i * H / h) for i in range(h)]
    cols = [math.floor(j * W / w) for j in range(w)]
    return labels[:, rows][:, :, cols]


def memory_terms_by_hand(s, t, labels, pixel_keys, region_keys, tau, kd_T):
    """numpy: s, t (N, D, h, w); labels (N, H, W); keys (K, n, D) -> (p2p, p2r)."""

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    N, D, h, w = s.shape
    lab = nearest_by_hand(labels, (h, w)).reshape(-1)
    s_rows = unit(s.transpose(0, 2, 3, 1).reshape(-1, D))[lab != IGNORE]
    t_rows = unit(t.transpose(0, 2, 3, 1).reshape(-1, D))[lab != IGNORE]
    out = []
    for keys in (pixel_keys, region_keys):
        k = keys.reshape(-1, D)
        ls = (s_rows @ k.T) / tau / kd_T
        lt = (t_rows @ k.T) / tau / kd_T
        ls = (
            ls
            - np.log(np.exp(ls - ls.max(1, keepdims=True)).sum(1, keepdims=True))
            - ls.max(1, keepdims=True)
        )
        lt = (
            lt
            - np.log(np.exp(lt - lt.max(1, keepdims=True)).sum(1, keepdims=True))
            - lt.max(1, keepdims=True)
        )
        out.append(float((np.exp(lt) * (lt - ls)).sum() / len(s_rows) * kd_T**2))
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sorted_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[np.lexsort(x.T[::-1])]


# a (1, 4, 4) label map with classes 0, 1, 2 and ignored pixels; every class has <= 16 pixels
LABELS_4x4 = [[0, 0, 1, 1], [0, IGNORE, 1, 2], [2, 2, 1, 2], [IGNORE, 0, 0, 2]]


class TestCIRKDMiniBatch(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.cirkd.CIRKDMiniBatch\n"
        "init_args: {student_layer: decode_head.bottleneck, teacher_layer: decode_head.bottleneck,"
        " temperature: 0.1}"
    )

    def make(self) -> CIRKDMiniBatch:
        return CIRKDMiniBatch(student_layer="s", teacher_layer="t")

    def twin(self, distiller, student, teacher, batch):
        return cirkd_minibatch_loss(student["s"], teacher["t"], distiller.temperature, distiller.pooling)

    def inputs(self):
        return ({"s": torch.randn(2, 4, 3, 3, requires_grad=True)}, {"t": torch.randn(2, 6, 3, 3)}, None)

    @pytest.mark.parametrize(
        "B,Cs,Ct,H,W,T,pooling",
        [(2, 4, 4, 2, 3, 0.1, False), (3, 3, 5, 2, 2, 0.1, False), (2, 3, 6, 3, 5, 0.5, True)],
        ids=["B2-T0.1", "B3-Cs!=Ct", "pool-ceil-T0.5"],
    )
    def test_known_value(self, B, Cs, Ct, H, W, T, pooling) -> None:
        torch.manual_seed(B + Cs + Ct)
        fs = torch.randn(B, Cs, H, W, dtype=torch.float64)
        ft = torch.randn(B, Ct, H, W, dtype=torch.float64)
        expected = minibatch_by_hand(fs.tolist(), ft.tolist(), T, pooling)
        assert cirkd_minibatch_loss(fs, ft, T, pooling).item() == pytest.approx(expected, rel=1e-10)
        got = CIRKDMiniBatch(student_layer="s", teacher_layer="t", temperature=T, pooling=pooling)(
            {"s": fs.float()}, {"t": ft.float()}
        )
        assert got.item() == pytest.approx(expected, rel=1e-4)

    def test_includes_the_self_pairs(self) -> None:
        # with one image the only pair is (0, 0), and it is not zero
        torch.manual_seed(0)
        fs, ft = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(1, 3, 2, 2, dtype=torch.float64)
        expected = minibatch_by_hand(fs.tolist(), ft.tolist(), 0.1)
        assert expected > 0
        assert cirkd_minibatch_loss(fs, ft).item() == pytest.approx(expected, rel=1e-10)

    def test_both_forms_reject_different_spatial_sizes(self) -> None:
        # pixel i of the student is compared with pixel i of the teacher: no resizing, in either form
        s, t = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 4, 4)
        message = r"same batch size and spatial size.*same stride"
        with pytest.raises(ValueError, match=message):
            self.make()({"s": s}, {"t": t})
        with pytest.raises(ValueError, match=message):
            cirkd_minibatch_loss(s, t)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="temperature must be a number > 0"):
            CIRKDMiniBatch(student_layer="s", teacher_layer="t", temperature=0.0)
        cirkd = self.make()
        with pytest.raises(ValueError, match="same batch size and spatial size"):
            cirkd({"s": torch.zeros(2, 4, 3, 3)}, {"t": torch.zeros(2, 4, 4, 4)})
        with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
            cirkd({"s": torch.zeros(2, 4)}, {"t": torch.zeros(2, 4)})
        with pytest.raises(KeyError, match="tapped"):
            cirkd({"x": torch.zeros(2, 4, 3, 3)}, {"t": torch.zeros(2, 4, 3, 3)})


def make_memory(**kwargs) -> CIRKDMemory:
    args = dict(
        student_layer="s",
        teacher_layer="t",
        student_channels=4,
        teacher_channels=6,
        num_classes=3,
        pixel_memory_size=40,
        region_memory_size=8,
    )
    return CIRKDMemory(**{**args, **kwargs})


class TestCIRKDMemory(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.cirkd.CIRKDMemory\n"
        "init_args: {student_layer: decode_head.bottleneck, teacher_layer: decode_head.bottleneck,"
        " student_channels: 128, teacher_channels: 256, num_classes: 19, pixel_memory_size: 100,"
        " region_memory_size: 20, weight: 0.1}"
    )

    term_names = ("p2p", "p2r")

    def make(self) -> CIRKDMemory:
        return make_memory(pixel_weight=0.5, region_weight=2.0)

    def twin(self, distiller, student, teacher, batch):
        p2p, p2r = cirkd_memory_terms(
            distiller.project_head(student["s"]),
            teacher["t"],
            batch["target"],
            distiller.pixel_queue,
            distiller.region_queue,
            pixel_contrast_size=distiller.pixel_contrast_size,
            region_contrast_size=distiller.region_contrast_size,
            contrast_temperature=distiller.contrast_temperature,
            kd_temperature=distiller.kd_temperature,
            ignore_index=distiller.ignore_index,
        )
        return distiller.pixel_weight * p2p + distiller.region_weight * p2r

    def inputs(self):
        target = torch.randint(0, 3, (2, 8, 8))
        target[0, :2] = IGNORE
        return (
            {"s": torch.randn(2, 4, 4, 4, requires_grad=True)},
            {"t": torch.randn(2, 6, 4, 4)},
            {"target": target},
        )

    def test_both_forms_reject_different_spatial_sizes(self) -> None:
        cirkd = self.make()
        s, t = torch.zeros(2, 4, 4, 4), torch.zeros(2, 6, 2, 2)
        labels = torch.zeros(2, 8, 8, dtype=torch.long)
        message = r"same batch size and spatial size.*same stride"
        with pytest.raises(ValueError, match=message):
            cirkd({"s": s}, {"t": t}, {"target": labels})
        with pytest.raises(ValueError, match=message):
            cirkd_memory_terms(
                torch.zeros(2, 6, 4, 4), t, labels, cirkd.pixel_queue, cirkd.region_queue,
                pixel_contrast_size=2, region_contrast_size=2,
            )  # fmt: skip

    def test_queues_are_buffers_not_parameters(self) -> None:
        cirkd = self.make()
        params = {name for name, _ in cirkd.named_parameters()}
        assert params == {
            "project_head.0.weight",
            "project_head.1.weight",
            "project_head.1.bias",
            "project_head.3.weight",
        }
        state = cirkd.state_dict()
        assert state["pixel_queue"].shape == (3, 40, 6) and state["region_queue"].shape == (3, 8, 6)
        assert state["pixel_queue_ptr"].dtype == torch.long and state["region_queue_ptr"].shape == (3,)
        assert torch.allclose(cirkd.pixel_queue.norm(dim=2), torch.ones(3, 40))  # random unit vectors
        # the authors' contrast sizes: 4096 // K + 1 and 1024 // K + 1, at most the memory size
        big = make_memory(num_classes=19, pixel_memory_size=500, region_memory_size=100)
        assert (big.pixel_contrast_size, big.region_contrast_size) == (4096 // 19 + 1, 54)
        assert (make_memory().pixel_contrast_size, make_memory().region_contrast_size) == (40, 8)

    def test_functional_known_value(self) -> None:
        rng = np.random.default_rng(0)
        N, D, K = 2, 5, 3
        s, t = rng.normal(size=(N, D, 2, 2)), rng.normal(size=(N, D, 2, 2))
        labels = np.array([[[0, 0, 1, 1], [0, 0, 1, 1], [2, IGNORE, 1, 1], [2, 2, 0, 0]]] * 2)
        labels[1, 0, 0] = IGNORE  # ignored after the nearest resize (source pixel (0, 0))
        pq, rq = unit_rows(rng.normal(size=(K, 7, D))), unit_rows(rng.normal(size=(K, 4, D)))
        pidx, ridx = np.array([5, 0, 3]), np.array([2, 1])
        for tau, kd_T in ((0.1, 1.0), (0.2, 4.0)):
            expected = memory_terms_by_hand(s, t, labels, pq[:, pidx], rq[:, ridx], tau, kd_T)
            got = cirkd_memory_terms(
                torch.tensor(s),
                torch.tensor(t),
                torch.tensor(labels),
                torch.tensor(pq),
                torch.tensor(rq),
                pixel_contrast_size=3,
                region_contrast_size=2,
                contrast_temperature=tau,
                kd_temperature=kd_T,
                pixel_index=torch.tensor(pidx),
                region_index=torch.tensor(ridx),
            )
            assert got[0].item() == pytest.approx(expected[0], rel=1e-10)
            assert got[1].item() == pytest.approx(expected[1], rel=1e-10)

    def test_contrast_size_equal_to_memory_only_permutes_the_keys(self) -> None:
        rng = np.random.default_rng(1)
        s, t = rng.normal(size=(1, 4, 4, 4)), rng.normal(size=(1, 4, 4, 4))
        labels = np.array([LABELS_4x4])
        pq, rq = unit_rows(rng.normal(size=(3, 6, 4))), unit_rows(rng.normal(size=(3, 3, 4)))
        expected = memory_terms_by_hand(s, t, labels, pq, rq, 0.1, 1.0)
        for seed in range(3):
            got = cirkd_memory_terms(
                *(torch.tensor(x) for x in (s, t, labels, pq, rq)),
                pixel_contrast_size=6,
                region_contrast_size=3,
                generator=torch.Generator().manual_seed(seed),
            )
            assert [g.item() for g in got] == pytest.approx(expected, rel=1e-10)

    def test_enqueue_writes_the_class_pixels_and_means(self) -> None:
        torch.manual_seed(2)
        t = torch.randn(1, 4, 4, 4, dtype=torch.float64)
        labels = torch.tensor([LABELS_4x4])
        pq, pp = torch.zeros(3, 10, 4, dtype=torch.float64), torch.tensor([0, 7, 3])
        rq, rp = torch.zeros(3, 3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
        cirkd_enqueue_(pq, pp, rq, rp, t, labels)
        pixels = unit_rows(t[0].numpy().reshape(4, -1).T)  # (16, D), row-major
        flat = np.array(LABELS_4x4).reshape(-1)
        # class 0: 5 pixels at slots 0..4; class 1: 4 pixels wrap from slot 7 to 0; class 2: 5 at 3..7
        for c, slots, ptr in ((0, [0, 1, 2, 3, 4], 5), (1, [7, 8, 9, 0], 1), (2, [3, 4, 5, 6, 7], 8)):
            np.testing.assert_allclose(sorted_rows(pq[c, slots]), sorted_rows(pixels[flat == c]), rtol=1e-12)
            others = [i for i in range(10) if i not in slots]
            assert pq[c, others].abs().sum() == 0
            assert pp[c].item() == ptr
            np.testing.assert_allclose(
                rq[c, [0, 2, 1][c]].numpy(), unit_rows(pixels[flat == c].mean(axis=0)), rtol=1e-12
            )
        assert rp.tolist() == [1, 0, 2]  # region pointers advance by one, modulo 3

    def test_enqueue_takes_at_most_pixels_per_class(self) -> None:
        torch.manual_seed(3)
        t = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        labels = torch.zeros(2, 6, 6, dtype=torch.long)
        labels[1, :, :3] = IGNORE
        pq, pp = torch.zeros(1, 50, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
        rq, rp = torch.zeros(1, 5, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
        cirkd_enqueue_(pq, pp, rq, rp, t, labels, pixels_per_class=16)
        assert pp.item() == 32 and rp.item() == 2
        written = F.normalize(pq[0, :32], dim=1)
        # every entry is a class-0 pixel of its image (never an ignored one)
        img0 = F.normalize(t[0].reshape(4, -1).T, dim=1)
        img1 = F.normalize(t[1].reshape(4, 6, 6)[:, :, 3:].reshape(4, -1).T, dim=1)
        assert all((torch.cdist(written[i : i + 1], img0).min() < 1e-6) for i in range(16))
        assert all((torch.cdist(written[i : i + 1], img1).min() < 1e-6) for i in range(16, 32))

    def test_official_enqueue_reproduces_the_authors_quirks(self) -> None:
        t = torch.arange(1.0, 9.0).reshape(1, 2, 1, 4)  # 4 pixels, 2 channels
        labels = torch.tensor([[[0, 0, 1, 1]]])
        pixels = F.normalize(t[0].reshape(2, -1).T, dim=1)  # (4, 2)

        def run(official: bool, ptr: int):
            pq, pp = torch.zeros(2, 4, 2), torch.tensor([0, ptr])
            rq, rp = torch.zeros(2, 2, 2), torch.zeros(2, dtype=torch.long)
            cirkd_enqueue_(pq, pp, rq, rp, t, labels, official=official)
            return pq, pp

        # bug: class 1's entries come from the image's first positions (class 0's pixels)
        pq, pp = run(official=True, ptr=0)
        np.testing.assert_allclose(sorted_rows(pq[1, :2]), sorted_rows(pixels[:2]), rtol=1e-6)
        pq, pp = run(official=False, ptr=0)
        np.testing.assert_allclose(sorted_rows(pq[1, :2]), sorted_rows(pixels[2:]), rtol=1e-6)
        # ring quirk: ptr + K >= size overwrites the last K slots and resets ptr to 0
        pq, pp = run(official=True, ptr=3)
        assert pq[1, :2].abs().sum() == 0 and pq[1, 2:].abs().sum() > 0 and pp[1].item() == 0
        pq, pp = run(official=False, ptr=3)  # true ring: slots 3 and 0, ptr 1
        assert pq[1, 1:3].abs().sum() == 0 and pq[1, [3, 0]].abs().sum() > 0 and pp[1].item() == 1

    def test_distiller_known_value_after_one_step(self) -> None:
        # deterministic: contrast size = memory size (the draws only permute the keys), every class has
        # <= 16 pixels per image (all are enqueued), writes never overlap
        torch.manual_seed(4)
        Cs, Ct, K, Mp, Mr = 3, 4, 3, 12, 4
        cirkd = make_memory(
            student_channels=Cs,
            teacher_channels=Ct,
            num_classes=K,
            pixel_memory_size=Mp,
            region_memory_size=Mr,
            pixel_contrast_size=Mp,
            region_contrast_size=Mr,
            kd_temperature=2.0,
            contrast_temperature=0.2,
            pixel_weight=0.5,
            region_weight=3.0,
        ).double()
        cirkd.train()
        cirkd.project_head.eval()  # fresh running stats: BN is x / sqrt(1 + eps)
        w1 = torch.randn(Ct, Cs, dtype=torch.float64)
        w2 = torch.randn(Ct, Ct, dtype=torch.float64)
        with torch.no_grad():
            cirkd.project_head[0].weight.copy_(w1.reshape(Ct, Cs, 1, 1))
            cirkd.project_head[3].weight.copy_(w2.reshape(Ct, Ct, 1, 1))
            cirkd.pixel_queue_ptr.copy_(torch.tensor([0, 2, 5]))
            cirkd.region_queue_ptr.copy_(torch.tensor([1, 0, 3]))
        init_pixel, init_region = cirkd.pixel_queue.clone().numpy(), cirkd.region_queue.clone().numpy()

        s, t = torch.randn(2, Cs, 4, 4, dtype=torch.float64), torch.randn(2, Ct, 4, 4, dtype=torch.float64)
        labels = torch.tensor([LABELS_4x4, [[1, 1, 0, 0], [1, 1, 0, 0], [IGNORE] * 4, [0, 1, 1, 1]]])
        terms = cirkd.terms({"s": s}, {"t": t}, {"target": labels})

        # expected memory after the enqueue, by hand
        lab = labels.numpy()
        tp = unit_rows(t.numpy().transpose(0, 2, 3, 1).reshape(2, 16, Ct))
        pixel_mem, region_mem = init_pixel.copy(), init_region.copy()
        pptr, rptr = [0, 2, 5], [1, 0, 3]
        for b in range(2):
            flat = lab[b].reshape(-1)
            for c in range(K):
                rows = tp[b][flat == c]
                if len(rows) == 0:
                    continue
                region_mem[c, rptr[c]] = unit_rows(rows.mean(axis=0))
                rptr[c] = (rptr[c] + 1) % Mr
                for r in rows:
                    pixel_mem[c, pptr[c]] = r
                    pptr[c] = (pptr[c] + 1) % Mp
        assert cirkd.pixel_queue_ptr.tolist() == pptr and cirkd.region_queue_ptr.tolist() == rptr
        np.testing.assert_allclose(cirkd.region_queue.numpy(), region_mem, rtol=1e-12)
        for c in range(K):  # same entries, slot order within one image's write is random
            np.testing.assert_allclose(
                sorted_rows(cirkd.pixel_queue[c]), sorted_rows(pixel_mem[c]), rtol=1e-12
            )

        # projected student by hand: conv1x1 -> BN(eval, fresh) -> ReLU -> conv1x1
        x = s.numpy().transpose(0, 2, 3, 1) @ w1.numpy().T / math.sqrt(1 + BN_EPS)
        emb = (np.maximum(x, 0) @ w2.numpy().T).transpose(0, 3, 1, 2)
        expected = memory_terms_by_hand(emb, t.numpy(), lab, pixel_mem, region_mem, 0.2, 2.0)
        assert list(terms) == ["p2p", "p2r"]  # each multiplied by its weight
        assert terms["p2p"].item() == pytest.approx(0.5 * expected[0], rel=1e-10)
        assert terms["p2r"].item() == pytest.approx(3.0 * expected[1], rel=1e-10)

        # forward: pixel_weight * p2p + region_weight * p2r (in eval mode: no enqueue, same memory)
        cirkd.eval()
        loss = cirkd({"s": s}, {"t": t}, {"target": labels})
        assert loss.item() == pytest.approx(0.5 * expected[0] + 3.0 * expected[1], rel=1e-10)
        assert cirkd.pixel_queue_ptr.tolist() == pptr

    def test_ignored_pixels_have_no_effect(self) -> None:
        labels = torch.tensor([LABELS_4x4, LABELS_4x4])
        ignored = labels == IGNORE  # feature size = label size here
        torch.manual_seed(5)
        s, t = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 6, 4, 4, dtype=torch.float64)
        s2, t2 = s.clone(), t.clone()
        s2[ignored.unsqueeze(1).expand_as(s2)] = 7.0
        t2[ignored.unsqueeze(1).expand_as(t2)] = -3.0

        def run(student, teacher, head_eval):
            torch.manual_seed(6)  # same initial memory and the same random draws
            cirkd = make_memory().double()
            if head_eval:
                cirkd.project_head.eval()
            terms = cirkd.terms({"s": student}, {"t": teacher}, {"target": labels})
            return [x.item() for x in terms.values()], cirkd.pixel_queue.clone(), cirkd.region_queue.clone()

        base, pq, rq = run(s, t, head_eval=False)
        # the teacher at ignored pixels: never enqueued, never an anchor (train-mode head included)
        other, pq2, rq2 = run(s, t2, head_eval=False)
        assert other == pytest.approx(base, rel=1e-12)
        assert torch.equal(pq, pq2) and torch.equal(rq, rq2)
        # the student at ignored pixels: no effect once the head's BatchNorm uses fixed statistics
        # (in train mode its batch statistics include every pixel, as in the authors' code)
        base_eval, _, _ = run(s, t, head_eval=True)
        other_eval, _, _ = run(s2, t, head_eval=True)
        assert other_eval == pytest.approx(base_eval, rel=1e-12)

    def test_all_ignored_gives_zero_with_a_graph(self) -> None:
        cirkd = self.make()
        s = torch.randn(2, 4, 4, 4, requires_grad=True)
        labels = torch.full((2, 8, 8), IGNORE)
        before = cirkd.pixel_queue.clone()
        loss = cirkd({"s": s}, {"t": torch.randn(2, 6, 4, 4)}, {"target": labels})
        assert loss.item() == 0.0
        loss.backward()
        assert s.grad is not None
        assert torch.equal(cirkd.pixel_queue, before) and cirkd.region_queue_ptr.sum() == 0

    def test_resize_labels_nearest(self) -> None:
        labels = np.arange(30).reshape(1, 5, 6)
        for size in ((2, 3), (3, 4), (5, 6)):
            assert (
                resize_labels(torch.tensor(labels), size).tolist() == nearest_by_hand(labels, size).tolist()
            )

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="student_channels must be a positive integer"):
            make_memory(student_channels=0)
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            make_memory(num_classes=2.5)
        with pytest.raises(ValueError, match=r"pixel_contrast_size must be an integer in \[1, 40\]"):
            make_memory(pixel_contrast_size=41)
        with pytest.raises(ValueError, match=r"region_contrast_size must be an integer in \[1, 8\]"):
            make_memory(region_contrast_size=0)
        with pytest.raises(ValueError, match="pixels_per_class must be a positive integer"):
            make_memory(pixels_per_class=0)
        with pytest.raises(ValueError, match="kd_temperature must be a number > 0"):
            make_memory(kd_temperature=0)
        with pytest.raises(ValueError, match="region_weight must be a number >= 0"):
            make_memory(region_weight=-1.0)
        cirkd = self.make()
        s, t = {"s": torch.zeros(2, 4, 4, 4)}, {"t": torch.zeros(2, 6, 4, 4)}
        labels = {"target": torch.zeros(2, 8, 8, dtype=torch.long)}
        with pytest.raises(ValueError, match="needs the ground-truth labels"):
            cirkd(s, t, None)
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*\[3\]"):
            cirkd(s, t, {"target": torch.full((2, 8, 8), 3)})
        with pytest.raises(TypeError, match="integer class labels"):
            cirkd(s, t, {"target": torch.zeros(2, 8, 8)})
        with pytest.raises(ValueError, match="built for 4 student and 6 teacher channels"):
            cirkd({"s": torch.zeros(2, 5, 4, 4)}, t, labels)
        with pytest.raises(ValueError, match="same batch size and spatial size"):
            cirkd(s, {"t": torch.zeros(2, 6, 2, 2)}, labels)
        with pytest.raises(ValueError, match=r"label map \(N, H_label, W_label\) with N=2.*\(3, 8, 8\)"):
            cirkd(s, t, {"target": torch.zeros(3, 8, 8, dtype=torch.long)})
        q = torch.zeros(3, 5, 6)
        with pytest.raises(ValueError, match="same channels"):
            cirkd_memory_terms(
                torch.zeros(2, 4, 4, 4), torch.zeros(2, 6, 4, 4), labels["target"], q, q,
                pixel_contrast_size=2, region_contrast_size=2,
            )  # fmt: skip
