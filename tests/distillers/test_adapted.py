import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser

from lightningkd.adapters import ChannelProjection, TokensToMap
from lightningkd.distillers import AT, Distiller, FitNet
from lightningkd.distillers.adapted import Adapted
from lightningkd.functional.fitnet import fitnet_loss
from tests.distiller_tester import DistillerTester


class TestAdapted(DistillerTester):
    """FitNet between a CNN student map and a ViT teacher's tokens (1 class token, 4x4 grid)."""

    yaml_config = """
class_path: lightningkd.distillers.Adapted
init_args:
  distiller:
    class_path: lightningkd.distillers.FitNet
    init_args: {student_layer: layer3, teacher_layer: blocks.3, student_channels: 8, teacher_channels: 6}
  teacher: {class_path: lightningkd.adapters.TokensToMap, init_args: {prefix_tokens: 1}}
  weight: 2.0
"""

    def test_builds_from_yaml(self) -> None:
        """A nested distiller and adapter, which the shared check cannot pass to Python."""
        spec = yaml.safe_load(self.yaml_config)
        parser = ArgumentParser()
        parser.add_argument("--distiller", type=Distiller)
        built = parser.instantiate_classes(parser.parse_object({"distiller": spec})).distiller
        assert isinstance(built, Adapted) and isinstance(built.distiller, FitNet)
        assert isinstance(built.teacher_adapter, TokensToMap) and built.teacher_adapter.prefix_tokens == 1
        assert (built.weight, built.student_layers, built.teacher_layers) == (2.0, ("layer3",), ("blocks.3",))

    def make(self) -> Adapted:
        return Adapted(
            distiller=FitNet(
                student_layer="layer3", teacher_layer="blocks.3", student_channels=8, teacher_channels=6
            ),
            student=ChannelProjection(8, 8),
            teacher=TokensToMap(prefix_tokens=1),
        )

    def inputs(self):
        student = {"layer3": torch.randn(2, 8, 4, 4, requires_grad=True)}
        teacher = {"blocks.3": torch.randn(2, 17, 6)}
        return student, teacher, None

    def twin(self, distiller, student, teacher, batch):
        s = distiller.student_adapter(student["layer3"])
        t = teacher["blocks.3"][:, 1:].transpose(1, 2).reshape(2, 6, 4, 4)  # drop the class token by hand
        return fitnet_loss(distiller.distiller.regressor(s), t)


def test_without_the_adapter_the_error_names_both_shapes_and_the_adapter() -> None:
    fitnet = FitNet(student_layer="s", teacher_layer="t", student_channels=8, teacher_channels=6)
    with pytest.raises(
        ValueError, match=r"\(2, 8, 4, 4\).*\(2, 17, 6\).*TokensToMap\(prefix_tokens=1, grid=\(4, 4\)\)"
    ):
        fitnet({"s": torch.zeros(2, 8, 4, 4)}, {"t": torch.zeros(2, 17, 6)})


def test_value_equals_the_inner_distiller_on_converted_features() -> None:
    torch.manual_seed(0)
    at = AT(student_layers=["s"], teacher_layers=["t"])
    s = torch.rand(2, 8, 4, 4)
    tokens = torch.rand(2, 1 + 16, 6)
    t_map = tokens[:, 1:].reshape(2, 4, 4, 6).permute(0, 3, 1, 2)  # by hand: row-major grid
    expected = at({"s": s}, {"t": t_map})
    got = Adapted(distiller=at, teacher=TokensToMap(prefix_tokens=1))({"s": s}, {"t": tokens})
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # AT of the same maps by hand: mean over channels of x^2, L2-normalised, mean squared difference
    qs = F.normalize(s.pow(2).mean(1).flatten(1), dim=1)
    qt = F.normalize(t_map.pow(2).mean(1).flatten(1), dim=1)
    assert got.item() == pytest.approx((qs - qt).pow(2).mean().item(), rel=1e-5)


def test_weight_and_name_default_to_the_inner_distillers() -> None:
    inner = AT(student_layers=["s"], teacher_layers=["t"], weight=1000.0, name="at_vit")
    d = Adapted(distiller=inner, teacher=TokensToMap())
    assert (d.weight, d.name, d.student_layers, d.teacher_layers) == (1000.0, "at_vit", ("s",), ("t",))
    assert Adapted(distiller=inner, teacher=TokensToMap(), weight=2.0).weight == 2.0


def test_bad_arguments() -> None:
    at = AT(student_layers=["s"], teacher_layers=["t"])
    with pytest.raises(ValueError, match="give a student or a teacher adapter"):
        Adapted(distiller=at)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        Adapted(distiller=at, teacher="TokensToMap")
    with pytest.raises(TypeError, match="must be a Distiller instance"):
        Adapted(distiller=torch.nn.Identity(), teacher=TokensToMap())
