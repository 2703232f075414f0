"""Shared checks every distiller must pass; each distiller's test class subclasses DistillerTester."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from lightningkd.distillers import Distiller

PARITY = Path(__file__).parent / "fixtures" / "parity"


def parity_cases(method: str) -> list[dict[str, Any]]:
    """The cases of ``tests/fixtures/parity/<method>.json`` (copied from the authors' parity fixtures)."""
    return json.loads((PARITY / f"{method}.json").read_text())["cases"]


def tensor(spec: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild a fixture tensor ``{"shape", "data", "dtype"}``; floats are cast to ``dtype`` if given."""
    t = torch.tensor(spec["data"], dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def parse_distiller(spec: dict[str, Any]) -> Any:
    """Parse a distiller spec (``class_path`` / ``init_args``) as LightningCLI does; bad values raise."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--distiller", type=Distiller)
    return parser.parse_object({"distiller": spec})


def log_softmax_by_hand(values: list[float]) -> list[float]:
    """``log softmax`` of a list of floats in plain Python (for known values computed independently)."""
    m = max(values)
    lse = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - lse for v in values]


def kl_by_hand(log_p: list[float], log_q: list[float]) -> float:
    """``KL(p || q)`` from log-probabilities, in plain Python."""
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


# ---- precision policy: under bf16/fp16 autocast every distiller computes its softmax, KL, normalisation,
# norms, variances and Gram matrices in float32. The tests compare the loss under autocast with the float32
# loss on the same inputs rounded to the half dtype, so these tolerances bound the computation only.
HALF_DTYPES = (torch.bfloat16, torch.float16)
LOSS_RTOL = 1e-5
"""A distiller without learnable parameters does all its maths in float32 on exactly the float32 reference's
inputs: only the summation order may differ (float32 rounding, ~1e-7 per operation). Computing a softmax in
bf16 instead moves KD's loss by ~7e-2 and in fp16 by ~4e-3, so this catches any half-precision step."""
ADAPTER_RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
"""A distiller with learnable adapters runs their convolutions and linear layers in the half dtype under
autocast (as intended: they are part of the model's compute), so their outputs are rounded once, a relative
error of up to the unit roundoff u of the dtype (bf16: 8 significant bits, u = 2^-8 = 3.9e-3; fp16: 11 bits,
u = 2^-11 = 4.9e-4). A loss that averages many such elements stays within u of the float32 value; the
float32 output check (``loss.dtype``) catches loss maths left in half precision behind an adapter."""
HALF_ATOL = 1e-6
"""For losses that are (near) zero, where a relative tolerance means nothing."""

Inputs = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any] | None]


class DistillerTester:
    """Subclass and define :meth:`make`, :meth:`inputs`, :meth:`twin`, :attr:`yaml_config` and, for a
    multi-term distiller, :attr:`term_names`; dense distillers also define :meth:`resized_inputs`.

    ``inputs`` returns ``(student_features, teacher_features, batch)`` with float32 tensors; student tensors
    must be leaves with ``requires_grad=True``; teacher tensors must not require grad (as produced by the
    module's no_grad teacher forward).
    """

    yaml_config: str = ""
    term_names: tuple[str, ...] = ("loss",)
    """The keys :meth:`Distiller.terms` must return, in order."""
    half_rtol: dict[torch.dtype, float] | None = None
    """Per-class override of the bf16/fp16 tolerance (default: :data:`LOSS_RTOL` or :data:`ADAPTER_RTOL`);
    an override must say why in a comment."""

    def make(self) -> Distiller:
        raise AssertionError("DistillerTester subclasses must define make()")

    def inputs(self) -> Inputs:
        raise AssertionError("DistillerTester subclasses must define inputs()")

    def twin(self, distiller: Distiller, student, teacher, batch) -> torch.Tensor:
        """The functional form (``lightningkd.functional``) on the same features, with the distiller's
        hyper-parameters and its learnable adapters applied as the distiller applies them."""
        raise AssertionError("DistillerTester subclasses must define twin()")

    def resized_inputs(self) -> Inputs | None:
        """Dense inputs whose student and teacher maps differ in spatial size (None: not a dense method)."""
        return None

    def test_scalar_and_finite(self) -> None:
        torch.manual_seed(0)
        distiller = self.make()
        loss = distiller(*self.inputs())
        assert loss.ndim == 0
        assert torch.isfinite(loss)
        assert loss.item() >= 0

    @pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    def test_half_autocast_matches_float32(self, dtype: torch.dtype) -> None:
        # The precision policy: under bf16/fp16 autocast the loss maths runs in float32. The float32
        # reference gets the SAME inputs rounded to ``dtype``, so only the precision of the computation
        # differs between the two calls, never the inputs.
        distiller, loss, (student, teacher, batch) = self._loss_under_autocast(dtype)
        rounded_student = {k: v.detach().to(dtype).float() for k, v in student.items()}
        rounded_teacher = {k: v.detach().to(dtype).float() for k, v in teacher.items()}
        torch.manual_seed(1)
        expected = distiller(rounded_student, rounded_teacher, batch).item()
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert loss.dtype == torch.float32, (
            f"the loss is {loss.dtype} under {dtype} autocast: compute in float32"
        )
        assert loss.item() == pytest.approx(expected, rel=self._half_rtol(distiller, dtype), abs=HALF_ATOL)

    def test_student_gradient_finite_under_fp16_autocast(self) -> None:
        # fp16 overflows above 65504: sums of squares, exponentials and Gram matrices kept in fp16 give an
        # inf/nan gradient even where the loss itself comes back finite
        _, loss, (student, _, _) = self._loss_under_autocast(torch.float16)
        loss.backward()
        grads = [v.grad for v in student.values() if v.grad is not None]
        assert grads, "no gradient reached the student under fp16 autocast"
        assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)

    def _loss_under_autocast(self, dtype: torch.dtype) -> tuple[Distiller, torch.Tensor, Inputs]:
        """The distiller (eval: no memory update, deterministic adapters), its loss on the inputs cast to
        ``dtype`` under CPU autocast, and those inputs (the student's as half-precision leaves)."""
        torch.manual_seed(0)
        distiller = self.make().eval()
        student, teacher, batch = self.inputs()
        student = {k: v.detach().to(dtype).requires_grad_(True) for k, v in student.items()}
        teacher = {k: v.detach().to(dtype) for k, v in teacher.items()}
        torch.manual_seed(1)  # the same random draws (e.g. memory slots) as the float32 reference
        with torch.autocast("cpu", dtype=dtype):
            loss = distiller(student, teacher, batch)
        return distiller, loss, (student, teacher, batch)

    def _half_rtol(self, distiller: Distiller, dtype: torch.dtype) -> float:
        if self.half_rtol is not None:
            return self.half_rtol[dtype]
        has_adapters = any(True for _ in distiller.parameters())
        return ADAPTER_RTOL[dtype] if has_adapters else LOSS_RTOL

    def test_gradients_reach_student_and_adapters(self) -> None:
        torch.manual_seed(0)
        distiller = self.make()
        student, teacher, batch = self.inputs()
        assert all(not v.requires_grad for v in teacher.values())
        distiller(student, teacher, batch).backward()
        assert any(v.grad is not None and v.grad.abs().sum() > 0 for v in student.values())
        for name, p in distiller.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"adapter parameter {name} got no gradient"

    def test_terms_sum_to_forward(self) -> None:
        torch.manual_seed(0)
        distiller = self.make().eval()  # eval: no memory-bank update between the two calls
        student, teacher, batch = self.inputs()
        torch.manual_seed(1)  # the same random draws (e.g. memory slots) in both calls
        terms = distiller.terms(student, teacher, batch)
        torch.manual_seed(1)
        loss = distiller(student, teacher, batch)
        assert tuple(terms) == self.term_names
        assert all(isinstance(key, str) and key for key in terms)
        assert all(torch.is_tensor(v) and v.ndim == 0 for v in terms.values())
        total = math.fsum(v.item() for v in terms.values())
        assert total == pytest.approx(loss.item(), rel=1e-6, abs=1e-12)

    def test_functional_twin_agrees(self) -> None:
        self._check_twin(self.inputs())

    def test_functional_twin_agrees_on_different_spatial_sizes(self) -> None:
        inputs = self.resized_inputs()
        if inputs is None:
            pytest.skip("no dense inputs of different spatial sizes for this tester (resized_inputs is None)")
        student, teacher, _ = inputs
        s_sizes = {tuple(v.shape[2:]) for v in student.values()}
        t_sizes = {tuple(v.shape[2:]) for v in teacher.values()}
        assert s_sizes.isdisjoint(t_sizes), "resized_inputs must give the two models different spatial sizes"
        self._check_twin(inputs)

    def _check_twin(self, inputs: Inputs) -> None:
        torch.manual_seed(0)
        distiller = self.make().eval()  # eval: deterministic adapters (dropout, BatchNorm statistics)
        student, teacher, batch = inputs
        torch.manual_seed(1)
        got = distiller(student, teacher, batch)
        torch.manual_seed(1)
        expected = self.twin(distiller, student, teacher, batch)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)

    def test_builds_from_yaml(self) -> None:
        spec = yaml.safe_load(self.yaml_config)
        parser = ArgumentParser()
        parser.add_argument("--distiller", type=Distiller)
        built = parser.instantiate_classes(parser.parse_object({"distiller": spec})).distiller
        assert isinstance(built, type(self.make()))
        # the init args were applied: the YAML moves some away from their defaults, and every one that
        # the distiller keeps as an attribute (``x`` or, for layer names, ``xs``) holds the YAML's value
        init_args = spec.get("init_args", {})
        defaults = {k: p.default for k, p in inspect.signature(type(built)).parameters.items()}
        assert any(value != defaults.get(key) for key, value in init_args.items()), "YAML sets only defaults"
        checked = []
        for key, value in init_args.items():
            if hasattr(built, key) and not callable(getattr(built, key)):
                got = getattr(built, key)
                assert (list(got) if isinstance(got, tuple) else got) == value, key
                checked.append(key)
            elif isinstance(getattr(built, key + "s", None), tuple):
                assert value in getattr(built, key + "s"), key
                checked.append(key)
        assert checked, f"none of {sorted(init_args)} is visible on the built distiller"
        # and the object is the one Python builds from the same arguments
        assert built.extra_repr() == type(built)(**init_args).extra_repr()

    def test_yaml_typo_fails(self) -> None:
        spec = yaml.safe_load(self.yaml_config)
        spec.setdefault("init_args", {})["no_such_argument"] = 1
        with pytest.raises(Exception, match="no_such_argument"):
            parse_distiller(spec)
