import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.callbacks.centers import NDClassCenters, class_centers, load_class_centers
from lightningkd.distillers import KD
from lightningkd.distillers.nd import ND
from lightningkd.functional._helpers import flatten_embedding
from lightningkd.functional.nd import nd_loss
from lightningkd.modules import ClassificationDistillationModule
from tests.distiller_tester import DistillerTester, parity_cases, tensor


def nd_by_hand(
    s: list[list[float]], t: list[list[float]], centers: list[list[float]], labels: list[int]
) -> float:
    """The paper's ND loss: mean_i [1 - <s_i, c_y / ||c_y||> / max(||s_i||, ||t_i||)]."""

    def norm(v):
        return math.sqrt(sum(x * x for x in v))

    total = 0.0
    for si, ti, y in zip(s, t, labels):
        c = centers[y]
        e = [x / norm(c) for x in c]
        total += 1.0 - sum(a * b for a, b in zip(si, e)) / max(norm(si), norm(ti))
    return total / len(s)


def make_nd(**kwargs) -> ND:
    args = dict(student_layer="s", teacher_layer="t", student_dim=4, teacher_dim=4, num_classes=3)
    return ND(**{**args, **kwargs})


def nd_module() -> L.LightningModule:
    """A classification module with KD + ND (no centres yet) whose teacher's layer "1" is the identity."""
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        teacher[1].weight.copy_(torch.eye(4))
        teacher[1].bias.zero_()
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    nd = ND(student_layer="1", teacher_layer="1", student_dim=4, teacher_dim=4, num_classes=3)
    return ClassificationDistillationModule(student, teacher, num_classes=3, distillers=[KD(), nd])


class TestND(DistillerTester):
    yaml_config = (
        "class_path: lightningkd.distillers.nd.ND\n"
        "init_args: {student_layer: avgpool, teacher_layer: avgpool, student_dim: 512, teacher_dim: 2048,"
        " num_classes: 100, weight: 2.0}"
    )

    def make(self) -> ND:
        nd = ND(student_layer="s", teacher_layer="t", student_dim=8, teacher_dim=16, num_classes=5)
        nd.set_centers(torch.randn(5, 16, generator=torch.Generator().manual_seed(7)))
        return nd

    def inputs(self):
        return (
            {"s": torch.randn(4, 8, requires_grad=True)},
            {"t": torch.randn(4, 16)},
            {"target": torch.tensor([0, 1, 2, 4])},
        )

    def twin(self, distiller, student, teacher, batch):
        # the projector (a learnable adapter) runs on the pooled student embedding, as in the distiller
        s = distiller.projector(flatten_embedding(student["s"]))
        return nd_loss(s, teacher["t"], distiller.centers, batch["target"])

    def resized_inputs(self):
        # un-pooled maps of different sizes: both are global-average-pooled
        return (
            {"s": torch.randn(4, 8, 3, 3, requires_grad=True)},
            {"t": torch.randn(4, 16, 2, 2)},
            {"target": torch.tensor([0, 1, 2, 4])},
        )

    def test_known_value(self) -> None:
        torch.manual_seed(1)
        s, t, c = torch.randn(5, 4), torch.randn(5, 4), torch.randn(3, 4)
        s[:2] *= 5.0  # the student norm wins for some samples, the teacher's for the others
        labels = [0, 2, 1, 1, 0]
        expected = nd_by_hand(s.tolist(), t.tolist(), c.tolist(), labels)
        assert nd_loss(s, t, c, torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-6)
        nd = make_nd()
        nd.set_centers(c)
        got = nd({"s": s}, {"t": t}, {"target": torch.tensor(labels)})
        assert got.item() == pytest.approx(expected, rel=1e-6)

    def test_unpooled_maps_are_averaged(self) -> None:
        torch.manual_seed(2)
        s, t, c = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(3, 4)
        nd = make_nd()
        nd.set_centers(c)
        pooled_s = [[sum(sum(r) for r in ch) / 9 for ch in sample] for sample in s.tolist()]
        pooled_t = [[sum(sum(r) for r in ch) / 9 for ch in sample] for sample in t.tolist()]
        expected = nd_by_hand(pooled_s, pooled_t, c.tolist(), [1, 2])
        assert nd({"s": s}, {"t": t}, {"target": torch.tensor([1, 2])}).item() == pytest.approx(
            expected, rel=1e-6
        )

    def test_gradient_flows_through_the_max_like_the_official_code(self) -> None:
        c = [[3.0, 4.0], [0.0, 1.0]]
        s_list = [[3.0, 1.0], [0.5, 0.5]]  # sample 0: ||s|| > ||t||; sample 1: ||s|| < ||t||
        t_list = [[1.0, 0.0], [2.0, 0.0]]
        s = torch.tensor(s_list, dtype=torch.float64, requires_grad=True)
        nd_loss(
            s,
            torch.tensor(t_list, dtype=torch.float64),
            torch.tensor(c, dtype=torch.float64),
            torch.tensor([0, 1]),
        ).backward()
        n = 2
        # sample 0: d/ds [-<s,e>/||s||] = -(e/||s|| - <s,e> s/||s||^3)
        e0 = [0.6, 0.8]
        s0 = s_list[0]
        ns0 = math.sqrt(sum(v * v for v in s0))
        dot0 = sum(a * b for a, b in zip(s0, e0))
        g0 = [-(e0[k] / ns0 - dot0 * s0[k] / ns0**3) / n for k in range(2)]
        # sample 1: the teacher norm (2) wins and is a constant: d/ds [-<s,e>/2] = -e/2
        g1 = [-0.0 / 2 / n, -1.0 / 2 / n]
        assert s.grad.tolist()[0] == pytest.approx(g0, rel=1e-12)
        assert s.grad.tolist()[1] == pytest.approx(g1, abs=1e-15)

    @pytest.mark.parametrize("case", parity_cases("nd"), ids=lambda c: c["name"])
    def test_parity_with_official_code(self, case) -> None:
        factor = case["hyper"]["nd_loss_factor"]
        for dtype, key, rel in (
            (torch.float64, "expected", 1e-10),
            (torch.float32, "expected_float32", 1e-4),
        ):
            s = tensor(case["inputs"]["student_emb"], dtype)
            t = tensor(case["inputs"]["teacher_emb"], dtype)
            c = tensor(case["inputs"]["class_centers"], dtype)
            y = tensor(case["inputs"]["labels"])
            assert (factor * nd_loss(s, t, c, y)).item() == pytest.approx(case[key], rel=rel)
            if dtype == torch.float32:  # the distiller stores float32 centres
                k, d = c.shape
                nd = ND(student_layer="s", teacher_layer="t", student_dim=d, teacher_dim=d, num_classes=k)
                nd.set_centers(c)
                got = factor * nd({"s": s}, {"t": t}, {"target": y})
                assert got.item() == pytest.approx(case[key], rel=rel)

    def test_projector_matches_the_authors_embtrans(self) -> None:
        torch.manual_seed(0)
        nd = ND(student_layer="s", teacher_layer="t", student_dim=64, teacher_dim=128, num_classes=3)
        bn, drop, linear = nd.projector
        assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 64
        assert isinstance(drop, nn.Dropout) and drop.p == 0.5
        assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (64, 128)
        assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert linear.bias.std().item() == pytest.approx(0.01, rel=0.5)
        assert not list(make_nd().parameters())  # equal dims: no projector

    def test_projector_receives_gradients(self) -> None:
        torch.manual_seed(0)
        nd = ND(student_layer="s", teacher_layer="t", student_dim=6, teacher_dim=10, num_classes=2)
        nd.set_centers(torch.randn(2, 10))
        s = torch.randn(8, 6, requires_grad=True)
        nd({"s": s}, {"t": torch.randn(8, 10)}, {"target": torch.tensor([0, 1] * 4)}).backward()
        for name, p in nd.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert s.grad.abs().sum() > 0

    def test_without_centres_raises_a_clear_error(self) -> None:
        nd = make_nd()
        assert not nd.has_centers
        with pytest.raises(
            RuntimeError, match=r"class centres are not set.*NDClassCenters.*path=.*set_centers"
        ):
            nd({"s": torch.randn(2, 4)}, {"t": torch.randn(2, 4)}, {"target": torch.tensor([0, 1])})

    def test_centres_round_trip_through_state_dict(self) -> None:
        centres = torch.randn(3, 4)
        nd = make_nd()
        nd.set_centers(centres)
        state = nd.state_dict()
        assert {"centers", "centers_ready"} <= set(state)
        fresh = make_nd()
        assert not fresh.has_centers
        fresh.load_state_dict(state)
        assert fresh.has_centers and bool(fresh.centers_ready)
        torch.testing.assert_close(fresh.centers, centres)
        batch = {"target": torch.tensor([2, 0])}
        s, t = torch.randn(2, 4), torch.randn(2, 4)
        assert fresh({"s": s}, {"t": t}, batch).item() == pytest.approx(nd({"s": s}, {"t": t}, batch).item())
        # loading a checkpoint saved before the centres were set clears the flag again
        fresh.load_state_dict(make_nd().state_dict())
        assert not fresh.has_centers

    def test_loads_the_authors_json_centres(self, tmp_path) -> None:
        rows = [[0.1234, -1.0, 2.5, 0.0], [1.0, 1.0, 1.0, 1.0], [-0.5, 0.25, 0.0, 3.0]]
        path = tmp_path / "center_emb_train.json"
        # the authors' format: str(class) -> list of floats (key order is not relied on)
        path.write_text(json.dumps({"2": rows[2], "0": rows[0], "1": rows[1]}))
        module = nd_module()
        NDClassCenters(path=str(path)).on_fit_start(SimpleNamespace(datamodule=None), module)
        nd = module.distillers[1]
        assert nd.has_centers
        for got_row, row in zip(nd.centers.tolist(), rows):
            assert got_row == pytest.approx(row, rel=1e-6)

    def test_loads_pt_centres(self, tmp_path) -> None:
        centres = torch.randn(3, 4)
        torch.save(centres, tmp_path / "centres.pt")
        torch.testing.assert_close(load_class_centers(tmp_path / "centres.pt"), centres)
        module = nd_module()
        NDClassCenters(path=tmp_path / "centres.pt").on_fit_start(SimpleNamespace(datamodule=None), module)
        torch.testing.assert_close(module.distillers[1].centers, centres)

    def test_bad_centre_files_are_rejected(self, tmp_path) -> None:
        missing = tmp_path / "missing.json"
        missing.write_text(json.dumps({"0": [1.0, 0.0, 0.0, 0.0], "2": [0.0, 1.0, 0.0, 0.0]}))
        with pytest.raises(ValueError, match=r"classes 0..K-1.*missing \[1\]"):
            load_class_centers(missing)
        wrong_dim = tmp_path / "wrong_dim.json"
        wrong_dim.write_text(json.dumps({str(k): [1.0, 2.0] for k in range(3)}))
        no_fit = SimpleNamespace(datamodule=None)
        message = r"wrong_dim.json' have shape \(3, 2\).*'nd'.*num_classes=3 and teacher_dim=4.*\(3, 4\)"
        with pytest.raises(ValueError, match=message):
            NDClassCenters(path=wrong_dim).on_fit_start(no_fit, nd_module())
        with pytest.raises(FileNotFoundError, match="does not exist"):
            NDClassCenters(path=tmp_path / "nope.pt").on_fit_start(no_fit, nd_module())
        txt = tmp_path / "centres.txt"
        txt.write_text("1 2 3")
        with pytest.raises(ValueError, match=r"\.pt/\.pth or \.json"):
            load_class_centers(txt)
        pickled = tmp_path / "centres.pt"
        torch.save({"model": nn.Linear(2, 2)}, pickled)  # a pickled module: refused, never executed
        with pytest.raises(Exception, match="weights_only|Weights only"):
            load_class_centers(pickled)

    def test_callback_computes_the_centres_with_the_teacher(self) -> None:
        module = nd_module()
        images, labels = torch.randn(12, 4), torch.tensor([0, 1, 2] * 4)
        loader = DataLoader(TensorDataset(images, labels), batch_size=5)
        trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataloader=lambda: loader))
        NDClassCenters().on_fit_start(trainer, module)
        # by hand: the teacher's "1" layer is the identity map of its (eye-initialised) Linear
        expected = [
            [sum(images[i, d].item() for i in range(12) if i % 3 == k) / 4 for d in range(4)]
            for k in range(3)
        ]
        for got_row, row in zip(module.distillers[1].centers.tolist(), expected):
            assert got_row == pytest.approx(row, rel=1e-5, abs=1e-6)
        # centres already set (e.g. from a checkpoint) are kept
        before = module.distillers[1].centers.clone()
        NDClassCenters().on_fit_start(SimpleNamespace(datamodule=None), module)
        assert torch.equal(module.distillers[1].centers, before)

    def test_callback_without_datamodule_or_path_explains_the_fix(self) -> None:
        with pytest.raises(RuntimeError, match=r"LightningDataModule.*NDClassCenters\(path="):
            NDClassCenters().on_fit_start(SimpleNamespace(datamodule=None), nd_module())

    def test_class_centers_on_a_tiny_model(self) -> None:
        torch.manual_seed(0)
        # BN + dropout check that the teacher runs in eval mode
        teacher = nn.Sequential(
            nn.Conv2d(1, 3, 1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(3, 2),
        )
        teacher[1].running_mean.fill_(0.3)
        teacher.train()
        x1, y1 = torch.randn(3, 1, 2, 2), torch.tensor([0, 2, 0])
        x2, y2 = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
        # by hand: embeddings of the eval-mode teacher's Flatten output, then per-class means
        w, b = teacher[0].weight.detach().flatten().tolist(), teacher[0].bias.detach().tolist()
        mean, var = teacher[1].running_mean.tolist(), teacher[1].running_var.tolist()
        gamma, beta = teacher[1].weight.detach().tolist(), teacher[1].bias.detach().tolist()

        def embed(img):  # img: (1, 2, 2) nested list
            pixels = [v for row in img[0] for v in row]
            out = []
            for c in range(3):
                acts = [
                    (w[c] * p + b[c] - mean[c]) / math.sqrt(var[c] + 1e-5) * gamma[c] + beta[c]
                    for p in pixels
                ]
                out.append(sum(max(a, 0.0) for a in acts) / len(acts))
            return out

        embs = [embed(img) for img in x1.tolist() + x2.tolist()]
        labels = y1.tolist() + y2.tolist()
        expected = []
        for k in range(3):
            members = [e for e, y in zip(embs, labels) if y == k]
            expected.append([sum(col) / len(members) for col in zip(*members)])
        tuple_loader = [(x1, y1), (x2, y2)]
        dict_loader = [{"image": x1, "target": y1}, {"image": x2, "target": y2}]
        for loader in (tuple_loader, dict_loader):
            got = class_centers(teacher, loader, layer="4", num_classes=3)
            assert got.shape == (3, 3) and got.dtype == torch.float32
            for got_row, row in zip(got.tolist(), expected):
                assert got_row == pytest.approx(row, rel=1e-5, abs=1e-7)
            assert teacher.training  # mode restored
            assert not teacher._forward_hooks and not teacher[4]._forward_hooks  # tap removed
        nd = ND(student_layer="s", teacher_layer="4", student_dim=2, teacher_dim=3, num_classes=3)
        nd.set_centers(class_centers(teacher, tuple_loader, layer="4", num_classes=3))
        assert nd.has_centers

    def test_class_centers_rejects_missing_classes_and_bad_batches(self) -> None:
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        loader = [(torch.randn(2, 4), torch.tensor([0, 0]))]
        with pytest.raises(ValueError, match=r"2 of 3 classes never appear.*\[1, 2\]"):
            class_centers(teacher, loader, layer="1", num_classes=3)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
            class_centers(teacher, [(torch.randn(2, 4), torch.tensor([0, 5]))], layer="1", num_classes=2)
        with pytest.raises(ValueError, match="'image' and 'target'"):
            class_centers(teacher, [{"img": torch.randn(2, 4)}], layer="1", num_classes=2)
        with pytest.raises(ValueError, match="no batches"):
            class_centers(teacher, [], layer="1", num_classes=2)
        with pytest.raises(ValueError, match="Unknown layer"):
            class_centers(teacher, loader, layer="fc", num_classes=1)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="student_dim must be a positive integer"):
            make_nd(student_dim=0)
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            make_nd(num_classes=-1)
        nd = make_nd()
        with pytest.raises(ValueError, match=r"shape \(3, 4\).*got \(4, 3\)"):
            nd.set_centers(torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"classes \[1\] are zero vectors"):
            nd.set_centers(torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0], [0, 0, 1.0, 0]]))
        nd.set_centers(torch.randn(3, 4))
        with pytest.raises(ValueError, match="ground-truth labels"):
            nd({"s": torch.randn(2, 4)}, {"t": torch.randn(2, 4)}, None)
        with pytest.raises(ValueError, match=r"student_dim=4 and teacher_dim=4.*\(2, 5\)"):
            nd({"s": torch.randn(2, 5)}, {"t": torch.randn(2, 4)}, {"target": torch.tensor([0, 1])})
        with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 6\).*same shape"):
            nd_loss(torch.randn(2, 4), torch.randn(2, 6), torch.randn(3, 4), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"centres \(3, 5\).*\(2, 4\)"):
            nd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 5), torch.tensor([0, 1]))
        with pytest.raises(TypeError, match=r"labels must be integer class labels"):
            nd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match=r"labels \(3,\) must have shape \(N,\) = \(2,\)"):
            nd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match=r"labels values must lie in \[0, 3\)"):
            nd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 3]))
        with pytest.raises(KeyError, match="tapped"):
            nd({"x": torch.randn(2, 4)}, {"t": torch.randn(2, 4)}, {"target": torch.tensor([0, 1])})
