"""A W&B workspace view of everything the package logs, built with ``wandb-workspaces`` (optional extra).

Sections for the penalties, the per-sample gradient norms, the MLP inequality, the Lipschitz bounds and sharpness;
every panel is bound to keys the callbacks and monitors log (``tests/test_dashboard.py`` checks them against an
offline run). Building the view needs no server; saving it needs a W&B account:

    pip install "lightning-gp[dashboard]"
    python -c "from lightning_gp.dashboard import workspace; print(workspace('my-team', 'my-project').save().url)"
"""

from __future__ import annotations

from typing import Any

from lightning_gp._lightning.log_writer import STEP_KEY, prefixed


def workspace(entity: str, project: str, *, prefix: str = "", name: str = "lightning-gp") -> Any:
    """A ``wandb_workspaces.workspaces.Workspace`` with one section per kind of value the package logs.

    Args:
        entity: the W&B team or user the project lives in.
        project: the W&B project.
        prefix: the ``WandbLogger(prefix=...)`` of the runs ("" for none).
        name: the view's name in the W&B UI.

    Raises:
        ImportError: ``wandb-workspaces`` is not installed (``pip install "lightning-gp[dashboard]"``).

    Example:

        >>> view = workspace("my-team", "my-project")  # doctest: +SKIP
        >>> view.save()  # needs a W&B account  # doctest: +SKIP
    """
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError('The dashboard needs wandb-workspaces: pip install "lightning-gp[dashboard]".') from err

    def k(key: str) -> str:  # as a WandbLogger(prefix=...) writes it
        return prefixed(key, prefix)

    def line(title: str, *keys: str, regex: str | None = None, log_y: bool = False) -> Any:
        if regex is not None:
            return wr.LinePlot(title=title, x=STEP_KEY, metric_regex=k(regex), log_y=log_y)
        return wr.LinePlot(title=title, x=STEP_KEY, y=[k(key) for key in keys], log_y=log_y)

    def chart(title: str, table: str, spec: str, fields: dict[str, str]) -> Any:
        # a chart the monitors log with wandb.plot: its table, drawn with W&B's built-in spec
        return wr.CustomChart(query={"summaryTable": {"tableKey": k(table)}}, chart_name=spec,
                              chart_fields=fields, chart_strings={"title": title})

    sections = [
        ws.Section(name="Penalties and adversarial training", is_open=True, panels=[
            line("data-gradient penalty ‖∇ₓℓ‖ (before its weight)", regex="penalty/data_gradient.*"),
            line("parameter-gradient penalty ‖∇θL‖²", "penalty/parameter_gradient"),
            line("spectral-norm penalty Σσ²", "penalty/spectral_norm"),
            line("VAT: KL at the adversarial direction", "penalty/vat"),
            line("adversarial training: clean and adversarial loss", "adversarial/clean_loss", "adversarial/loss"),
            line("flooding: loss and flooded fraction", "flooding/loss", "flooding/flooded"),
        ]),
        ws.Section(name="Per-sample gradient norms", is_open=True, panels=[
            line("‖∇ₓℓᵢ‖: mean and max over samples", "grad_norm/input_mean", "grad_norm/input_max"),
            line("‖∇θℓᵢ‖ and the batch's ‖∇θL‖", "grad_norm/param_per_sample_mean", "grad_norm/param_per_sample_max",
                 "grad_norm/param_batch"),
            line("‖∇θℓᵢ‖ per layer (mean)", regex="grad_norm/layer/.*"),
            line("‖∇ₓℓᵢ‖ histogram", "grad_norm/input"),
            line("‖∇θℓᵢ‖ histogram", "grad_norm/param_per_sample"),
            chart("‖∇ₓℓᵢ‖ against ‖∇θℓᵢ‖, every measurement", "grad_norm/input_vs_param_table", "wandb/scatter/v0",
                  {"x": "input", "y": "param_per_sample"}),
        ]),
        ws.Section(name="MLP inequality", is_open=True, panels=[
            line("lhs / rhs: mean and max (≤ 1)", "mlp_inequality/ratio_mean", "mlp_inequality/ratio_max"),
            line("lhs and rhs (means)", "mlp_inequality/lhs_mean", "mlp_inequality/rhs_mean", log_y=True),
            line("lhs / rhs histogram", "mlp_inequality/ratio"),
            chart("lhs against rhs, every measurement", "mlp_inequality/lhs_vs_rhs_table", "wandb/scatter/v0",
                  {"x": "rhs", "y": "lhs"}),
            chart("lhs / rhs sorted, with the bound lhs = rhs", "mlp_inequality/ratio_sorted_table",
                  "wandb/lineseries/v0", {"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"}),
            wr.MediaBrowser(title="lhs against rhs (log-log, with the line)",
                            media_keys=[k("mlp_inequality/lhs_vs_rhs_image")]),
        ]),
        ws.Section(name="Lipschitz bounds", is_open=True, panels=[
            line("Π σ(W): the upper bound", "lipschitz/upper_bound", log_y=True),
            line("σ(W) per layer", regex="lipschitz/sigma/.*"),
        ]),
        ws.Section(name="Sharpness", is_open=True, panels=[
            line("λ_max of the Hessian against 2/η", "sharpness/lambda_max", "sharpness/two_over_lr"),
            line("trace of the Hessian", "sharpness/trace"),
            line("SAM: L(θ + ε) − L(θ)", "sharpness/sam_gap"),
        ]),
    ]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def panel_keys(view: Any) -> tuple[set[str], set[str]]:
    """The keys the panels of ``view`` read, and their regular expressions (``metric_regex``), for checking them
    against what a run logged."""
    keys, patterns = set(), set()
    for section in view.sections:
        for panel in section.panels:
            keys.update(str(y) for y in getattr(panel, "y", None) or [])
            keys.update(getattr(panel, "media_keys", None) or [])
            table = (getattr(panel, "query", None) or {}).get("summaryTable", {}).get("tableKey")
            if table:
                keys.add(table)
            if getattr(panel, "metric_regex", None):
                patterns.add(panel.metric_regex)
    return keys, patterns
