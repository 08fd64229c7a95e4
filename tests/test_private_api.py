"""The library internals that private_api.py wraps still behave as it expects. A failure here
means a Lightning or Hydra release changed them: update private_api.py, nothing else."""

import lightning as L
import torch

from cifar_lightning.private_api import count_optimizer_step, hydra_args_parser


def test_hydras_parser_reads_the_rerun_flag_its_abbreviation_and_the_overrides():
    args, _ = hydra_args_parser().parse_known_args(["--exp", "FILE", "a=1", "b=2"])
    assert args.experimental_rerun == "FILE"
    assert args.overrides == ["a=1", "b=2"]


class CountsOnly(L.LightningModule):
    """Manual optimization whose steps are all counted through count_optimizer_step, as a CUDA
    graph replay is: the optimizer never runs through LightningOptimizer.step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        count_optimizer_step(self.optimizers())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_counted_step_advances_lightnings_global_step(tmp_path):
    data = torch.utils.data.DataLoader(torch.zeros(5, 2), batch_size=1)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(CountsOnly(), data)
    assert trainer.global_step == 10
