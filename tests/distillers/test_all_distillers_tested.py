"""Every public distiller has a DistillerTester subclass, so none skips the shared checks."""

import importlib
import inspect
from pathlib import Path

import lightningkd.distillers as distillers
from tests.distiller_tester import DistillerTester


def test_every_public_distiller_runs_the_shared_checks() -> None:
    public = {
        obj
        for name in distillers.__all__
        if inspect.isclass(obj := getattr(distillers, name))
        and issubclass(obj, distillers.Distiller)
        and obj is not distillers.Distiller
    }
    tested = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        module = importlib.import_module(f"tests.distillers.{path.stem}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, DistillerTester) and obj is not DistillerTester:
                tested.add(type(obj().make()))
    assert public - tested == set(), f"distillers without a DistillerTester class: {public - tested}"
