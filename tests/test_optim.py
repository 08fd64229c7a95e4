import copy

import pytest
import torch

from cifar_lightning.model.optim import RMSprop


def _steps(opt_cls, grads, **kw):
    w = torch.nn.Parameter(torch.ones(3))
    opt = opt_cls([w], **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


def test_keras_rmsprop_matches_formula_for_one_and_two_steps():
    lr, rho, eps = 1e-3, 0.9, 1e-7
    g1, g2 = torch.tensor([1e-4, 0.5, -2.0]), torch.tensor([3e-4, -0.1, 1.0])
    v1 = (1 - rho) * g1**2
    w1 = 1 - lr * g1 / torch.sqrt(v1 + eps)
    v2 = rho * v1 + (1 - rho) * g2**2
    w2 = w1 - lr * g2 / torch.sqrt(v2 + eps)
    assert torch.allclose(_steps(RMSprop, [g1], lr=lr, rho=rho, eps=eps), w1, rtol=0, atol=1e-7)
    assert torch.allclose(_steps(RMSprop, [g1, g2], lr=lr, rho=rho, eps=eps), w2, rtol=0, atol=1e-7)


def test_torch_rmsprop_differs_from_keras_for_small_gradients():
    g = [torch.tensor([1e-4, 1e-4, 1e-4])]
    keras = _steps(RMSprop, g, lr=1e-3, rho=0.9, eps=1e-7)
    torch_ = _steps(torch.optim.RMSprop, g, lr=1e-3, alpha=0.9, eps=1e-7)
    # Keras's step is about 10x smaller for a gradient of 1e-4 on the first step
    assert (1 - torch_[0]) / (1 - keras[0]) == pytest.approx(10.5, rel=0.05)


def test_eps_outside_root_equals_torch_rmsprop():
    gs = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    ours = _steps(RMSprop, gs, lr=1e-2, rho=0.99, eps=1e-8, eps_inside_root=False)
    ref = _steps(torch.optim.RMSprop, gs, lr=1e-2, alpha=0.99, eps=1e-8)
    assert torch.allclose(ours, ref, atol=1e-7)


def test_state_round_trips_through_state_dict():
    w = torch.nn.Parameter(torch.ones(2))
    opt = RMSprop([w])
    w.grad = torch.ones(2)
    opt.step()
    opt2 = RMSprop([w])
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[w]["square_avg"], opt.state[w]["square_avg"])


def test_state_saved_with_a_step_counter_resumes_the_same():
    """Checkpoints written before the per-parameter step counter was dropped still load and continue
    exactly; the counter is carried along, unread."""
    g1, g2 = torch.tensor([0.3, -1.0]), torch.tensor([0.2, 0.5])
    w = torch.nn.Parameter(torch.ones(2))
    opt = RMSprop([w])
    w.grad = g1.clone()
    opt.step()
    old = copy.deepcopy(opt.state_dict())  # as from a checkpoint file: no tensor shared with `opt`
    old["state"][0]["step"] = torch.tensor(1.0)  # what the earlier version kept beside square_avg
    w2 = torch.nn.Parameter(w.detach().clone())
    resumed = RMSprop([w2])
    resumed.load_state_dict(old)
    for p, o in ((w, opt), (w2, resumed)):
        p.grad = g2.clone()
        o.step()
    assert torch.equal(w2, w) and "step" not in opt.state[w]
