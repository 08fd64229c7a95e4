"""model.cuda_graph: each full training batch replays one captured step. On the CPU a stand-in
"graph" calls the captured function again, so these tests check everything around the capture
(warm-up, partial batches, re-capture when the learning rate changes, step counting, epoch sums)
against eager training, bit for bit; the GPU test checks a real CUDA graph against eager steps."""

import csv

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import cifar_lightning.build as build
import cifar_lightning.train as train_module
from cifar_lightning.model.graphed import CudaGraphSteps, GraphedStep, graph_blocker
from cifar_lightning.model.module import Classifier
from tests.conftest import CLASSES, cfg_for


class ReplayedCall:
    """A CUDA graph's stand-in: replay() runs the captured call again. It checks what a real graph
    can't see change: the learning rates, which a capture bakes in."""

    optimizer = None  # set by the test

    def capture(self, fn):
        self.fn, self.lrs = fn, [g["lr"] for g in self.optimizer.param_groups]

    def replay(self):
        assert [g["lr"] for g in self.optimizer.param_groups] == self.lrs, (
            "a replay with a stale learning rate"
        )
        self.fn()


class CpuGraphSteps(CudaGraphSteps):
    """model.cuda_graph's callback with the stand-in graph, on the CPU."""

    graph_type = ReplayedCall
    made: list = []

    def blocker(self, trainer, pl_module):
        return graph_blocker(trainer, pl_module)  # every rule but the device's

    def on_train_start(self, trainer, pl_module):
        ReplayedCall.optimizer = pl_module.optimizers().optimizer
        super().on_train_start(trainer, pl_module)
        CpuGraphSteps.made.append(pl_module.graphed)


class CpuGraphed(Classifier):
    """Records the size of every batch that ran eagerly."""

    eager_sizes: list = []

    def eager_step(self, x, y):
        CpuGraphed.eager_sizes.append(len(y))
        super().eager_step(x, y)


def use_stand_in_graph(monkeypatch, module_class=CpuGraphed):
    monkeypatch.setattr(build, "CudaGraphSteps", CpuGraphSteps)
    monkeypatch.setattr(build, "Classifier", module_class)
    CpuGraphSteps.made = []
    CpuGraphed.eager_sizes = []


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_replayed_steps_train_exactly_as_eager_steps(tiny_layout, tmp_path, monkeypatch):
    # 20 images per train dir at batch 8: 8, 8, 4 per dir, so partial batches run eagerly between
    # replays. min_delta=100: no epoch after the first improves, so the plateau (patience 1) cuts
    # the rate after epoch 2, and the step is captured again in epoch 3.
    overrides = [
        "trainer.max_epochs=3",
        "data.batch_size=8",
        "seed=3",
        "logger=none",
        "scheduler.patience=1",
        "scheduler.min_delta=100",
        "model.augment={flip: true, translate: 0.1}",
        "model.l2=0.001",
    ]
    eager = train_module.train(cfg_for(tmp_path / "eager", tiny_layout, *overrides))
    use_stand_in_graph(monkeypatch)
    graphed = train_module.train(
        cfg_for(tmp_path / "graphed", tiny_layout, *overrides, "model.cuda_graph=true")
    )
    (steps,) = CpuGraphSteps.made
    # warm-up; epoch 1 and after the cut before epoch 3
    assert (steps.eager_steps, steps.captures) == (3, 2)
    # 36 steps: the warm-up's 3, then full batches replay and partial ones (4 images) run eagerly
    assert steps.replays + len(CpuGraphed.eager_sizes) == 3 * 12
    assert CpuGraphed.eager_sizes[3:] == [4] * (12 - CpuGraphed.eager_sizes[:3].count(4))
    rows_e, rows_g = (
        _history(tmp_path / "eager/history.csv"),
        _history(tmp_path / "graphed/history.csv"),
    )
    # epoch 3 trains at the cut rate
    assert [r["lr"] for r in rows_g] == ["0.001", "0.001", "0.0001"]
    for e, g in zip(rows_e, rows_g, strict=True):
        assert {k: e[k] for k in e if k != "epoch_seconds"} == {
            k: g[k] for k in g if k != "epoch_seconds"
        }
    assert {k: graphed[k] for k in ("test_accuracy", "best_val_loss")} == {
        k: eager[k] for k in ("test_accuracy", "best_val_loss")
    }
    e, g = (
        torch.load(tmp_path / run / "checkpoints/last.ckpt", weights_only=True)
        for run in ("eager", "graphed")
    )
    assert e["global_step"] == g["global_step"] == 3 * 12  # replays are counted as optimizer steps
    for k, v in e["state_dict"].items():
        assert torch.equal(v, g["state_dict"][k]), k


def test_graphed_step_warms_up_captures_full_batches_and_recaptures_on_a_new_rate():
    calls, counted = [], []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ReplayedCall.optimizer = opt
    steps = GraphedStep(
        step=lambda x, y, backward, optimizer: calls.append(("step", x.tolist())),
        eager=lambda x, y: calls.append(("eager", x.tolist())),
        optimizer=opt,
        batch_size=2,
        warmup=1,
        graph_type=ReplayedCall,
        count=lambda: counted.append(len(calls)),
    )
    batch = lambda *v: (torch.tensor(v), torch.zeros(len(v)))  # noqa: E731
    for values in [(1, 2), (3, 4), (5,), (6, 7)]:
        steps(*batch(*values))
    # each replay is counted once, after it ran; eager steps are Lightning's to count
    assert counted == [2, 4] and steps.replays == 2
    opt.param_groups[0]["lr"] = 0.01
    steps(*batch(8, 9))
    assert counted == [2, 4, 5]
    # the replays see each batch copied into the captured inputs
    assert calls == [
        ("eager", [1, 2]),
        ("step", [3, 4]),
        ("eager", [5]),
        ("step", [6, 7]),
        ("step", [8, 9]),
    ]
    assert (steps.eager_steps, steps.captures, steps.replays) == (1, 2, 3)


def _adam_after_one_step(device):
    p = torch.nn.Parameter(torch.ones(2, device=device))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(2, device=device)
    opt.step()  # its step counter on the CPU, as a checkpoint from a run without graphs holds it
    return opt


def test_checkpoints_keep_the_capturable_flag_adam_had_before_the_graph(tiny_layout, tmp_path):
    opt = _adam_after_one_step("cpu")
    steps = GraphedStep(step=None, eager=None, optimizer=opt, batch_size=2)
    # CPU Adam can't capture
    assert steps.capturable_was == [False] and opt.param_groups[0]["capturable"] is False
    module = Classifier(
        model=OmegaConf.to_container(cfg_for(tmp_path, tiny_layout).model, resolve=True),
        optim={"_target_": "torch.optim.Adam", "_partial_": True},
        scheduler=None,
        class_names=CLASSES,
    )
    module.graphed = steps
    checkpoint = {"optimizer_states": [{"param_groups": [{"lr": 1e-3, "capturable": True}]}]}
    CudaGraphSteps().on_save_checkpoint(None, module, checkpoint)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["capturable"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adam_on_the_gpu_is_made_capturable_with_its_step_counter_on_the_device():
    opt = _adam_after_one_step("cuda")
    GraphedStep(step=None, eager=None, optimizer=opt, batch_size=2)
    assert opt.param_groups[0]["capturable"] is True
    assert all(s["step"].is_cuda for s in opt.state.values())


def test_cuda_graph_on_the_cpu_trains_eagerly_and_says_why(tiny_layout, tmp_path, caplog):
    caplog.set_level("INFO", logger="cifar_lightning.model.graphed")
    train_module.train(
        cfg_for(
            tmp_path,
            tiny_layout,
            "trainer.max_epochs=1",
            "logger=none",
            "test=false",
            "model.cuda_graph=true",
        )
    )
    assert "model.cuda_graph: eager steps, the device is cpu" in caplog.text


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA (run on a GPU: pytest tests/test_cuda_graph.py)",
)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_real_cuda_graph_trains_like_eager_steps_on_the_gpu(tiny_layout, tmp_path, precision):
    # Dropout off and deterministic cuDNN: graph and eager runs then differ only by float rounding.
    torch.backends.cudnn.deterministic = True
    try:
        overrides = [
            "trainer=gpu",
            f"trainer.precision={precision}",
            "trainer.max_epochs=3",
            "data.batch_size=8",
            "logger=none",
            "model.dropout=0",
            "scheduler.patience=1",
            "scheduler.min_delta=100",
        ]
        runs = {
            g: train_module.train(
                cfg_for(tmp_path / str(g), tiny_layout, *overrides, f"model.cuda_graph={g}")
            )
            for g in (False, True)
        }
    finally:
        torch.backends.cudnn.deterministic = False
    hist = {g: _history(tmp_path / str(g) / "history.csv") for g in runs}
    assert (
        [r["lr"] for r in hist[True]]
        == [r["lr"] for r in hist[False]]
        == ["0.001", "0.001", "0.0001"]
    )
    tol = 1e-3 if precision == "32-true" else 3e-2
    for e, g in zip(hist[False], hist[True], strict=True):
        assert float(g["train_loss"]) == pytest.approx(float(e["train_loss"]), rel=tol)
        assert float(g["val_loss"]) == pytest.approx(float(e["val_loss"]), rel=tol)
    ckpt = {
        g: torch.load(tmp_path / str(g) / "checkpoints/last.ckpt", weights_only=True) for g in runs
    }
    assert ckpt[True]["global_step"] == ckpt[False]["global_step"] == 3 * 12


def test_bench_reports_how_a_graphed_timed_epoch_ran(tiny_layout, tmp_path, monkeypatch, capsys):
    import cifar_lightning.bench as bench_module
    from cifar_lightning.config import compose

    use_stand_in_graph(monkeypatch)
    cfg = compose(
        [
            f"run_dir={tmp_path}",
            f"data.root={tiny_layout}",
            "trainer=cpu",
            "pipelines=[c]",
            "precision=[32-true]",
            "cuda_graph_c=[true]",
            "batch_sizes=[]",
            "fractions=[]",
            "warmup_steps=1",
            "data.batch_size=4",
            "callbacks.progress_bar.refresh_rate=0",
        ],
        config_name="bench",
    )
    (row,) = bench_module.bench(cfg)["results"]
    # 4 train dirs of 20 images at batch 4: 20 full batches; the timed fit warms up (3 eager steps)
    # and captures again, as every fresh fit does
    assert row["variant"] == "32-true+graph" and row["train_steps"] == 20
    assert row["graph"] == {"warmup_steps": 3, "captures": 1, "replays": 17}
    assert "3 eager warm-up steps, 1 capture(s), 17 of 20 steps replayed" in capsys.readouterr().out


class GradientHook(L.Callback):
    calls = 0

    def on_after_backward(self, trainer, module):
        GradientHook.calls += 1


class OptimizerStepHook(CpuGraphed):
    def on_before_optimizer_step(self, optimizer):
        GradientHook.calls += 1


class OwnBackward(CpuGraphed):
    def backward(self, loss, *args, **kwargs):
        GradientHook.calls += 1
        loss.backward()


def _count(*args):
    GradientHook.calls += 1


# (the module's class, an extra callback, the hook that a log line must name)
HOOKED = {
    "callback class": (CpuGraphed, GradientHook, "GradientHook.on_after_backward"),
    "lambda callback": (
        CpuGraphed,
        lambda: L.pytorch.callbacks.LambdaCallback(on_before_backward=_count),
        "LambdaCallback.on_before_backward",
    ),
    "module hook": (OptimizerStepHook, None, "OptimizerStepHook.on_before_optimizer_step"),
    "module backward": (OwnBackward, None, "OwnBackward.backward"),
}


@pytest.mark.parametrize("case", HOOKED)
def test_a_hook_that_replays_would_skip_keeps_steps_eager(
    case, tiny_layout, tmp_path, caplog, monkeypatch
):
    # The hook must run on every one of the 4 dirs x 3 batches of 8, which replays would skip
    module_class, callback, name = HOOKED[case]
    caplog.set_level("INFO", logger="cifar_lightning.model.graphed")
    use_stand_in_graph(monkeypatch, module_class)
    extra = [callback()] if callback else []
    monkeypatch.setattr(
        train_module,
        "build_trainer",
        lambda cfg, *callbacks, **kw: build.build_trainer(cfg, *callbacks, *extra, **kw),
    )
    monkeypatch.setattr(GradientHook, "calls", 0)
    train_module.train(
        cfg_for(
            tmp_path,
            tiny_layout,
            "trainer.max_epochs=1",
            "logger=none",
            "test=false",
            "data.batch_size=8",
            "model.cuda_graph=true",
        )
    )
    assert f"model.cuda_graph: eager steps, {name} would not run on replayed steps" in caplog.text
    assert CpuGraphSteps.made == [None] and GradientHook.calls == 12
