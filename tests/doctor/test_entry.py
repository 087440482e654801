import sys
import textwrap

from gradguard.doctor.entry import load_run


def test_load_run_keeps_the_scripts_folder_importable_while_make_run_runs(tmp_path):
    (tmp_path / "siblingmodels.py").write_text(textwrap.dedent("""
        from torch import nn

        def make_mlp():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    """))
    script = tmp_path / "train_lazy.py"
    script.write_text(textwrap.dedent("""
        import torch

        def make_run():
            from siblingmodels import make_mlp  # imported where it is used
            m = make_mlp()
            x = torch.randn(16, 4)
            return m, (x, x.sum(1, keepdim=True)), torch.nn.functional.mse_loss, \\
                torch.optim.SGD(m.parameters(), lr=0.1)
    """))
    before = list(sys.path)
    try:
        run = load_run(str(script))
        assert run.model[0].in_features == 4
        assert sys.path == before  # (the folder is taken off again)
    finally:
        sys.modules.pop("siblingmodels", None)


def test_load_run_registers_the_module_for_dataclasses(tmp_path):
    script = tmp_path / "train_dc.py"
    script.write_text(textwrap.dedent("""
        from __future__ import annotations

        from dataclasses import dataclass

        import torch

        @dataclass
        class Config:
            width: int = 8
            lr: float = 0.1

        def make_run():
            cfg = Config()
            m = torch.nn.Linear(4, cfg.width)
            x = torch.randn(16, 4)
            return m, (x, torch.randn(16, cfg.width)), torch.nn.functional.mse_loss, \\
                torch.optim.SGD(m.parameters(), lr=cfg.lr)
    """))
    run = load_run(f"{script}:make_run")
    assert run.model.out_features == 8 and run.optimizer.param_groups[0]["lr"] == 0.1
