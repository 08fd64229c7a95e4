"""export.py and predict backend=onnxruntime: an export computes what the checkpoint's network
computes (test-time views included) at any batch size, carries its class names and input
contract, and its option errors are one line."""

import csv
import json
import logging
import sys

import pytest
import torch

from cifar_lightning.errors import UserError
from cifar_lightning.export import export
from cifar_lightning.exported import METADATA_FILE
from cifar_lightning.model import net as model_net
from cifar_lightning.model.checkpoint import load_net
from cifar_lightning.predict import predict, probabilities
from cifar_lightning.schema import compose
from tests.conftest import CLASSES, make_classifier, run_cli, save_ckpt, write_images

FORMATS = ["onnx", "torch_export"]
RECIPES = {"plain": [], "tta": ["tta.flip=true", "tta.shift=1"]}  # tta: 6 views
_exports: dict = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, overrides in RECIPES.items():
        module = make_classifier(d, *overrides)
        with torch.no_grad():  # spread the probabilities, so that a difference would show
            module.net.classifier[-1].weight.mul_(20)
        paths[name] = save_ckpt(module, d / f"{name}.ckpt")
    return paths


def exported(fmt, recipe, checkpoints, tmp_path_factory):
    """(export's record, run directory), one export per format and recipe for the module."""
    if (fmt, recipe) not in _exports:
        run = tmp_path_factory.mktemp(f"{fmt}_{recipe}") / "run"
        cfg = compose(
            [f"ckpt_path={checkpoints[recipe]}", f"format={fmt}", f"run_dir={run}"],
            config_name="export",
        )
        _exports[fmt, recipe] = export(cfg), run
    return _exports[fmt, recipe]


def run_export(fmt, path):
    """The exported file as a function of uint8 images, loaded as a user would."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(["probabilities"], {"images": x.numpy()})[0])
    module = torch.export.load(str(path)).module()
    return lambda x: module(x)


def read_metadata(fmt, path) -> dict:
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    extra = {METADATA_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[METADATA_FILE])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_the_checkpoints_network_at_any_batch_size(
    fmt, recipe, checkpoints, tmp_path_factory
):
    record, run = exported(fmt, recipe, checkpoints, tmp_path_factory)
    path = run / ("model.onnx" if fmt == "onnx" else "model.pt2")
    assert record["file"] == str(path) and path.is_file()
    assert set(record["parity"]["max_abs_diff"]) == {"1", "7"}
    assert max(record["parity"]["max_abs_diff"].values()) <= 1e-5
    net, _, _ = load_net(checkpoints[recipe])
    assert isinstance(net, model_net.TestTimeAugment) == (recipe == "tta")
    model = run_export(fmt, path)
    g = torch.Generator().manual_seed(5)
    for n in (1, 7, 3):  # 3: a batch size neither the trace nor the parity check used
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            want = net(x).softmax(-1)
            got = model(x)
        assert got.shape == (n, len(CLASSES)) and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-5
        assert torch.allclose(got.sum(-1), torch.ones(n), atol=1e-5)  # probabilities
        if recipe == "tta":  # the views are inside: the plain network alone predicts otherwise
            with torch.no_grad():
                plain = net.net(x).softmax(-1)
            assert (got - plain).abs().max().item() > 1e-3


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_carries_class_names_and_the_input_contract(
    fmt, recipe, checkpoints, tmp_path_factory
):
    record, run = exported(fmt, recipe, checkpoints, tmp_path_factory)
    meta = read_metadata(fmt, record["file"])
    keys = ("class_names", "image_size", "tta_views")
    # ONNX metadata values are strings: JSON, except the texts
    decoded = {k: json.loads(meta[k]) if fmt == "onnx" else meta[k] for k in keys}
    views = 6 if recipe == "tta" else 1
    assert decoded == {"class_names": CLASSES, "image_size": 32, "tta_views": views}
    assert meta["resize"] == "tf_bilinear"
    assert meta["input"].startswith("images: uint8 N x 3 x 32 x 32") and "1/255" in meta["input"]
    assert meta["output"].startswith("probabilities: float32 N x 10, softmax probabilities")
    saved = json.loads((run / "export.json").read_text())
    assert saved["format"] == fmt and saved["file"] == record["file"]
    assert saved["class_names"] == CLASSES and saved["tta_views"] == views
    assert saved["parity"]["tolerance"] == 1e-5
    if fmt == "onnx":
        import onnx

        graph = onnx.load(record["file"]).graph
        (inp,), (out,) = graph.input, graph.output
        assert (inp.name, out.name) == ("images", "probabilities")
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]


@pytest.mark.parametrize("recipe", RECIPES)
def test_predict_onnxruntime_prints_class_names_and_matches_the_torch_backend(
    recipe, checkpoints, tmp_path_factory, tmp_path, caplog
):
    record, _ = exported("onnx", recipe, checkpoints, tmp_path_factory)
    for c in (2, 7):
        write_images(tmp_path / "pics" / str(c), 3, c, size=40)  # resized to 32 as in training
    given = [f"inputs={tmp_path / 'pics'}", "device=cpu", "top_k=2"]
    torch_cfg = compose(
        [f"ckpt_path={checkpoints[recipe]}", f"run_dir={tmp_path / 'torch'}", *given],
        config_name="predict",
    )
    onnx_cfg = compose(
        [
            "backend=onnxruntime",
            f"onnx_path={record['file']}",
            f"run_dir={tmp_path / 'onnx'}",
            *given,
        ],
        config_name="predict",
    )
    paths_t, probs_t, names_t = probabilities(torch_cfg)
    paths_o, probs_o, names_o = probabilities(onnx_cfg)
    assert (paths_o, names_o) == (paths_t, names_t) and len(paths_o) == 6
    assert (probs_o - probs_t).abs().max().item() <= 1e-5
    with caplog.at_level(logging.INFO, logger="cifar_lightning.predict"):
        rows = predict(onnx_cfg)
    printed = caplog.text
    assert rows[0]["prediction"] in CLASSES
    for r in rows:  # the table shows the class names without their NNN_ index, as for torch
        assert f"{r['top1'][4:]} {float(r['p1']):.2f}" in printed
    assert "6 images; predictions.csv in" in printed
    with open(tmp_path / "onnx" / "predictions.csv") as f:
        onnx_rows = list(csv.DictReader(f))
    assert [r["top1"] for r in onnx_rows] == [names_t[i] for i in probs_t.argmax(-1).tolist()]


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["format=bad", "ckpt_path=x.ckpt"],
            "error: format=bad: is not one of: onnx, torch_export",
        ),
        (["ckpt_path=nope.ckpt"], "error: ckpt_path=nope.ckpt: no such file"),
    ],
)
def test_export_cli_reports_a_bad_option_as_one_error_line(args, line, tmp_path):
    res = run_cli(
        "cifar_lightning.export", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "run" / "model.onnx").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["format=torch_export", "out=m.onnx"], "out=m.onnx: must be a file path ending in .pt2"),
        (["out=model"], "out=model: must be a file path ending in .onnx (format=onnx)"),
        (["opset=17"], "opset=17: must be >= 18"),
        (["opset=999"], "opset=999: must be a whole number in [18, "),
    ],
)
def test_export_checks_its_options_before_the_checkpoint(overrides, message, tmp_path):
    cfg = compose(
        [f"ckpt_path={tmp_path / 'none.ckpt'}", f"run_dir={tmp_path / 'run'}", *overrides],
        config_name="export",
    )
    with pytest.raises(UserError) as err:
        export(cfg)
    assert str(err.value).startswith(message)
    assert not (tmp_path / "run").exists()


def test_an_export_that_fails_parity_is_an_error_and_leaves_no_file(
    checkpoints, tmp_path, monkeypatch
):
    import cifar_lightning.export as export_module

    monkeypatch.setattr(export_module, "parity", lambda *a: {1: float("nan"), 7: 0.0})
    out = tmp_path / "serve" / "model.pt2"
    cfg = compose(
        [
            f"ckpt_path={checkpoints['plain']}",
            "format=torch_export",
            f"out={out}",
            f"run_dir={tmp_path / 'run'}",
        ],
        config_name="export",
    )
    with pytest.raises(UserError, match=r"^format=torch_export: the export differs .* by nan"):
        export(cfg)
    assert list(out.parent.iterdir()) == [] and not (tmp_path / "run" / "export.json").exists()


def test_a_missing_onnx_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript: ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    extra = 'needs the onnx extra: pip install "cifar_lightning[onnx]"'
    cfg = compose(
        [f"ckpt_path={tmp_path / 'x.ckpt'}", f"run_dir={tmp_path / 'run'}"], config_name="export"
    )
    with pytest.raises(UserError, match=f"^format=onnx {extra}$".replace("[", r"\[")):
        export(cfg)
    (tmp_path / "m.onnx").write_bytes(b"")
    cfg = compose(
        [
            "backend=onnxruntime",
            f"onnx_path={tmp_path / 'm.onnx'}",
            f"inputs={tmp_path}",
            f"run_dir={tmp_path / 'run'}",
        ],
        config_name="predict",
    )
    with pytest.raises(UserError, match=f"^backend=onnxruntime {extra}$".replace("[", r"\[")):
        predict(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend=tf"], "backend=tf: is not one of: torch, onnxruntime"),
        (["backend=onnxruntime"], "backend=onnxruntime needs onnx_path=PATH/model.onnx"),
        (["ckpt_path=a.ckpt", "onnx_path=m.onnx"], "onnx_path=m.onnx: not read by backend=torch"),
        ([], "backend=torch needs ckpt_path=PATH/best.ckpt"),
        (["backend=onnxruntime", "onnx_path=none.onnx"], "onnx_path=none.onnx: no such file"),
        (["backend=onnxruntime", "onnx_path=PLAIN"], "onnx_path=PLAIN: not a cifar-export model"),
    ],
)
def test_predict_backend_errors_name_the_key(overrides, message, tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    monkeypatch.chdir(tmp_path)
    # an ONNX model without cifar-export's metadata
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), "plain.onnx")
    overrides = [o.replace("PLAIN", "plain.onnx") for o in overrides]
    cfg = compose(["inputs=none", "run_dir=run", *overrides], config_name="predict")
    with pytest.raises(UserError) as err:
        predict(cfg)
    assert str(err.value).startswith(message.replace("PLAIN", "plain.onnx"))
    assert not (tmp_path / "run").exists()
