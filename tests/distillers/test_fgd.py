import math

import numpy as np
import pytest
import torch

from lightningkd.distillers.fgd import FGD, GcBlock, detection_boxes
from lightningkd.functional.fgd import fgd_attention, fgd_loss, fgd_masks, fgd_terms
from tests.distiller_tester import DistillerTester, parity_cases, tensor

TERMS = ("fg", "bg", "attention", "global")


# ---- the definition in plain Python / numpy (independent of the code under test) ---------------------
def masks_by_hand(boxes: list[list[float]], size: tuple[int, int], feat: tuple[int, int]):
    """FGD's masks of one image from the definition: floor..ceil inclusive, 1/((h+1)(w+1)) before
    clipping, maximum over boxes, background normalised to sum 1 (plain Python floats)."""
    (img_h, img_w), (H, W) = size, feat
    fg = [[0.0] * W for _ in range(H)]
    for x1, y1, x2, y2 in boxes:
        c0, c1 = math.floor(x1 / img_w * W), math.ceil(x2 / img_w * W)
        r0, r1 = math.floor(y1 / img_h * H), math.ceil(y2 / img_h * H)
        value = 1.0 / ((r1 - r0 + 1) * (c1 - c0 + 1))
        for r in range(max(r0, 0), min(r1, H - 1) + 1):
            for c in range(max(c0, 0), min(c1, W - 1) + 1):
                fg[r][c] = max(fg[r][c], value)
    free = sum(1 for row in fg for v in row if v == 0)
    bg = [[(1.0 / free if v == 0 else 0.0) for v in row] for row in fg]
    return fg, bg


def attention_np(x: np.ndarray, temp: float):
    n, c, h, w = x.shape
    a = np.abs(x)
    sp = a.mean(axis=1).reshape(n, -1) / temp
    sp = np.exp(sp - sp.max(axis=1, keepdims=True))
    sp = h * w * sp / sp.sum(axis=1, keepdims=True)
    ch = a.mean(axis=(2, 3)) / temp
    ch = np.exp(ch - ch.max(axis=1, keepdims=True))
    ch = c * ch / ch.sum(axis=1, keepdims=True)
    return sp.reshape(n, h, w), ch


def gcblock_np(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """x + channel_add(context(x)) from the GCNet/FGD definition, numpy."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    logits = np.einsum("c,ncp->np", p["conv_mask.weight"].reshape(c), flat) + p["conv_mask.bias"][0]
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    context = np.einsum("ncp,np->nc", flat, weights)
    y = context @ p["channel_add.0.weight"].reshape(c // 2, c).T + p["channel_add.0.bias"]
    mu, var = y.mean(axis=1, keepdims=True), y.var(axis=1, keepdims=True)
    y = (y - mu) / np.sqrt(var + 1e-5) * p["channel_add.1.weight"].reshape(-1) + p[
        "channel_add.1.bias"
    ].reshape(-1)
    y = np.maximum(y, 0.0)
    y = y @ p["channel_add.3.weight"].reshape(c, c // 2).T + p["channel_add.3.bias"]
    return x + y[:, :, None, None]


def fgd_np(s, t, fg, bg, temp, coeffs, gc_s, gc_t) -> dict[str, float]:
    n = s.shape[0]
    sp_t, ch_t = attention_np(t, temp)
    sp_s, ch_s = attention_np(s, temp)
    w = sp_t[:, None] * ch_t[:, :, None, None] * (s - t) ** 2
    return {
        "fg": coeffs[0] * float((fg[:, None] * w).sum()) / n,
        "bg": coeffs[1] * float((bg[:, None] * w).sum()) / n,
        "attention": coeffs[2] * (float(np.abs(ch_s - ch_t).sum()) + float(np.abs(sp_s - sp_t).sum())) / n,
        "global": coeffs[3] * float(((gcblock_np(s, gc_s) - gcblock_np(t, gc_t)) ** 2).sum()) / n,
    }


def randomise_global_blocks(fgd: FGD, seed: int = 0) -> None:
    """Non-zero last convs (the official init zeroes them, which stops the gradient to the block)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (fgd.student_global, fgd.teacher_global):
            for p in block.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def gc_params(block: GcBlock) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in block.state_dict().items()}


BOXES = [[[2.0, 3.0, 14.5, 17.0], [20.0, 1.0, 31.0, 9.5]], [[0.0, 0.0, 9.0, 11.0]]]
SIZES = [(24, 32), (20, 28)]


def detection_batch(boxes=BOXES, sizes=SIZES, padded=(24, 32)) -> dict:
    return {
        "target": [
            {
                "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.zeros(len(b), dtype=torch.long),
            }
            for b in boxes
        ],
        "image_sizes": sizes,
        "padded_size": padded,
    }


class TestFGD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.FGD\n"
        "init_args: {student_layer: 'backbone:1', teacher_layer: 'backbone:1', channels: 64, student_channels: 32,"
        " temperature: 0.8, alpha: 1.6e-3, beta: 8.0e-4, gamma: 8.0e-4, lambda_global: 8.0e-6,"
        " box_scale: padded, weight: 2.0}"
    )
    term_names = TERMS

    def make(self) -> FGD:
        fgd = FGD(student_layer="s", teacher_layer="t", channels=8, student_channels=4)
        randomise_global_blocks(fgd)
        return fgd

    def inputs(self):
        return (
            {"s": torch.randn(2, 4, 6, 8, requires_grad=True)},
            {"t": torch.randn(2, 8, 6, 8)},
            detection_batch(),
        )

    def twin(self, distiller, student, teacher, batch):
        fg, bg = fgd_masks([t["boxes"] for t in batch["target"]], batch["image_sizes"], (6, 8))
        return fgd_loss(
            distiller.align(student["s"]),
            teacher["t"],
            fg,
            bg,
            temperature=distiller.temperature,
            alpha=distiller.alpha,
            beta=distiller.beta,
            gamma=distiller.gamma,
            lambda_global=distiller.lambda_global,
            student_global=distiller.student_global,
            teacher_global=distiller.teacher_global,
        )

    # ---- the authors' parity fixtures -------------------------------------------------------------
    @staticmethod
    def _from_case(case, dtype):
        inputs, hyper = case["inputs"], case["hyper"]
        s, t = tensor(inputs["student_feat"], dtype), tensor(inputs["teacher_feat"], dtype)
        fgd = FGD(
            student_layer="s",
            teacher_layer="t",
            channels=t.shape[1],
            student_channels=s.shape[1],
            temperature=hyper["temp"],
            alpha=hyper["alpha_fgd"],
            beta=hyper["beta_fgd"],
            gamma=hyper["gamma_fgd"],
            lambda_global=hyper["lambda_fgd"],
        ).to(dtype)
        renamed = {
            "conv_mask_s": "student_global.conv_mask",
            "conv_mask_t": "teacher_global.conv_mask",
            "channel_add_conv_s": "student_global.channel_add",
            "channel_add_conv_t": "teacher_global.channel_add",
            "align": "align",
        }
        state = {}
        for key, spec in inputs.items():
            if key.startswith("weight:"):
                module, rest = key[len("weight:") :].split(".", 1)
                state[f"{renamed[module]}.{rest}"] = tensor(spec, dtype)
        fgd.load_state_dict(state, strict=True)
        batch = detection_batch(
            inputs["gt_bboxes_xyxy_per_image"], [tuple(hwc[:2]) for hwc in inputs["img_shape_per_image_hwc"]]
        )
        return fgd, s, t, batch

    @pytest.mark.parametrize("case", parity_cases("fgd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        names = {"fg": "fg_loss", "bg": "bg_loss", "attention": "mask_loss", "global": "rela_loss"}
        coefficient = {"fg": "alpha_fgd", "bg": "beta_fgd", "attention": "gamma_fgd", "global": "lambda_fgd"}
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            fgd, s, t, batch = self._from_case(case, dtype)
            terms = fgd.terms({"s": s}, {"t": t}, batch)
            for term, value in terms.items():
                assert value.dtype == dtype
                got = value.item() / case["hyper"][coefficient[term]]
                assert got == pytest.approx(case[key][names[term]], rel=rel), term
            assert (fgd.weight * fgd({"s": s}, {"t": t}, batch)).item() == pytest.approx(
                case[key]["total"], rel=rel
            )

    @pytest.mark.parametrize("case", parity_cases("fgd"), ids=lambda c: c["name"])
    def test_parity_of_masks_and_attentions(self, case) -> None:
        fgd, s, t, batch = self._from_case(case, torch.float64)
        expected = {k: tensor(v) for k, v in case["expected_intermediates_float64"].items()}
        fg, bg = fgd.masks(batch, 2, tuple(t.shape[2:]), dtype=torch.float64)
        assert torch.equal(fg, expected["Mask_fg"])  # the float32 box values, exactly
        torch.testing.assert_close(bg, expected["Mask_bg"], rtol=1e-15, atol=0)
        fg32, bg32 = fgd_masks(
            [b["boxes"] for b in batch["target"]], batch["image_sizes"], tuple(t.shape[2:])
        )
        assert fg32.dtype == bg32.dtype == torch.float32
        assert torch.equal(fg32.double(), expected["Mask_fg"])
        sp_t, ch_t = fgd_attention(t, case["hyper"]["temp"])
        sp_s, ch_s = fgd_attention(fgd.align(s) if fgd.align is not None else s, case["hyper"]["temp"])
        for got, name in (
            (sp_t, "S_attention_t"),
            (ch_t, "C_attention_t"),
            (sp_s, "S_attention_s"),
            (ch_s, "C_attention_s"),
        ):
            torch.testing.assert_close(got, expected[name], rtol=1e-12, atol=0)

    def test_global_term_at_official_init_is_the_plain_sum_of_squares(self) -> None:
        torch.manual_seed(0)
        fgd = FGD(student_layer="s", teacher_layer="t", channels=6, lambda_global=1.0).double()
        s, t = torch.randn(3, 6, 4, 5, dtype=torch.float64), torch.randn(3, 6, 4, 5, dtype=torch.float64)
        batch = detection_batch([[], [[1.0, 1.0, 5.0, 5.0]], []], [(16, 20)] * 3)
        expected = float(((s.numpy() - t.numpy()) ** 2).sum()) / 3
        assert fgd.terms({"s": s}, {"t": t}, batch)["global"].item() == pytest.approx(expected, rel=1e-12)

    def test_known_values_from_numpy(self) -> None:
        """All four terms against a numpy re-derivation, with random GcBlock weights and an align conv."""
        torch.manual_seed(3)
        fgd = FGD(
            student_layer="s", teacher_layer="t", channels=6, student_channels=3, temperature=0.7,
            alpha=0.3, beta=0.2, gamma=0.1, lambda_global=0.05, box_scale="padded",
        ).double()  # fmt: skip
        randomise_global_blocks(fgd, seed=5)
        s, t = torch.randn(2, 3, 6, 8, dtype=torch.float64), torch.randn(2, 6, 6, 8, dtype=torch.float64)
        batch = detection_batch()
        aligned = fgd.align(s).detach().numpy()
        fg = np.zeros((2, 6, 8))
        bg = np.zeros((2, 6, 8))
        for n, boxes in enumerate(BOXES):
            f, b = masks_by_hand(boxes, (24, 32), (6, 8))  # box_scale="padded": every image by (24, 32)
            fg[n], bg[n] = f, b
        expected = fgd_np(
            aligned, t.numpy(), fg, bg, 0.7, (0.3, 0.2, 0.1, 0.05),
            gc_params(fgd.student_global), gc_params(fgd.teacher_global),
        )  # fmt: skip
        got = fgd.terms({"s": s}, {"t": t}, batch)
        for term in TERMS:
            # the box values are float32 numbers (official quirk): 1e-6 against exact doubles
            assert got[term].item() == pytest.approx(expected[term], rel=1e-6), term

    # ---- masks ------------------------------------------------------------------------------------
    def test_masks_of_a_hand_drawn_box(self) -> None:
        # a 16x16 image on a 4x4 map (stride 4): the pixel box 4..8 is the cell 1, but floor..ceil
        # inclusive gives cells 1..2 in both directions: 2x2 cells of value 1/4
        fg, bg = fgd_masks([torch.tensor([[4.0, 4.0, 8.0, 8.0]])], [(16, 16)], (4, 4))
        expected_fg = torch.zeros(1, 4, 4)
        expected_fg[0, 1:3, 1:3] = 0.25
        expected_bg = torch.full((1, 4, 4), 1 / 12)
        expected_bg[0, 1:3, 1:3] = 0.0
        torch.testing.assert_close(fg, expected_fg, rtol=0, atol=0)
        torch.testing.assert_close(bg, expected_bg, rtol=1e-7, atol=0)
        assert bg.sum().item() == pytest.approx(1.0, rel=1e-6)

    def test_masks_overlap_clipping_and_scaling(self) -> None:
        # a 12x16 image on a 6x8 map: every coordinate is halved
        boxes = [[1.0, 2.0, 9.5, 7.0], [6.0, 5.0, 16.0, 12.0], [2.0, 4.0, 3.0, 5.0]]
        fg, bg = fgd_masks([torch.tensor(boxes)], [(12, 16)], (6, 8), dtype=torch.float64)
        hand_fg, hand_bg = masks_by_hand(boxes, (12, 16), (6, 8))
        torch.testing.assert_close(fg[0], torch.tensor(hand_fg, dtype=torch.float64), rtol=1e-7, atol=0)
        torch.testing.assert_close(bg[0], torch.tensor(hand_bg, dtype=torch.float64), rtol=1e-15, atol=0)
        # box 1: rows 1..4, columns 0..5 -> 1/24
        assert fg[0, 1, 1].item() == pytest.approx(1 / 24, rel=1e-7)
        # box 2 reaches past the border (rows 2..6, columns 3..8): 1/(5*6) computed before clipping
        assert fg[0, 5, 7].item() == pytest.approx(1 / 30, rel=1e-7)
        # where boxes 1 and 2 overlap the larger value wins; box 3 (rows 2..3, columns 1..2) inside box 1
        assert fg[0, 3, 4].item() == pytest.approx(1 / 24, rel=1e-7)
        assert fg[0, 2, 1].item() == pytest.approx(1 / 4, rel=1e-7)
        # background: 48 cells - 24 of box 1 - (20 - 9 shared with box 1) of box 2
        assert (bg[0] > 0).sum().item() == 48 - 24 - (20 - 9)
        assert bg[0].sum().item() == pytest.approx(1.0, rel=1e-12)

    def test_image_without_boxes_has_a_uniform_background(self) -> None:
        fg, bg = fgd_masks(
            [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 40.0, 40.0]])], [(8, 8), (8, 8)], (3, 5)
        )
        assert torch.equal(fg[0], torch.zeros(3, 5))
        torch.testing.assert_close(bg[0], torch.full((3, 5), 1 / 15), rtol=1e-7, atol=0)
        # a box covering the whole map leaves no background
        assert torch.equal(bg[1], torch.zeros(3, 5))
        # the distiller: with no box anywhere the foreground term is zero and the background term is not
        fgd = self.make()
        s, t, _ = self.inputs()
        terms = fgd.terms(s, t, detection_batch([[], []]))
        assert terms["fg"].item() == 0.0 and terms["bg"].item() > 0

    def test_box_scale_image_follows_the_official_quirk_and_padded_the_map(self) -> None:
        # image 12x16 padded to 16x16, map 4x4 (stride 4): the box 0..8 covers cells 0..2 in x either way;
        # in y the official code stretches it by 16/12 (8/12*4 = 2.67 -> ceil 3) while the padded scale
        # gives 8/16*4 = 2
        batch = {
            "target": [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]])}],
            "image_sizes": [(12, 16)],
            "padded_size": (16, 16),
        }
        official = FGD(student_layer="s", teacher_layer="t", channels=4)
        padded = FGD(student_layer="s", teacher_layer="t", channels=4, box_scale="padded")
        fg_image, _ = official.masks(batch, 1, (4, 4))
        fg_padded, _ = padded.masks(batch, 1, (4, 4))
        expected_image = torch.zeros(1, 4, 4)
        expected_image[0, 0:4, 0:3] = 1 / 12
        expected_padded = torch.zeros(1, 4, 4)
        expected_padded[0, 0:3, 0:3] = 1 / 9
        torch.testing.assert_close(fg_image, expected_image, rtol=1e-7, atol=0)
        torch.testing.assert_close(fg_padded, expected_padded, rtol=1e-7, atol=0)

    def test_box_weight_is_a_float32_number_even_in_float64(self) -> None:
        fg, _ = fgd_masks([torch.tensor([[0.0, 0.0, 4.0, 8.0]])], [(16, 16)], (4, 4), dtype=torch.float64)
        value = fg[0, 0, 0].item()  # 1/(3*2) computed as float32(float32(1/3)/2)
        assert value == float(np.float32(np.float32(1.0) / np.float32(3.0)) / np.float32(2.0))
        assert value != 1 / 6

    # ---- initialisation and structure -------------------------------------------------------------
    def test_reset_parameters_gives_the_official_init(self) -> None:
        torch.manual_seed(0)
        fgd = FGD(channels=256, student_channels=128)
        for block in (fgd.student_global, fgd.teacher_global):
            assert torch.count_nonzero(block.channel_add[3].weight) == 0
            assert torch.count_nonzero(block.channel_add[3].bias) == 0
            assert torch.count_nonzero(block.conv_mask.bias) == 0
            # Kaiming normal, fan_in = 256, ReLU gain: std sqrt(2/256)
            assert block.conv_mask.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.2)
            assert torch.equal(block.channel_add[1].weight, torch.ones(128, 1, 1))
        randomise_global_blocks(fgd)
        before = fgd.align.weight.detach().clone()
        fgd.reset_parameters()
        assert torch.count_nonzero(fgd.student_global.channel_add[3].weight) == 0
        assert not torch.equal(before, fgd.align.weight)
        bound = 1 / math.sqrt(128)  # PyTorch's default conv init: uniform within 1/sqrt(fan_in)
        assert fgd.align.weight.abs().max().item() <= bound
        assert FGD(channels=8).align is None
        assert {
            "align.weight",
            "student_global.conv_mask.weight",
            "teacher_global.channel_add.3.bias",
        } <= set(fgd.state_dict())

    def test_teacher_global_block_is_trained(self) -> None:
        fgd = self.make()
        s, t, batch = self.inputs()
        fgd(s, t, batch).backward()
        assert fgd.teacher_global.conv_mask.weight.grad.abs().sum() > 0
        assert FGD.needs_labels

    def test_detection_boxes(self) -> None:
        batch = detection_batch()
        boxes, sizes = detection_boxes(batch, 2, "FGD")
        assert sizes == SIZES and boxes[0].shape == (2, 4)
        assert detection_boxes(batch, 2, "FGD", padded=True)[1] == [(24, 32), (24, 32)]

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="channels must be at least 2"):
            FGD(channels=1)
        with pytest.raises(ValueError, match="student_channels must be a positive integer"):
            FGD(channels=8, student_channels=0)
        with pytest.raises(ValueError, match="temperature"):
            FGD(temperature=0.0)
        for key in ("alpha", "beta", "gamma", "lambda_global"):
            with pytest.raises(ValueError, match=key):
                FGD(**{key: -1.0})
        with pytest.raises(ValueError, match="box_scale"):
            FGD(box_scale="feature")
        fgd = self.make()
        s, t, batch = self.inputs()
        with pytest.raises(ValueError, match="needs the ground-truth boxes"):
            fgd(s, t, None)
        with pytest.raises(ValueError, match="one dict per image"):
            fgd(s, t, {**batch, "target": batch["target"][:1]})
        with pytest.raises(ValueError, match="image_sizes"):
            fgd(s, t, {"target": batch["target"]})
        padded = FGD(student_layer="s", teacher_layer="t", channels=8, student_channels=4, box_scale="padded")
        with pytest.raises(ValueError, match="padded_size"):
            padded(s, t, {"target": batch["target"], "image_sizes": SIZES})
        with pytest.raises(ValueError, match=r"built for 4 student and 8 teacher channels.*\(2, 5, 6, 8\)"):
            fgd({"s": torch.zeros(2, 5, 6, 8)}, t, batch)
        with pytest.raises(ValueError, match="same batch size and spatial size"):
            fgd({"s": torch.zeros(2, 4, 3, 4)}, t, batch)
        with pytest.raises(ValueError, match=r"\(K, 4\)"):
            fgd_masks([torch.zeros(3)], [(8, 8)], (2, 2))
        with pytest.raises(ValueError, match="2 images but 1 image sizes"):
            fgd_masks([torch.zeros(0, 4)] * 2, [(8, 8)], (2, 2))
        with pytest.raises(ValueError, match="foreground mask"):
            fgd_terms(
                torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2), torch.zeros(1, 3, 3)
            )
        with pytest.raises(KeyError, match="tapped"):
            fgd({"x": s["s"]}, t, batch)
