"""Heatmaps of gate usage per layer: bank reuse per module type, and ranks needed for 99% of the gate mass."""

from __future__ import annotations

from pathlib import Path

from moram_cli.errors import MoramError


def check_plot_target(path: Path) -> None:
    """Fail before any work when the optional plotting dependency or the plot's directory is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoramError("--plot needs matplotlib, which is not installed; install it with: pip install 'moram[plot]'") from None
    if not path.parent.is_dir():
        raise MoramError(f"{path.parent}: directory for --plot does not exist; create it first")


def layer_and_kind(module: str) -> tuple[str, str]:
    """("3", "q_proj") for "model.layers.3.self_attn.q_proj": the first numeric part is the layer, the last part the kind."""
    parts = module.split(".")
    return next((p for p in parts if p.isdigit()), "-"), parts[-1]


def plot_usage(modules: dict[str, dict], banks: list[str], path: Path) -> None:
    """Write the heatmaps of a `gates.modules` report to `path` (format from its suffix, e.g. .png)."""
    from matplotlib.figure import Figure

    cells = {layer_and_kind(name): usage for name, usage in modules.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    kinds = sorted({kind for _, kind in cells})
    figure = Figure(figsize=(4.5 * (len(kinds) + 1), 2.5 + 0.22 * len(layers)), layout="constrained")
    axes = figure.subplots(1, len(kinds) + 1, squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        grid = [[cells[(layer, kind)]["bank_share"][bank] if (layer, kind) in cells else float("nan") for bank in banks] for layer in layers]
        _heatmap(figure, ax, grid, f"{kind}: share of gate mass per bank", ("bank", banks), ("layer", layers), "share")
    grid = [[cells[(layer, kind)]["ranks_for_99_mass"] if (layer, kind) in cells else float("nan") for kind in kinds] for layer in layers]
    _heatmap(figure, axes[-1], grid, "ranks for 99% of the gate mass", ("module", kinds), ("layer", layers), "ranks (mean over tokens)")
    try:
        figure.savefig(path)
    except (OSError, ValueError) as exc:
        raise MoramError(f"{path}: cannot write the plot ({exc}); give a writable --plot path ending in .png, .pdf or .svg") from None


def _heatmap(figure, ax, grid: list[list[float]], title: str, x: tuple[str, list[str]], y: tuple[str, list[str]], scale: str) -> None:
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x[0])
    ax.set_ylabel(y[0])
    ax.set_xticks(range(len(x[1])), x[1], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(y[1])), y[1], fontsize=7)
    figure.colorbar(image, ax=ax, label=scale)
