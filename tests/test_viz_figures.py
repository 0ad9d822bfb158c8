"""Figure helpers: patch selections outlined on the images, hyper-parameter sweeps."""
import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from zsad_core.viz import patch_selection_grid, sweep_figure  # noqa: E402


def test_patch_selection_grid_outlines_each_selected_patch():
    images = torch.zeros(2, 3, 32, 32)
    selections = {"first": torch.tensor([[0, 1, 2], [0, 1, 2]]), "top": torch.tensor([[15, 14, 5], [3, 7, 11]])}
    fig = patch_selection_grid(images, selections, grid=4, heat=torch.rand(2, 32, 32), row_titles=["a", "b"])
    axes = fig.axes
    assert len(axes) == 4
    boxes = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in axes]
    assert [len(b) for b in boxes] == [3, 3, 3, 3]
    # patch 15 of a 4 x 4 grid on 32 px: the bottom-right 8 x 8 cell
    assert boxes[1][0].get_xy() == (24.0, 24.0) and boxes[1][0].get_width() == 8.0
    assert boxes[0][1].get_xy() == (8.0, 0.0)
    assert axes[0].get_title() == "first" and axes[0].get_ylabel() == "a"


def test_sweep_figure_one_panel_per_sweep_one_line_per_metric():
    sweeps = {"K": pd.DataFrame({"I-AUROC": [50.0, 60.0, 70.0], "P-AUROC": [1.0, 2.0, 3.0]}, index=[1, 5, 10]),
              "M": pd.DataFrame({"I-AUROC": [40.0, 45.0]}, index=[5, 10])}
    fig = sweep_figure(sweeps)
    assert len(fig.axes) == 2
    assert [len(ax.lines) for ax in fig.axes] == [2, 1]
    assert list(fig.axes[0].lines[0].get_xdata()) == [1, 5, 10]
    assert fig.axes[1].get_xlabel() == "M"
