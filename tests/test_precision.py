"""trainer.precision=auto (precision.py): what it resolves to on each kind of hardware, that a run
records and keeps it, and what bf16 autocast computes in on the CPU."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

import cifar_lightning.precision as precision
from cifar_lightning.private_api import cpu_has_native_bf16
from cifar_lightning.resume import precision_of
from cifar_lightning.train import train
from tests.conftest import cfg_for, make_classifier

FAST = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "trainer=cpu"]


@pytest.mark.parametrize(
    "native, accelerator, expected",
    [
        (True, "cpu", "bf16-mixed"),
        (False, "cpu", "32-true"),
        (True, "gpu", "32-true"),  # TF32 fp32 measured faster than bf16-mixed on an H200
        (False, "cuda", "32-true"),
    ],
)
def test_auto_follows_the_hardware(monkeypatch, native, accelerator, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    chosen, why = precision.resolve("auto", accelerator)
    assert chosen == expected and why


def test_auto_on_an_automatic_accelerator_asks_whether_cuda_is_there(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.resolve("auto", "auto")[0] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve("auto", "auto")[0] == "bf16-mixed"


def test_a_precision_that_is_not_auto_is_used_as_it_is(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve("32-true", "cpu") == ("32-true", "as configured")
    assert precision.resolve("bf16-mixed", "gpu") == ("bf16-mixed", "as configured")


def test_the_detector_reads_torchs_own_cpu_probes(monkeypatch):
    # oneDNN's check is not asked: it says yes on any AVX-512 CPU, where bf16 is emulated
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_has_native_bf16() is True


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_a_run_records_what_auto_chose_and_why(
    tiny_layout, tmp_path, monkeypatch, caplog, native, expected
):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    caplog.set_level("INFO", logger="cifar_lightning.build")
    cfg = cfg_for(
        tmp_path,
        tiny_layout,
        "trainer.precision=auto",
        "trainer.max_epochs=1",
        "test=false",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
        "trainer=cpu",
    )
    metrics = train(cfg)
    assert metrics["precision"] == expected
    assert json.loads((tmp_path / "metrics.json").read_text())["precision"] == expected
    assert f"trainer.precision=auto -> {expected}: " in caplog.text
    # the loggers' hparams: the precision as the run trained at, not the setting
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["precision"] == expected
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["precision"] == expected  # what evaluate and predict run at
    assert precision_of(saved) == expected  # what a resumed run reads


@pytest.mark.slow
def test_a_resumed_auto_run_keeps_the_precision_it_started_with(tiny_layout, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    first = cfg_for(
        tmp_path / "run",
        tiny_layout,
        "trainer.precision=auto",
        "trainer.max_epochs=1",
        "test=false",
        *FAST,
    )
    train(first)
    # the same run continued on a machine where auto would choose fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # a checkpoint as the previous release wrote it: every recipe key inside `model`, and the
    # precision only in a callback's state (RunSettings)
    ckpt = torch.load(last, weights_only=True)
    hp = ckpt["hyper_parameters"]
    old_model = {
        **hp["model"],
        **hp["loss"],
        "augment": None,
        "tta_flip": hp["tta"]["flip"],
        "tta_shift": hp["tta"]["shift"],
        "whiten": hp["whiten"]["enabled"],
        "whiten_images": hp["whiten"]["images"],
        **hp["speed"],
        "cuda_graph": False,
        "grad_clip": None,
    }
    for key in ("loss", "augment", "tta", "whiten", "speed", "precision"):
        del hp[key]
    hp["model"] = old_model
    ckpt["callbacks"]["RunSettings"] = {"precision": "bf16-mixed"}
    torch.save(ckpt, last)
    resumed = cfg_for(
        tmp_path / "other",
        tiny_layout,
        "trainer.precision=auto",
        "trainer.max_epochs=2",
        "test=false",
        f"resume={last}",
        *FAST,
    )
    assert train(resumed)["precision"] == "bf16-mixed"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 1 and saved["hyper_parameters"]["precision"] == "bf16-mixed"


def test_the_module_records_the_precision_the_trainer_runs_at(tmp_path, monkeypatch):
    from cifar_lightning.build import build_module, build_trainer, resolve_precision
    from tests.conftest import CLASSES

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    cfg = cfg_for(tmp_path, tmp_path, "trainer.precision=auto", "logger=none", "trainer=cpu")
    chosen = resolve_precision(cfg)
    assert chosen == "bf16-mixed"  # auto, resolved
    assert cfg.trainer.precision == "auto"  # resolved once, the config left as it was
    assert build_module(cfg, CLASSES, chosen).hparams.precision == "bf16-mixed"
    assert build_trainer(cfg, precision=chosen).precision == "bf16-mixed"
    # a precision given explicitly (the benchmark's (c) passes the one it gives the Trainer)
    assert build_module(cfg, CLASSES, "32-true").hparams.precision == "32-true"
    assert build_trainer(cfg, precision="32-true").precision == "32-true"


def test_cpu_autocast_computes_in_bf16_and_keeps_the_state_in_fp32(tmp_path):
    module = make_classifier(tmp_path, "speed.channels_last=true")
    outputs = {}

    def keep(name):
        return lambda mod, args, out: outputs.__setitem__(name, out)

    for name, layer in module.net.named_modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            layer.register_forward_hook(keep(name))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    module.train()
    module._trainer = SimpleNamespace(is_last_batch=False)  # training_step reads only this
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step((x, y), 0)
    loss.backward()
    logits = outputs["classifier.5"]  # the last Linear: the logits
    convs = {n: o for n, o in outputs.items() if o.dim() == 4}
    assert len(convs) == 6 and len(outputs) == 8
    assert all(o.dtype == torch.bfloat16 for o in outputs.values())
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in convs.values())
    assert loss.dtype == torch.float32
    assert F.cross_entropy(logits.float(), y).item() == pytest.approx(loss.item(), rel=1e-6)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(p.grad.dtype == torch.float32 for p in module.parameters() if p.grad is not None)
    stats = [b for n, b in module.net.named_buffers() if "running" in n]
    assert len(stats) == 12 and all(b.dtype == torch.float32 for b in stats)
