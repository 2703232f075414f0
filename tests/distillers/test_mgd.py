import numpy as np
import pytest
import torch
from torch import nn

from lightningkd.distillers.mgd import MGD
from lightningkd.functional.mgd import mgd_keep_mask, mgd_loss, mgd_mask_shape
from tests.distiller_tester import DistillerTester, parity_cases, tensor


def conv_np(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Cross-correlation with zero padding, stride 1, plain numpy loops over the kernel offsets."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, w.shape[0], h, wd)) + b[None, :, None, None]
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], xp[:, :, dy : dy + h, dx : dx + wd])
    return out


def mgd_np(s, t, keep, gen: dict[str, np.ndarray], alpha: float, align: dict[str, np.ndarray] | None = None):
    if align is not None:
        s = conv_np(s, align["weight"], align["bias"], 0)
    g = conv_np(s * keep, gen["0.weight"], gen["0.bias"], 1)
    g = conv_np(np.maximum(g, 0.0), gen["2.weight"], gen["2.bias"], 1)
    return alpha * float(((g - t) ** 2).sum()) / s.shape[0]


class TestMGD(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.MGD\n"
        "init_args: {student_layer: layer4, teacher_layer: layer4, channels: 2048, student_channels: 512,"
        " alpha: 7.0e-5, mask: channel, mask_ratio: 0.15}"
    )

    def make(self) -> MGD:
        return MGD(student_layer="s", teacher_layer="t", channels=6, student_channels=4)

    def inputs(self):
        return ({"s": torch.randn(2, 4, 5, 6, requires_grad=True)}, {"t": torch.randn(2, 6, 5, 6)}, None)

    def twin(self, distiller, student, teacher, batch):
        return mgd_loss(
            distiller.align(student["s"]),
            teacher["t"],
            distiller.generator,
            alpha=distiller.alpha,
            mask=distiller.mask,
            mask_ratio=distiller.mask_ratio,
        )

    @staticmethod
    def _from_case(case, dtype):
        inputs, hyper = case["inputs"], case["hyper"]
        s, t = tensor(inputs["student_feat"], dtype), tensor(inputs["teacher_feat"], dtype)
        mgd = MGD(
            student_layer="s",
            teacher_layer="t",
            channels=t.shape[1],
            student_channels=s.shape[1],
            alpha=hyper["alpha_mgd"],
            mask="spatial" if hyper["variant"] == "det" else "channel",
            mask_ratio=hyper["lambda_mgd"],
        ).to(dtype)
        state = {
            key[len("weight:") :].replace("generation.", "generator."): tensor(spec, dtype)
            for key, spec in inputs.items()
            if key.startswith("weight:")
        }
        mgd.load_state_dict(state, strict=True)
        return mgd, s, t, tensor(inputs["rand"], dtype), tensor(inputs["keep_mask"])

    @pytest.mark.parametrize("case", parity_cases("mgd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case, monkeypatch) -> None:
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            mgd, s, t, rand, keep = self._from_case(case, dtype)
            # the stored draw gives the authoritative mask under the rule of the case's codebase
            assert torch.equal(mgd_keep_mask(rand, mgd.mask, mgd.mask_ratio), keep.to(dtype))
            aligned = mgd.align(s) if mgd.align is not None else s
            kwargs = dict(alpha=mgd.alpha, mask=mgd.mask, mask_ratio=mgd.mask_ratio)
            for draw in ({"rand": rand}, {"keep_mask": keep}):
                got = mgd_loss(aligned, t, mgd.generator, **kwargs, **draw)
                assert got.dtype == dtype
                assert got.item() == pytest.approx(case[key]["loss"], rel=rel)
                assert (got / mgd.alpha).item() == pytest.approx(case[key]["dis_loss"], rel=rel)
            # the distiller draws with torch.rand: feed it the stored draw
            monkeypatch.setattr(torch, "rand", lambda *args, _draw=rand, **kwargs: _draw.clone())
            assert (mgd.weight * mgd({"s": s}, {"t": t})).item() == pytest.approx(case[key]["loss"], rel=rel)
            monkeypatch.undo()

    def test_known_value_from_numpy(self) -> None:
        torch.manual_seed(0)
        mgd = MGD(student_layer="s", teacher_layer="t", channels=4, student_channels=3, alpha=0.5).double()
        s, t = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 4, 4, 5, dtype=torch.float64)
        keep = (torch.rand(2, 1, 4, 5) > 0.5).double()
        gen = {k: v.detach().numpy() for k, v in mgd.generator.state_dict().items()}
        align = {k: v.detach().numpy() for k, v in mgd.align.state_dict().items()}
        expected = mgd_np(s.numpy(), t.numpy(), keep.numpy(), gen, 0.5, align)
        got = mgd_loss(mgd.align(s), t, mgd.generator, alpha=0.5, keep_mask=keep)
        assert got.item() == pytest.approx(expected, rel=1e-12)

    def test_hand_values(self) -> None:
        t = torch.arange(24, dtype=torch.float64).reshape(2, 3, 2, 2)
        s = torch.ones(2, 3, 2, 2, dtype=torch.float64)
        identity = lambda x: x  # noqa: E731
        # everything masked: the generator sees zeros, the loss is alpha * sum(T^2) / N
        nothing = torch.zeros(2, 1, 2, 2)
        expected = 0.1 * sum(v * v for v in range(24)) / 2
        assert mgd_loss(s, t, identity, alpha=0.1, keep_mask=nothing).item() == pytest.approx(
            expected, rel=1e-12
        )
        # nothing masked: sum((1 - T)^2) / N
        everything = torch.ones(2, 3, 1, 1)
        expected = sum((1 - v) ** 2 for v in range(24)) / 2
        got = mgd_loss(s, t, identity, alpha=1.0, mask="channel", keep_mask=everything)
        assert got.item() == pytest.approx(expected, rel=1e-12)
        # mask_ratio 0 keeps everything, 1 drops everything (spatial rule: rand > 1 - ratio)
        assert mgd_keep_mask(torch.rand(100), "spatial", 0.0).sum().item() == 100
        assert mgd_keep_mask(torch.rand(100) + 1e-6, "spatial", 1.0).sum().item() == 0

    @pytest.mark.parametrize(("mask", "ratio"), [("spatial", 0.65), ("spatial", 0.75), ("channel", 0.15)])
    def test_masked_fraction_and_mask_shape(self, mask: str, ratio: float) -> None:
        """The distiller masks about ``ratio`` of the positions / channels; the mask is constant across
        channels (spatial) or positions (channel). Read from the generator's input."""
        torch.manual_seed(0)
        mgd = MGD(student_layer="s", teacher_layer="t", channels=8, mask=mask, mask_ratio=ratio)
        seen = []
        mgd.generator.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        s, t = {"s": torch.ones(4, 8, 6, 6)}, {"t": torch.zeros(4, 8, 6, 6)}
        for _ in range(100):
            mgd(s, t)
        inputs = torch.stack(seen)  # (draws, N, C, H, W) of ones and zeros
        kept = inputs != 0
        if mask == "spatial":
            assert torch.equal(kept, kept[:, :, :1].expand_as(kept))  # same for every channel
        else:
            assert torch.equal(kept, kept[..., :1, :1].expand_as(kept))  # same for every position
        draws = 100 * 4 * (36 if mask == "spatial" else 8)
        masked = 1 - kept.float().mean().item()
        assert masked == pytest.approx(ratio, abs=4 * np.sqrt(ratio * (1 - ratio) / draws))
        assert mgd_mask_shape(s["s"], mask) == ((4, 1, 6, 6) if mask == "spatial" else (4, 8, 1, 1))

    def test_fresh_mask_each_call_following_the_seed(self) -> None:
        mgd = self.make()
        s, t, _ = self.inputs()
        torch.manual_seed(5)
        first, second = mgd(s, t), mgd(s, t)
        torch.manual_seed(5)
        again = mgd(s, t)
        assert first.item() != second.item()
        assert again.item() == first.item()

    def test_reset_parameters_is_pytorch_default_init(self) -> None:
        mgd = MGD(student_layer="s", teacher_layer="t", channels=6, student_channels=4)
        torch.manual_seed(7)
        mgd.reset_parameters()
        torch.manual_seed(7)
        reference = [nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)]
        for module, ref in zip((mgd.align, mgd.generator[0], mgd.generator[2]), reference):
            assert torch.equal(module.weight, ref.weight) and torch.equal(module.bias, ref.bias)
        assert isinstance(mgd.generator[1], nn.ReLU)
        assert MGD(channels=8, student_channels=8).align is None
        assert set(mgd.state_dict()) == {
            "align.weight", "align.bias", "generator.0.weight", "generator.0.bias",
            "generator.2.weight", "generator.2.bias",
        }  # fmt: skip

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="mask_ratio"):
            MGD(mask_ratio=1.5)
        with pytest.raises(ValueError, match="mask must be one of"):
            MGD(mask="pixel")
        with pytest.raises(ValueError, match="alpha"):
            MGD(alpha=-1.0)
        with pytest.raises(ValueError, match="channels must be a positive integer"):
            MGD(channels=0)
        with pytest.raises(ValueError, match="student_channels must be a positive integer"):
            MGD(student_channels=-2)
        mgd = self.make()
        with pytest.raises(ValueError, match=r"built for 4 student and 6 teacher channels.*\(2, 5, 5, 6\)"):
            mgd({"s": torch.zeros(2, 5, 5, 6)}, {"t": torch.zeros(2, 6, 5, 6)})
        with pytest.raises(ValueError, match="same batch size and spatial size"):
            mgd({"s": torch.zeros(2, 4, 4, 6)}, {"t": torch.zeros(2, 6, 5, 6)})
        x = torch.zeros(2, 3, 4, 4)
        with pytest.raises(ValueError, match="not both"):
            mgd_loss(x, x, nn.Identity(), rand=torch.rand(2, 1, 4, 4), keep_mask=torch.ones(2, 1, 4, 4))
        with pytest.raises(ValueError, match=r"rand must have shape \(2, 3, 1, 1\)"):
            mgd_loss(x, x, nn.Identity(), mask="channel", rand=torch.rand(2, 1, 4, 4))
        with pytest.raises(ValueError, match=r"keep_mask must have shape \(2, 1, 4, 4\)"):
            mgd_loss(x, x, nn.Identity(), keep_mask=torch.ones(2, 3, 1, 1))
        with pytest.raises(ValueError, match="same shape"):
            mgd_loss(x, torch.zeros(2, 4, 4, 4), nn.Identity())
        with pytest.raises(KeyError, match="tapped"):
            mgd({"x": x}, {"t": x})
