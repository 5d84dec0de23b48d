"""export_saved_model, load_exported and `inspect`: served predictions equal the estimator's."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_estimator, run_fresh
from torch.utils.data import Dataset

from torch_tpu_estimator import (
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    load_exported,
)

BUCKETS = (1, 4)

# Runs in a new interpreter that imports nothing of the tests: only the export directory.
SERVE = """
import json, sys, torch
from torch_tpu_estimator import load_exported
export_dir, inputs_file, outputs_file = sys.argv[1:4]
model = load_exported(export_dir)
features = torch.load(inputs_file)
results = [model({key: value[:rows] for key, value in features.items()})
           for rows in range(0, len(features["x"]) + 1)]
# the StableHLO functions, run by torch_xla's own loader at each batch size they were traced at
from torch_xla.stablehlo import StableHLOGraphModule
program = StableHLOGraphModule.load(export_dir + "/stablehlo")
stablehlo = {size: program.evaluate(f"batch_{size}", [features["x"][:size], features["kind"][:size]])
             for size in model.signature.batch_sizes}
torch.save((results, {size: [t.cpu() for t in out] for size, out in stablehlo.items()}),
           outputs_file)
print(json.dumps({"step": model.global_step, "saw_model_code": "test_export" in sys.modules}))
"""

SERVE_TF = """
import json, sys, numpy as np, tensorflow as tf, torch
export_dir, inputs_file, outputs_file = sys.argv[1:4]
serve = tf.saved_model.load(export_dir + "/tf_saved_model").signatures["serving_default"]
features = torch.load(inputs_file)
results = {}
for rows in (1, 3, 4, 5, 9):
    outputs = serve(**{key: tf.constant(value[:rows].numpy()) for key, value in features.items()})
    results[rows] = {key: torch.from_numpy(value.numpy()) for key, value in outputs.items()}
torch.save(results, outputs_file)
print(json.dumps({"signatures": list(serve.structured_outputs)}))
"""


class Tower(torch.nn.Module):
    """Dense features and an id through an embedding, batch norm and dropout: eval-mode
    behaviour and two input dtypes that the export must keep."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.dense = torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
            torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))

    def forward(self, x, kind):
        return self.dense(torch.cat([x, self.embed(kind)], -1))


def tower_model_fn(model, features, labels, mode, params):
    x = features["x"].reshape(params["batch_size"], 8)  # params hold the traced batch size
    logits = model(x, features["kind"])
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={
            "class": logits.argmax(-1), "probabilities": logits.softmax(-1)})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))


class TowerData(Dataset):
    def __init__(self, size, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 8, generator=generator)
        self.kind = torch.randint(0, 5, (size,), generator=generator)
        self.labels = (self.x[:, 0] > 0).long() + (self.kind > 2).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"x": self.x[index], "kind": self.kind[index]}, self.labels[index]

    def features(self):
        return {"x": self.x, "kind": self.kind}


def predicted(estimator, data) -> dict[str, torch.Tensor]:
    """The estimator's own predictions for every example of `data`, stacked."""
    rows = list(estimator.predict(lambda params: data))
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def tower_estimator(model_dir, fn=tower_model_fn):
    return TPUEstimator(
        model_fn=fn, model_init_fn=lambda params: Tower(),
        optimizer_fn=lambda model, params: torch.optim.Adam(model.parameters(), lr=0.01),
        model_dir=str(model_dir),
        config=RunConfig(save_checkpoints_steps=3, tpu_config=TPUConfig(iterations_per_loop=3)),
        train_batch_size=8, predict_batch_size=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tower")
    estimator = tower_estimator(model_dir)
    estimator.train(lambda params: TowerData(48), max_steps=6)
    return estimator


def test_served_predictions_equal_predict_for_every_batch_size(trained, tmp_path):
    queries = TowerData(2 * max(BUCKETS) + 1, seed=7)
    expected = predicted(trained, queries)
    export_dir = trained.export_saved_model(tmp_path / "exports", queries.features(),
                                            batch_sizes=BUCKETS)
    torch.save(queries.features(), tmp_path / "inputs.pt")

    report = run_fresh(SERVE, export_dir, tmp_path / "inputs.pt", tmp_path / "outputs.pt")

    assert report == {"step": 6, "saw_model_code": False}
    served, stablehlo = torch.load(tmp_path / "outputs.pt")
    assert len(served) == len(queries) + 1
    for size, (classes, probabilities) in stablehlo.items():
        assert torch.equal(classes, expected["class"][:size])
        torch.testing.assert_close(probabilities, expected["probabilities"][:size],
                                   rtol=1e-5, atol=1e-6)
    for rows, outputs in enumerate(served):
        assert outputs["class"].dtype == torch.int64
        assert torch.equal(outputs["class"], expected["class"][:rows]), rows
        torch.testing.assert_close(outputs["probabilities"], expected["probabilities"][:rows],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="tensorflow is not installed: pip install '.[tf]' to test the "
                           "TF SavedModel export")
def test_tf_saved_model_serving_default_equals_predict(trained, tmp_path):
    queries = TowerData(9, seed=3)
    expected = predicted(trained, queries)
    export_dir = trained.export_saved_model(tmp_path / "exports", queries.features(),
                                            batch_sizes=BUCKETS, as_tf_saved_model=True)
    torch.save(queries.features(), tmp_path / "inputs.pt")

    report = run_fresh(SERVE_TF, export_dir, tmp_path / "inputs.pt", tmp_path / "outputs.pt")

    assert sorted(report["signatures"]) == ["class", "probabilities"]
    for rows, outputs in torch.load(tmp_path / "outputs.pt").items():
        assert torch.equal(outputs["class"], expected["class"][:rows]), rows
        torch.testing.assert_close(outputs["probabilities"], expected["probabilities"][:rows],
                                   rtol=1e-5, atol=1e-6)


def test_export_directory_layout_signature_and_assets(trained, tmp_path):
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("zero\none\ntwo\n")
    first = trained.latest_checkpoint().replace("-6.pt", "-3.pt")
    path = trained.export_saved_model(tmp_path / "exports", TowerData(2).features(),
                                      assets_extra={"tables/vocab.txt": str(vocabulary)},
                                      checkpoint_path=first, batch_sizes=[8, 2, 8])
    assert os.path.basename(path).isdigit() and os.path.dirname(path) == str(tmp_path / "exports")
    assert sorted(os.listdir(path)) == ["assets.extra", "signature.json", "stablehlo", "xla_hlo"]
    assert sorted(os.listdir(os.path.join(path, "xla_hlo"))) == ["batch_2.pb", "batch_8.pb"]
    assert (tmp_path / "exports" / os.path.basename(path) / "assets.extra" / "tables" /
            "vocab.txt").read_text() == "zero\none\ntwo\n"
    signature = json.loads(open(os.path.join(path, "signature.json")).read())
    assert signature["global_step"] == 3 and signature["checkpoint"] == first
    assert signature["batch_sizes"] == [2, 8]
    assert signature["functions"] == {"2": "batch_2", "8": "batch_8"}
    assert signature["inputs"] == [{"name": "x", "dtype": "float32", "shape": [8]},
                                   {"name": "kind", "dtype": "int64", "shape": []}]
    assert signature["outputs"] == [{"name": "class", "dtype": "int64", "shape": []},
                                    {"name": "probabilities", "dtype": "float32", "shape": [3]}]
    functions = sorted(os.listdir(os.path.join(path, "stablehlo", "functions")))
    assert [name for name in functions if name.endswith(".bytecode")] == \
        ["batch_2.bytecode", "batch_8.bytecode"]


def test_exports_never_overwrite_and_the_newest_is_served_even_if_the_clock_goes_back(
        trained, tmp_path, monkeypatch):
    import torch_tpu_estimator.export.saved_model as export

    features = TowerData(3).features()
    paths = []
    for now in (1000, 1000, 400):  # twice in one second, then a clock set back
        monkeypatch.setattr(export.time, "time", lambda now=now: float(now))
        paths.append(trained.export_saved_model(tmp_path / "exports", features, batch_sizes=(2,)))
    assert [os.path.basename(path) for path in paths] == ["1000", "1001", "1002"]
    assert sorted(os.listdir(tmp_path / "exports")) == ["1000", "1001", "1002"]
    assert load_exported(tmp_path / "exports").export_dir == paths[-1]
    assert oct(os.stat(paths[-1]).st_mode & 0o777) == oct(0o777 & ~_umask())


def test_entries_named_by_unicode_digits_are_not_taken_for_exports(trained, tmp_path,
                                                                    monkeypatch):
    """'²' and '٣' pass str.isdigit, which int() refuses or reads as 3: neither stops an
    export nor passes for one."""
    import torch_tpu_estimator.export.saved_model as export

    monkeypatch.setattr(export.time, "time", lambda: 1000.0)
    for name in ("²", "٣"):
        (tmp_path / "exports" / name).mkdir(parents=True)
    path = trained.export_saved_model(tmp_path / "exports", TowerData(3).features(),
                                      batch_sizes=(2,))
    assert os.path.basename(path) == "1000"
    assert load_exported(tmp_path / "exports").export_dir == path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_outputs_replace_predictions_and_a_tensor_round_trips(tmp_path):
    def fn(model, features, labels, mode, params):
        logits = model(features)
        if mode == ModeKeys.PREDICT:
            return TPUEstimatorSpec(mode, predictions={"logits": logits},
                                    export_outputs=logits.softmax(-1))
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))

    estimator = make_estimator(tmp_path / "model", fn=fn)
    data = make_data(40)
    estimator.train(lambda params: data, max_steps=3)
    features = data.tensors[0][:5]
    served = load_exported(estimator.export_saved_model(tmp_path / "exports", features,
                                                        batch_sizes=(2,)))(features.numpy())
    logits = torch.cat([p["logits"][None] for p in estimator.predict(
        lambda params: torch.utils.data.TensorDataset(features))])
    assert isinstance(served, torch.Tensor)
    torch.testing.assert_close(served, logits.softmax(-1), rtol=1e-5, atol=1e-6)


def _tree(directory) -> dict:
    return {os.path.relpath(os.path.join(root, name), directory): os.path.getmtime(
        os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names}


def test_export_without_a_checkpoint_is_an_error_that_creates_nothing(tmp_path):
    estimator = tower_estimator(tmp_path / "model")
    with pytest.raises(ValueError, match="Could not find a trained model in model_dir"):
        estimator.export_saved_model(tmp_path / "exports", TowerData(2).features())
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("features, message", [
    (lambda: {"x": torch.randn(2, 5), "kind": torch.zeros(2, dtype=torch.long)},
     r"model_fn fails in PREDICT mode on the example features \(x: float32\[batch, 5\], "
     r"kind: int64\[batch\]\): RuntimeError"),
    (lambda: {"x": torch.randn(2, 8)}, r"model_fn fails in PREDICT mode on the example features "
     r"\(x: float32\[batch, 8\]\): KeyError: 'kind'"),
    (lambda: {"x": torch.randn(2, 8), "kind": torch.zeros(3, dtype=torch.long)},
     r"example features have different batch sizes \(first axes\): \{'x': 2, 'kind': 3\}"),
    (lambda: {"x": torch.randn(2, 8), "kind": 1}, r"example features\['kind'\] must be a tensor"),
    (lambda: {"x": torch.randn(0, 8), "kind": torch.zeros(0, dtype=torch.long)},
     "example features have no rows"),
], ids=["wrong-width", "missing-feature", "ragged-rows", "not-a-tensor", "no-rows"])
def test_example_features_that_do_not_fit_model_fn_leave_no_directory(trained, tmp_path,
                                                                      features, message):
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "123").mkdir()
    (exports / "123" / "signature.json").write_text("{}")
    before = _tree(trained.model_dir), _tree(exports)
    with pytest.raises((ValueError, TypeError), match=message):
        trained.export_saved_model(exports, features)
    assert (_tree(trained.model_dir), _tree(exports)) == before
    assert sorted(os.listdir(exports)) == ["123"]


def _export_with(tmp_path, predictions, example=None, **kwargs):
    """Exports a helpers.Net estimator whose PREDICT outputs are predictions(logits)."""
    def fn(model, features, labels, mode, params):
        logits = model(features)
        if mode == ModeKeys.PREDICT:
            return TPUEstimatorSpec(mode, predictions=predictions(logits))
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))

    estimator = make_estimator(tmp_path / "model", fn=fn)
    estimator.train(lambda params: make_data(16), max_steps=1)
    example = torch.randn(3, 8) if example is None else example
    return estimator.export_saved_model(tmp_path / "exports", example, **kwargs)


@pytest.mark.parametrize("predictions, example, message", [
    (lambda logits: {"logits": logits, "total": logits.sum()}, torch.randn(3, 8),
     r"export output 'total' has shape \(\) for a batch of 3"),
    (lambda logits: {"mean": logits.mean(0, keepdim=True)}, torch.randn(1, 8),
     r"export output 'mean' traced at batch size 8 is float32\[1, 2\], not mean: "
     r"float32\[batch, 2\] with batch 8"),
], ids=["scalar", "batch-axis-reduced"])
def test_an_output_without_a_batch_axis_is_refused(tmp_path, predictions, example, message):
    with pytest.raises(ValueError, match=message):
        _export_with(tmp_path, predictions, example)
    assert not (tmp_path / "exports").exists()


def test_names_a_tf_saved_model_would_change_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'class id' cannot name a TF SavedModel input or "
                                         r"output"):
        _export_with(tmp_path, lambda logits: {"class id": logits.argmax(-1)},
                     as_tf_saved_model=True)
    assert not (tmp_path / "exports").exists()


def test_bfloat16_weights_export_as_float32_and_serve(trained, tmp_path):
    """torch_xla's exporter cannot store bfloat16: a bfloat16 model exports its weights as
    float32 (or the weights_dtype asked for), and serves what the float32 model predicts, to
    bfloat16's precision."""
    bfloat16 = TPUEstimator(model_fn=tower_model_fn,
                            model_init_fn=lambda params: Tower().to(torch.bfloat16),
                            model_dir=trained.model_dir)
    with pytest.raises(ValueError, match=r"weights_dtype must be torch.float32, float16 or "
                                         r"float64, got torch.bfloat16"):
        bfloat16.export_saved_model(tmp_path / "exports", TowerData(2).features(),
                                    weights_dtype=torch.bfloat16)
    features = TowerData(4, seed=7).features()
    served = load_exported(bfloat16.export_saved_model(tmp_path / "exports", features,
                                                       batch_sizes=(4,)))(features)
    expected = load_exported(trained.export_saved_model(tmp_path / "float32", features,
                                                        batch_sizes=(4,)))(features)
    assert served["probabilities"].dtype == torch.float32
    torch.testing.assert_close(served["probabilities"], expected["probabilities"], atol=0.05,
                               rtol=0.05)


def test_a_failed_write_leaves_no_partial_export(trained, tmp_path, monkeypatch):
    import torch_tpu_estimator.export.saved_model as export

    def disk_full(directory, assets_extra):
        open(os.path.join(directory, "half-written"), "w").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_copy_assets", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trained.export_saved_model(tmp_path / "exports", TowerData(2).features(), batch_sizes=(1,))
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"batch_sizes": ()}, TypeError, "batch_sizes must be a non-empty sequence of ints"),
    ({"batch_sizes": 4}, TypeError, "batch_sizes must be a non-empty sequence of ints"),
    ({"batch_sizes": (2, 0)}, ValueError, "each of batch_sizes must be a positive int, got 0"),
    ({"assets_extra": {"../up.txt": __file__}}, ValueError, "must be a relative file path"),
    ({"assets_extra": {".": __file__}}, ValueError, "must be a relative file path"),
    ({"assets_extra": {"a.txt": __file__, "./a.txt": __file__}}, ValueError,
     "assets_extra names 'a.txt' twice"),
    ({"assets_extra": {"a.txt": "/no/such/file"}}, ValueError, "'/no/such/file'.*is not a file"),
    ({"as_tf_saved_model": "yes"}, TypeError, "as_tf_saved_model and as_text must be bools"),
    ({"checkpoint_path": "/no/such/model.ckpt-1.pt"}, FileNotFoundError, "no checkpoint file"),
])
def test_bad_export_arguments_are_named_before_any_work(trained, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        trained.export_saved_model(tmp_path / "exports", TowerData(2).features(), **kwargs)
    assert not (tmp_path / "exports").exists()


def test_a_tf_saved_model_without_tensorflow_is_refused_before_any_work(trained, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"as_tf_saved_model=True needs TensorFlow: pip install "
                                          r"'torch_tpu_estimator\[tf\]'"):
        trained.export_saved_model(tmp_path / "exports", TowerData(2).features(),
                                   as_tf_saved_model=True)
    assert not (tmp_path / "exports").exists()


def test_served_features_are_checked_against_the_signature(trained, tmp_path):
    model = load_exported(trained.export_saved_model(tmp_path / "exports",
                                                     TowerData(2).features(), batch_sizes=(2,)))
    x, kind = torch.randn(3, 8), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"features 'x' must be x: float32\[batch, 8\], got "
                                         r"float64\[3, 8\]"):
        model({"x": x.double(), "kind": kind})
    with pytest.raises(ValueError, match=r"features 'kind' must be kind: int64\[batch\], got "
                                         r"int64\[3, 1\]"):
        model({"x": x, "kind": kind[:, None]})
    with pytest.raises(ValueError, match=r"takes a dict with keys \['kind', 'x'\] as features, "
                                         r"got one tensor"):
        model(x)
    assert model({"x": x, "kind": kind})["probabilities"].shape == (3, 3)


def test_served_programs_compile_once_per_batch_size(trained, tmp_path):
    import torch_xla.debug.metrics as met

    def compiles() -> int:
        return (met.metric_data("CompileTime") or (0,))[0]

    # sizes no other test traces: torch_xla's graph cache is per process, shared with them
    model = load_exported(trained.export_saved_model(tmp_path / "exports",
                                                     TowerData(2).features(), batch_sizes=(3, 5)))
    queries = TowerData(10, seed=5).features()
    before = compiles()
    for rows in (1, 3, 4, 5, 10, 1, 3, 7, 2):
        model({key: value[:rows] for key, value in queries.items()})
    assert compiles() - before == 2


def _inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch_tpu_estimator", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PJRT_DEVICE="CPU"))


def test_inspect_prints_a_checkpoints_and_an_exports_step_signature_and_variables(trained,
                                                                                 tmp_path):
    checkpoint = _inspect(trained.model_dir)
    assert checkpoint.returncode == 0, checkpoint.stderr
    assert f"checkpoint: {trained.latest_checkpoint()}" in checkpoint.stdout
    assert "global_step: 6" in checkpoint.stdout
    assert "embed.weight" in checkpoint.stdout and "[5, 4]" in checkpoint.stdout

    trained.export_saved_model(tmp_path / "exports", TowerData(2).features(), batch_sizes=(1, 4))
    export = _inspect(tmp_path / "exports")
    assert export.returncode == 0, export.stderr
    for line in ["(global_step 6)", "batch sizes: [1, 4]", "x: float32[batch, 8]",
                 "kind: int64[batch]", "probabilities: float32[batch, 3]", "class: int64[batch]"]:
        assert line in export.stdout
    assert re.search(r"model\.dense\.0\.weight +float32 +\[16, 12\]", export.stdout)
    assert "model.dense.1.running_mean" in export.stdout  # buffers are exported too

    missing = _inspect(tmp_path / "nothing-here")
    assert missing.returncode == 2 and "inspect:" in missing.stderr
