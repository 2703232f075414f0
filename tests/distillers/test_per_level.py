from collections.abc import Mapping
from typing import Any

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor

from lightningkd.distillers import CWD, FGD, MGD, PKD, Distiller, PerLevel
from lightningkd.functional.fgd import fgd_loss, fgd_masks
from lightningkd.functional.pkd import pkd_loss
from tests.distiller_tester import DistillerTester, parse_distiller
from tests.distillers.test_fgd import detection_batch, randomise_global_blocks

LEVELS = ("0", "p6")
SIZES = {"0": (6, 8), "p6": (3, 4)}


def pyramid(
    channels: int, grad: bool = False, dtype=torch.float32, prefix: str = "backbone"
) -> dict[str, Tensor]:
    return {
        f"{prefix}:{level}": torch.randn(2, channels, *SIZES[level], dtype=dtype, requires_grad=grad)
        for level in LEVELS
    }


class TwoLayers(Distiller):
    """A distiller reading two layers (not a valid PerLevel template)."""

    student_layers = ("a", "b")
    teacher_layers = ("a", "b")

    def forward(self, student, teacher, batch: Mapping[str, Any] | None = None) -> Tensor:
        return torch.zeros(())


class TestPerLevel(DistillerTester):
    yaml_config = """
class_path: lightningkd.distillers.PerLevel
init_args:
  distiller: {class_path: lightningkd.distillers.FGD, init_args: {channels: 256}}
  levels: ["0", "1", "2", "p6", "p7"]
  student_layer: backbone
  teacher_layer: backbone
"""
    term_names = tuple(f"{level}/{term}" for level in LEVELS for term in ("fg", "bg", "attention", "global"))

    def make(self) -> PerLevel:
        per_level = PerLevel(
            distiller=FGD(channels=8, student_channels=4, weight=2.0),
            levels=list(LEVELS),
            student_layer="s",
            teacher_layer="t",
        )
        for i, level in enumerate(LEVELS):
            randomise_global_blocks(per_level.level(level), seed=i)
        return per_level

    def inputs(self):
        return pyramid(4, grad=True, prefix="s"), pyramid(8, prefix="t"), detection_batch()

    def twin(self, distiller, student, teacher, batch):
        total = torch.zeros(())
        for level in LEVELS:
            fgd = distiller.level(level)
            fg, bg = fgd_masks([t["boxes"] for t in batch["target"]], batch["image_sizes"], SIZES[level])
            total = total + fgd.weight * fgd_loss(
                fgd.align(student[f"s:{level}"]),
                teacher[f"t:{level}"],
                fg,
                bg,
                temperature=fgd.temperature,
                alpha=fgd.alpha,
                beta=fgd.beta,
                gamma=fgd.gamma,
                lambda_global=fgd.lambda_global,
                student_global=fgd.student_global,
                teacher_global=fgd.teacher_global,
            )
        return total

    def test_builds_from_yaml(self) -> None:
        """The recipe of the docstring: a nested template, which the shared check cannot pass to Python."""
        spec = yaml.safe_load(self.yaml_config)
        parser = ArgumentParser()
        parser.add_argument("--distiller", type=Distiller)
        built = parser.instantiate_classes(parser.parse_object({"distiller": spec})).distiller
        assert isinstance(built, PerLevel)
        assert built.levels == ("0", "1", "2", "p6", "p7")
        assert built.student_layers == (
            "backbone:0",
            "backbone:1",
            "backbone:2",
            "backbone:p6",
            "backbone:p7",
        )
        assert built.teacher_layers == built.student_layers
        assert built.name == "fgd" and built.weight == 1.0 and built.needs_labels
        python = PerLevel(distiller=FGD(channels=256), levels=["0", "1", "2", "p6", "p7"])
        assert built.extra_repr() == python.extra_repr()
        for level in built.levels:
            copy = built.level(level)
            assert isinstance(copy, FGD) and copy.channels == 256
            assert copy.student_layers == (f"backbone:{level}",)
            assert copy.extra_repr() == python.level(level).extra_repr()

    def test_yaml_typo_in_the_template_fails(self) -> None:
        spec = yaml.safe_load(self.yaml_config)
        spec["init_args"]["distiller"]["init_args"]["no_such_template_argument"] = 1
        with pytest.raises(Exception, match="no_such_template_argument"):
            parse_distiller(spec)

    # ---- the sum over levels ----------------------------------------------------------------------
    def test_equals_separately_run_distillers(self) -> None:
        torch.manual_seed(0)
        per_level = self.make().double()
        student = {k: v.detach().double() for k, v in pyramid(4, prefix="s").items()}
        teacher = pyramid(8, dtype=torch.float64, prefix="t")
        batch = detection_batch()
        expected = 0.0
        for level in LEVELS:
            alone = FGD(
                student_layer=f"s:{level}",
                teacher_layer=f"t:{level}",
                channels=8,
                student_channels=4,
                weight=2.0,
            ).double()
            alone.load_state_dict(per_level.level(level).state_dict())
            expected += alone.weight * alone(student, teacher, batch).item()
        assert per_level(student, teacher, batch).item() == pytest.approx(expected, rel=1e-12)
        terms = per_level.terms(student, teacher, batch)
        assert sum(v.item() for v in terms.values()) == pytest.approx(expected, rel=1e-12)

    def test_pkd_cwd_and_mgd_templates(self) -> None:
        torch.manual_seed(1)
        s, t = pyramid(4, prefix="backbone"), pyramid(4, prefix="backbone")
        pkd = PerLevel(distiller=PKD(weight=10.0), levels=list(LEVELS))
        assert tuple(pkd.terms(s, t)) == LEVELS  # single-term copies: one term per level
        expected = sum(
            10.0 * pkd_loss(s[f"backbone:{level}"], t[f"backbone:{level}"]).item() for level in LEVELS
        )
        assert pkd(s, t).item() == pytest.approx(expected, rel=1e-6)
        assert not pkd.needs_labels and pkd.name == "pkd"

        cwd = PerLevel(
            distiller=CWD(temperature=1.0, weight=10.0, student_channels=4, teacher_channels=6),
            levels=list(LEVELS),
        )
        t6 = pyramid(6, prefix="backbone")
        cwd.eval()
        expected = 0.0
        for level in LEVELS:
            alone = CWD(
                temperature=1.0, student_layer=f"backbone:{level}", teacher_layer=f"backbone:{level}",
                student_channels=4, teacher_channels=6, weight=10.0,
            ).eval()  # fmt: skip
            alone.load_state_dict(cwd.level(level).state_dict())
            expected += 10.0 * alone(s, t6).item()
        assert cwd(s, t6).item() == pytest.approx(expected, rel=1e-6)
        assert not torch.equal(cwd.level("0").adapter[0].weight, cwd.level("p6").adapter[0].weight)

        mgd = PerLevel(distiller=MGD(channels=6, student_channels=4), levels=list(LEVELS), name="mgd_fpn")
        torch.manual_seed(2)
        got = mgd(s, t6)
        torch.manual_seed(2)
        expected = sum(mgd.level(level)(s, t6) for level in LEVELS)  # the same draws, level by level
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        assert mgd.name == "mgd_fpn"

    def test_copies_have_independent_parameters(self) -> None:
        torch.manual_seed(0)
        template = FGD(channels=8, student_channels=4)
        template_weight = template.align.weight.detach().clone()
        per_level = PerLevel(distiller=template, levels=["0", "1", "2"])
        aligns = [per_level.level(level).align.weight for level in ("0", "1", "2")]
        masks = [per_level.level(level).student_global.conv_mask.weight for level in ("0", "1", "2")]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not torch.equal(aligns[i], aligns[j])  # re-initialised one by one
                assert not torch.equal(masks[i], masks[j])
                assert aligns[i].data_ptr() != aligns[j].data_ptr()
        # the official init on every copy; the template itself is neither changed nor registered
        assert all(
            torch.count_nonzero(per_level.level(lv).student_global.channel_add[3].weight) == 0 for lv in "012"
        )
        assert torch.equal(template.align.weight, template_weight)
        assert sum(p.numel() for p in per_level.parameters()) == 3 * sum(
            p.numel() for p in template.parameters()
        )
        assert template.student_layers == ("backbone:0",)
        with torch.no_grad():
            per_level.level("0").align.weight.zero_()
        assert torch.count_nonzero(per_level.level("1").align.weight) > 0

    def test_weights_and_flags(self) -> None:
        s, t, batch = self.inputs()
        torch.manual_seed(0)
        heavy = self.make()
        light = PerLevel(
            distiller=FGD(channels=8, student_channels=4, weight=1.0), levels=list(LEVELS), student_layer="s",
            teacher_layer="t", weight=3.0,
        )  # fmt: skip
        light.load_state_dict(heavy.state_dict())
        # the template's weight scales every level inside forward; PerLevel's own weight is the module's
        assert heavy(s, t, batch).item() == pytest.approx(2.0 * light(s, t, batch).item(), rel=1e-6)
        assert light.weight == 3.0 and heavy.weight == 1.0
        assert heavy.needs_labels and not heavy.needs_teacher_grad

    def test_level_names_become_safe_module_names(self) -> None:
        per_level = PerLevel(
            distiller=PKD(), levels=["keys", "a.b", "pool"], student_layer="fpn", teacher_layer="neck"
        )
        assert set(per_level.per_level.keys()) == {"level_keys", "a_b", "pool"}
        assert per_level.student_layers == ("fpn:keys", "fpn:a.b", "fpn:pool")
        assert per_level.teacher_layers == ("neck:keys", "neck:a.b", "neck:pool")
        assert per_level.level("a.b").student_layers == ("fpn:a.b",)
        with pytest.raises(KeyError, match="no level 'p7'"):
            per_level.level("p7")

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="non-empty list"):
            PerLevel(distiller=PKD(), levels=[])
        with pytest.raises(ValueError, match="non-empty list"):
            PerLevel(distiller=PKD(), levels="0")
        with pytest.raises(ValueError, match=r"\['0'\] appear more than once"):
            PerLevel(distiller=PKD(), levels=["0", "1", "0"])
        with pytest.raises(ValueError, match="clashing module names"):
            PerLevel(distiller=PKD(), levels=["a.b", "a_b"])
        with pytest.raises(ValueError, match="non-empty string"):
            PerLevel(distiller=PKD(), levels=["0", ""])
        with pytest.raises(ValueError, match=r"reads the student layers \['a', 'b'\].*exactly one of each"):
            PerLevel(distiller=TwoLayers(), levels=["0"])
        with pytest.raises(TypeError, match="must be a Distiller instance"):
            PerLevel(distiller={"class_path": "lightningkd.distillers.PKD"}, levels=["0"])
        with pytest.raises(ValueError, match="student_layer must be a non-empty layer name"):
            PerLevel(distiller=PKD(), levels=["0"], student_layer="")
        with pytest.raises(ValueError, match="weight"):
            PerLevel(distiller=PKD(), levels=["0"], weight=-1.0)
        with pytest.raises(KeyError, match="backbone:p6"):
            x = {"backbone:0": torch.randn(2, 4, 4, 4)}
            PerLevel(distiller=PKD(), levels=["0", "p6"])(x, x)
