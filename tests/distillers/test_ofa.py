import math

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from lightningkd.distillers.ofa import OFA, OFAConvBranch, OFATokenBranch, PatchMerging, SepConv
from lightningkd.functional.ofa import ofa_cross_entropy, ofa_loss, ofa_target_weights
from tests.distiller_tester import DistillerTester, log_softmax_by_hand, parity_cases, tensor


# ---- the paper's equation in plain Python ------------------------------------------------------------
def ofa_by_hand(
    zs: list[list[float]], zt: list[list[float]], ys: list[int], eps: float, T: float = 1.0
) -> float:
    """``-(1/N) sum_i sum_c [(p_t + e_y)^eps - e_y]_c log p_s,c`` with explicit loops."""
    total = 0.0
    for s, t, y in zip(zs, zt, ys):
        log_ps = log_softmax_by_hand([v / T for v in s])
        pt = [math.exp(v) for v in log_softmax_by_hand([v / T for v in t])]
        for c in range(len(s)):
            w = (pt[c] + 1.0) ** eps - 1.0 if c == y else pt[c] ** eps
            total -= w * log_ps[c]
    return total / len(zs)


def cross_entropy_by_hand(zs: list[list[float]], zt: list[list[float]]) -> float:
    """``H(p_t, p_s) = -(1/N) sum_i sum_c p_t,c log p_s,c``."""
    total = 0.0
    for s, t in zip(zs, zt):
        log_ps, log_pt = log_softmax_by_hand(s), log_softmax_by_hand(t)
        total -= sum(math.exp(b) * a for a, b in zip(log_ps, log_pt))
    return total / len(zs)


def conv_ofa(**overrides) -> OFA:
    args = dict(
        num_classes=5,
        stage_layers=["s1", "s2"],
        stage_channels=[4, 8],
        stage_downsamples=[1, 0],
        embed_dim=16,
    )
    return OFA(**{**args, **overrides})


def token_ofa(**overrides) -> OFA:
    args = dict(
        num_classes=5,
        stage_layers=["b1", "b2"],
        stage_channels=[8, 8],
        stage_downsamples=[1, 0],
        embed_dim=8,
        branch="tokens",
        prefix_tokens=1,
    )
    return OFA(**{**args, **overrides})


def twin_sum(distiller: OFA, student, teacher, batch) -> torch.Tensor:
    t, y = teacher["output"], batch["target"]
    T = distiller.temperature
    total = distiller.logits_weight * ofa_loss(student["output"], t, y, distiller.eps, T)
    for layer, branch, eps in zip(distiller.stage_layers, distiller.branches, distiller.stage_eps):
        total = total + distiller.branch_weight * ofa_loss(branch(student[layer]), t, y, eps, T)
    return total


class TestOFA(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.OFA\n"
        "init_args: {num_classes: 100, stage_layers: [layer1, layer2, layer3, layer4],"
        " stage_channels: [64, 128, 256, 512], stage_downsamples: [3, 2, 1, 0], embed_dim: 512, eps: 1.5}"
    )
    term_names = ("logits", "s1", "s2")

    def make(self) -> OFA:
        return conv_ofa(eps=1.5, stage_eps=[1.0, 1.2], branch_weight=0.5)

    def inputs(self):
        student = {
            "output": torch.randn(4, 5, requires_grad=True),
            "s1": torch.randn(4, 4, 8, 8, requires_grad=True),
            "s2": torch.randn(4, 8, 4, 4, requires_grad=True),
        }
        return student, {"output": torch.randn(4, 5)}, {"target": torch.tensor([0, 3, 4, 1])}

    def twin(self, distiller, student, teacher, batch):
        return twin_sum(distiller, student, teacher, batch)

    # ---- the loss ------------------------------------------------------------------------------------
    @pytest.mark.parametrize("case", parity_cases("ofa"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        inputs, hyper = case["inputs"], case["hyper"]
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            s = tensor(inputs["student_logits"], dtype)
            t = tensor(inputs["teacher_logits"], dtype)
            y = tensor(inputs["target"])
            got = ofa_loss(s, t, y, eps=hyper["eps"], temperature=hyper["temperature"])
            assert got.dtype == dtype
            assert got.item() == pytest.approx(case[key], rel=rel)
            # one-hot float targets (the official code's argmax path) give the same value
            one_hot = torch.nn.functional.one_hot(y, s.shape[1]).to(dtype)
            assert ofa_loss(s, t, one_hot, hyper["eps"], hyper["temperature"]).item() == pytest.approx(
                case[key], rel=rel
            )
            # the distiller with no branches is the logits term alone
            ofa = OFA(
                num_classes=s.shape[1],
                stage_layers=[],
                stage_channels=[],
                stage_downsamples=[],
                embed_dim=1,
                eps=hyper["eps"],
                temperature=hyper["temperature"],
            )
            assert ofa({"output": s}, {"output": t}, {"target": y}).item() == pytest.approx(
                case[key], rel=rel
            )

    def test_eps_one_is_the_cross_entropy_of_the_teacher_and_student(self) -> None:
        torch.manual_seed(3)
        s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64) * 2
        y = torch.tensor([0, 6, 2, 2, 5])
        expected = cross_entropy_by_hand(s.tolist(), t.tolist())
        assert ofa_loss(s, t, y, eps=1.0).item() == pytest.approx(expected, rel=1e-12)
        # the label does not matter at eps = 1; the teacher's entropy is included (not a KL: not 0 at s = t)
        assert ofa_loss(s, t, torch.tensor([1, 1, 1, 1, 1])).item() == pytest.approx(expected, rel=1e-12)
        assert ofa_loss(t, t, y).item() == pytest.approx(
            cross_entropy_by_hand(t.tolist(), t.tolist()), rel=1e-12
        )
        assert ofa_loss(t, t, y).item() > 0.1

    @pytest.mark.parametrize(("eps", "T"), [(1.5, 1.0), (2.0, 1.0), (0.5, 3.0)])
    def test_known_value_from_the_equation(self, eps: float, T: float) -> None:
        torch.manual_seed(4)
        s, t = torch.randn(3, 6, dtype=torch.float64) * 3, torch.randn(3, 6, dtype=torch.float64) * 3
        y = [4, 0, 5]
        expected = ofa_by_hand(s.tolist(), t.tolist(), y, eps, T)
        got = ofa_loss(s, t, torch.tensor(y), eps=eps, temperature=T)
        assert got.item() == pytest.approx(expected, rel=1e-12)
        assert ofa_loss(s.float(), t.float(), torch.tensor(y), eps, T).item() == pytest.approx(
            expected, rel=1e-5
        )

    def test_target_weights_by_hand(self) -> None:
        # p_t = (0.2, 0.3, 0.5) from logits log(p); label 1; eps 2: (0.04, 1.3^2 - 1, 0.25)
        t = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64).log()
        w = ofa_target_weights(t, torch.tensor([1]), eps=2.0)
        assert w.tolist()[0] == pytest.approx([0.04, 0.69, 0.25], rel=1e-12)
        # soft labels: the argmax is the label
        soft = torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64)
        assert torch.equal(ofa_target_weights(t, soft, eps=2.0), w)
        # the cross-entropy with given weights: -sum w log p_s (uniform student: log 3 per unit of weight)
        got = ofa_cross_entropy(torch.zeros(1, 3, dtype=torch.float64), w)
        assert got.item() == pytest.approx((0.04 + 0.69 + 0.25) * math.log(3), rel=1e-12)

    def test_finite_where_a_float32_probability_underflows(self) -> None:
        s = torch.tensor([[0.0, -200.0, 5.0]])  # softmax gives exactly 0 for the second class in float32
        t = torch.tensor([[0.0, 1.0, 0.0]])
        got = ofa_loss(s, t, torch.tensor([1]))
        expected = ofa_by_hand(s.double().tolist(), t.double().tolist(), [1], 1.0)
        assert torch.isfinite(got) and got.item() == pytest.approx(expected, rel=1e-5)

    # ---- the distiller -------------------------------------------------------------------------------
    def test_terms_are_the_loss_on_logits_and_on_each_branch(self) -> None:
        torch.manual_seed(0)
        ofa = conv_ofa(eps=1.5, stage_eps=[1.0, 2.0], logits_weight=0.7, branch_weight=0.3).eval()
        student, teacher, batch = self.inputs()
        terms = ofa.terms(student, teacher, batch)
        t, y = teacher["output"], batch["target"]
        assert terms["logits"].item() == pytest.approx(0.7 * ofa_loss(student["output"], t, y, 1.5).item())
        for layer, branch, eps in (("s1", ofa.branches[0], 1.0), ("s2", ofa.branches[1], 2.0)):
            expected = 0.3 * ofa_loss(branch(student[layer]), t, y, eps).item()
            assert terms[layer].item() == pytest.approx(expected, rel=1e-6)

    def test_each_term_trains_its_own_branch(self) -> None:
        torch.manual_seed(0)
        ofa = conv_ofa()
        student, teacher, batch = self.inputs()
        terms = ofa.terms(student, teacher, batch)
        for i, layer in enumerate(("s1", "s2")):
            ofa.zero_grad()
            terms[layer].backward(retain_graph=True)
            for j, branch in enumerate(ofa.branches):
                grads = [p.grad for p in branch.parameters()]
                if i == j:
                    assert all(g is not None and g.abs().sum() > 0 for g in grads), layer
                else:
                    assert all(g is None or g.abs().sum() == 0 for g in grads), layer

    def test_soft_targets_use_the_argmax(self) -> None:
        torch.manual_seed(0)
        ofa = conv_ofa().eval()
        student, teacher, batch = self.inputs()
        soft = torch.nn.functional.one_hot(batch["target"], 5).float() * 0.9 + 0.02  # label-smoothed
        assert ofa(student, teacher, {"target": soft}).item() == pytest.approx(
            ofa(student, teacher, batch).item(), rel=1e-6
        )

    def test_conv_branch_structure_and_shapes(self) -> None:
        branch = OFAConvBranch(channels=4, downsamples=3, embed_dim=48, num_classes=7)
        blocks = list(branch.project)
        assert [type(b) for b in blocks] == [SepConv] * 3
        # channels double per block and the last one goes to embed_dim (official: in_chans * 2, then max(d_s, d_t))
        assert [(b[0].in_channels, b[5].out_channels) for b in blocks] == [(4, 8), (8, 16), (16, 48)]
        assert all(b[0].stride == (2, 2) and b[0].groups == b[0].in_channels for b in blocks)
        sizes = []
        for b in blocks:
            b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        assert branch(torch.randn(2, 4, 16, 16)).shape == (2, 7)
        assert sizes == [(8, 8, 8), (16, 4, 4), (48, 2, 2)]
        last = OFAConvBranch(channels=4, downsamples=0, embed_dim=48, num_classes=7)
        assert isinstance(last.project[0], nn.Conv2d) and last.project[0].kernel_size == (1, 1)
        assert last.project[0].bias is not None
        assert last(torch.randn(3, 4, 5, 5)).shape == (3, 7)

    @pytest.mark.parametrize(("prefix", "grid"), [(1, None), (2, None), (1, (2, 4)), (2, (4, 2)), (0, None)])
    def test_token_branch_shapes(self, prefix: int, grid) -> None:
        h, w = grid or (4, 4)
        channels = 12 if prefix == 0 else 16  # with prefix tokens: width = embed_dim
        branch = OFATokenBranch(channels, 1, 16, 9, blocks=2, prefix_tokens=prefix, grid=grid)
        seen = []
        branch.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
        x = torch.randn(3, prefix + h * w, branch.channels)
        assert branch(x).shape == (3, 9)
        assert seen == [(3, prefix + (h // 2) * (w // 2), 16)]  # one merging: the grid halves

    def test_token_branch_for_swin_stages(self) -> None:
        branch = OFATokenBranch(
            channels=6, downsamples=3, embed_dim=12, num_classes=4, blocks=3, layout="nhwc"
        )
        assert [type(m.act) for m in branch.merges] == [nn.GELU, nn.GELU, nn.Identity]  # official pattern
        assert [m.reduction.in_features for m in branch.merges] == [24, 48, 48]
        assert len(branch.blocks) == 3 and all(isinstance(b, Block) for b in branch.blocks)
        assert branch(torch.randn(2, 8, 8, 6)).shape == (2, 4)
        assert branch(torch.randn(2, 7, 7, 6)).shape == (2, 4)  # odd sides are padded

    def test_patch_merging_order_is_the_official_one(self) -> None:
        merge = PatchMerging(1, 2, gelu=False)
        seen = []
        merge.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        grid = torch.arange(16.0).reshape(1, 4, 4, 1)  # value = 4 * row + col
        merge(grid)
        # the 2x2 cell at (0, 0): (0,0), (1,0), (0,1), (1,1) -> 0, 4, 1, 5
        assert seen[0][0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
        assert seen[0][0, 1, 1].tolist() == [10.0, 14.0, 11.0, 15.0]

    def test_prefix_tokens_are_pooled_and_kept_unmerged(self) -> None:
        torch.manual_seed(0)
        branch = OFATokenBranch(
            channels=8, downsamples=1, embed_dim=8, num_classes=3, blocks=1, prefix_tokens=2
        )
        into_blocks, into_head = [], []
        branch.blocks.register_forward_pre_hook(lambda m, args: into_blocks.append(args[0]))
        branch.blocks.register_forward_hook(lambda m, args, out: into_head.append(out))
        x = torch.randn(2, 2 + 16, 8)
        logits = branch(x)
        assert torch.equal(into_blocks[0][:, :2], x[:, :2])
        expected = branch.head(into_head[0][:, :2].mean(dim=1))
        assert torch.allclose(logits, expected)

    def test_wrong_prefix_token_count_names_the_counts(self) -> None:
        ofa = token_ofa(prefix_tokens=2)
        student = {"output": torch.randn(2, 5), "b1": torch.randn(2, 17, 8), "b2": torch.randn(2, 17, 8)}
        teacher, batch = {"output": torch.randn(2, 5)}, {"target": torch.tensor([0, 1])}
        with pytest.raises(ValueError, match=r"17 tokens minus prefix_tokens=2 leaves 15"):
            ofa(student, teacher, batch)
        ofa = token_ofa(prefix_tokens=2, stage_grids=[(4, 4), (4, 4)])
        with pytest.raises(
            ValueError, match=r"17 tokens do not fit prefix_tokens=2 \+ a 4x4 grid \(18 tokens\)"
        ):
            ofa(student, teacher, batch)
        token_ofa(prefix_tokens=1)(student, teacher, batch)  # the right count works

    def test_default_blocks_follow_the_official_stage_rule(self) -> None:
        ofa = token_ofa(
            stage_layers=["a", "b", "c", "d"], stage_channels=[8] * 4, stage_downsamples=[1] * 4, num_heads=2
        )
        assert ofa.stage_blocks == (3, 2, 1, 1)  # max(4 - s, 1)
        assert [len(b.blocks) for b in ofa.branches] == [3, 2, 1, 1]
        assert ofa.branches[0].blocks[0].attn.num_heads == 2
        assert ofa.branches[0].blocks[0].norm1.eps == 1e-5  # nn.LayerNorm, as timm 0.6.5's Block

    def test_official_init(self) -> None:
        torch.manual_seed(0)
        ofa = conv_ofa(embed_dim=256, num_classes=300)
        head = ofa.branches[0].head
        assert head.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert head.weight.abs().max().item() <= 2.0 and head.bias.abs().sum() == 0
        bn = ofa.branches[0].project[0][2]
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and bn.bias.abs().sum() == 0
        conv = ofa.branches[0].project[0][5]  # pointwise 4 -> 256: Kaiming fan-out std sqrt(2 / 256)
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
        tokens = token_ofa(embed_dim=64, stage_channels=[64, 64])
        qkv = tokens.branches[0].blocks[0].attn.qkv
        assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.05) and qkv.bias is None

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="stage_channels has 1 entries but stage_layers has 2"):
            conv_ofa(stage_channels=[4])
        with pytest.raises(ValueError, match="stage_eps has 3 entries"):
            conv_ofa(stage_eps=[1.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="prefix_tokens.*branch='tokens' only"):
            conv_ofa(prefix_tokens=1)
        with pytest.raises(ValueError, match="distinct"):
            conv_ofa(stage_layers=["s1", "s1"])
        with pytest.raises(ValueError, match="eps must be a number > 0"):
            conv_ofa(eps=0.0)
        with pytest.raises(ValueError, match="branch must be one of"):
            conv_ofa(branch="mlp")
        with pytest.raises(ValueError, match="divisible by num_heads"):
            token_ofa(embed_dim=6, stage_channels=[6, 6])
        with pytest.raises(ValueError, match="'b2' has 4 channels but embed_dim=8"):
            token_ofa(stage_channels=[8, 4])
        with pytest.raises(ValueError, match="'b1' has 4 channels.*prefix tokens"):
            token_ofa(stage_channels=[4, 8])
        token_ofa(stage_channels=[4, 8], prefix_tokens=0)  # merged to embed_dim: fine without prefix tokens
        with pytest.raises(ValueError, match="nhwc"):
            token_ofa(token_layout="nhwc")
        ofa = conv_ofa()
        student, teacher, batch = self.inputs()
        with pytest.raises(ValueError, match="needs the ground-truth labels"):
            ofa(student, teacher, None)
        with pytest.raises(ValueError, match=r"num_classes=5, got teacher logits \(4, 6\)"):
            ofa(student, {"output": torch.randn(4, 6)}, batch)
        with pytest.raises(ValueError, match=r"target values must lie in \[0, 5\)"):
            ofa(student, teacher, {"target": torch.tensor([0, 1, 2, 5])})
        with pytest.raises(
            ValueError, match=r"expects a \(N, 4, H, W\) map, got \(4, 16, 4\).*branch='tokens'"
        ):
            ofa({**student, "s1": torch.randn(4, 16, 4)}, teacher, batch)
        with pytest.raises(ValueError, match=r"C = 8.*got \(2, 8, 4, 4\).*branch='conv'"):
            token_ofa()({"output": torch.randn(2, 5), "b1": torch.randn(2, 8, 4, 4)}, {"output": torch.randn(2, 5)},
                        {"target": torch.tensor([0, 1])})  # fmt: skip
        with pytest.raises(KeyError, match="tapped"):
            ofa({"output": student["output"]}, teacher, batch)
        with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\)"):
            ofa_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"soft targets \(2, 3\) must have shape \(N, C\) = \(2, 4\)"):
            ofa_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3))


class TestOFATokens(DistillerTester):
    """The shared checks on token branches (a DeiT-like student with a class token)."""

    yaml_config = (
        "class_path: lightningkd.distillers.OFA\n"
        "init_args: {num_classes: 100, stage_layers: [blocks.1, blocks.3, blocks.9, blocks.11],"
        " stage_channels: [192, 192, 192, 192], stage_downsamples: [1, 1, 1, 1], embed_dim: 192,"
        " branch: tokens, prefix_tokens: 1}"
    )
    term_names = ("logits", "blocks.1", "blocks.3")

    def make(self) -> OFA:
        return token_ofa(stage_layers=["blocks.1", "blocks.3"], stage_downsamples=[1, 0], eps=1.5)

    def inputs(self):
        student = {
            "output": torch.randn(3, 5, requires_grad=True),
            "blocks.1": torch.randn(3, 1 + 16, 8, requires_grad=True),
            "blocks.3": torch.randn(3, 1 + 16, 8, requires_grad=True),
        }
        return student, {"output": torch.randn(3, 5)}, {"target": torch.tensor([2, 0, 4])}

    def twin(self, distiller, student, teacher, batch):
        return twin_sum(distiller, student, teacher, batch)
