import math

import pytest
import torch

from lightningkd.distillers import KD
from lightningkd.functional import kd_loss
from tests.distiller_tester import DistillerTester, parity_cases, tensor


def kd_by_hand(zs: list[list[float]], zt: list[list[float]], T: float) -> float:
    """The paper's equation in plain Python: T^2 * mean_n sum_c p_t log(p_t / p_s)."""
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        es = [math.exp(v / T) for v in s_row]
        et = [math.exp(v / T) for v in t_row]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return T * T * total / len(zs)


class TestKD(DistillerTester):
    yaml_config = "class_path: lightningkd.distillers.KD\ninit_args: {temperature: 4.0, weight: 0.9}"

    def make(self) -> KD:
        return KD(temperature=4.0)

    def twin(self, distiller, student, teacher, batch):
        return kd_loss(student["output"], teacher["output"], distiller.temperature)

    def inputs(self):
        return (
            {"output": torch.randn(4, 10, requires_grad=True)},
            {"output": torch.randn(4, 10)},
            None,
        )

    def test_known_value(self) -> None:
        zs = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
        zt = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
        got = KD(temperature=2.0)({"output": torch.tensor(zs)}, {"output": torch.tensor(zt)})
        assert got.item() == pytest.approx(kd_by_hand(zs, zt, 2.0), rel=1e-6)

    @pytest.mark.parametrize("case", parity_cases("kd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        T = case["hyper"]["temperature"]
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            zs = tensor(case["inputs"]["student_logits"], dtype)
            zt = tensor(case["inputs"]["teacher_logits"], dtype)
            assert kd_loss(zs, zt, T).item() == pytest.approx(case[key], rel=rel)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="temperature"):
            KD(temperature=0.0)
        with pytest.raises(ValueError, match="same shape"):
            kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
        with pytest.raises(KeyError, match="tapped"):
            KD(student_layer="fc")({"output": torch.zeros(2, 3)}, {"output": torch.zeros(2, 3)})
