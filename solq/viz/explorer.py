"""An interactive explorer (ipywidgets + matplotlib) for predictions and decoder attention.

Pick an image (from a dataset and/or a folder), a checkpoint, a score threshold, a query and a decoder
layer; toggle masks, boxes, attention points and ground truth. Figures are plain matplotlib figures
redrawn into an ``ipywidgets.Output`` (works with the inline backend in JupyterLab, no ipympl needed).

Everything is also driven programmatically, which is how it is tested headlessly::

    ex = Explorer(predictor, dataset=raw_val_set)
    ex.threshold.value = 0.3          # every control is a widget attribute; changing it redraws
    ex.last_drawn["predictions"]      # what the last redraw drew (the best few when none reaches the threshold)
    ex.figure.savefig("view.png")

A "predictor" is anything with the interface of :class:`solq.viz.predictor.Predictor`: ``__call__(image,
return_attention=True) -> dict``, ``category_names``, ``num_decoder_layers``, ``name``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from solq.engine.predict import expand_inputs

from .attention import attention_points, query_detection, top_queries
from .draw import as_numpy, draw_instances, instance_colors, threshold_summary, to_uint8_image
from .predictor import Predictor, ground_truth

__all__ = ["Explorer"]

ALL = -1  # query selector value: every detection above the threshold


class Explorer:
    """Interactive view of one model's predictions on one image at a time.

    Args:
        predictor: a Predictor (or compatible object); may be None when ``checkpoints`` are given.
        dataset: a raw CocoInstances (no transforms): its images, with ground truth.
        folder: a folder (or list of files / globs) of images without ground truth.
        checkpoints: {name: checkpoint file, run folder or predictor object} (or a list of paths); paths
            are loaded on demand with ``Predictor.from_checkpoint(path, device=device)``.
        score_threshold: initial threshold. max_queries: how many queries the query selector lists.
        figsize: of the drawn figure.
        fallback_topk: with "all above threshold" and no detection reaching the threshold, draw the best
            this many instead (the title and status say so); 0 draws nothing then.
    Attributes: the controls ``image``, ``checkpoint``, ``threshold``, ``query``, ``layer``,
    ``show_masks``, ``show_boxes``, ``show_attention``, ``show_gt``; ``output`` (the Output widget),
    ``widget`` (the whole UI), ``figure`` (the last figure), ``last_drawn`` (counts of the last redraw:
    predictions (drawn), above_threshold (drawn and >= the threshold), fallback (True when the drawn ones
    are the best below it), gt, attention_points, and the image, checkpoint, query, layer and threshold
    it used).
    """

    def __init__(self, predictor=None, *, dataset=None, folder: Any = None,
                 checkpoints: Optional[Mapping[str, Any] | Sequence[Any]] = None, score_threshold: float = 0.5,
                 device: Any = "cpu", max_queries: int = 20, figsize: tuple[float, float] = (6.5, 6.5),
                 fallback_topk: int = 3):
        import ipywidgets as w

        self._predictors: dict[str, Any] = {}
        self._paths: dict[str, Any] = {}
        if predictor is not None:
            self._predictors[getattr(predictor, "name", "") or "model"] = predictor
        if checkpoints:
            items = checkpoints.items() if isinstance(checkpoints, Mapping) else \
                ((Path(str(p)).stem if Path(str(p)).is_file() else Path(str(p)).name, p) for p in checkpoints)
            for k, v in items:  # paths load on demand; predictor objects are used as they are
                (self._paths if isinstance(v, (str, Path)) else self._predictors)[str(k)] = v
        if not self._predictors and not self._paths:
            raise ValueError("Explorer: give a predictor or at least one checkpoint")
        self.device, self.max_queries, self.figsize = device, max_queries, figsize
        self.fallback_topk = int(fallback_topk)
        self.dataset = dataset
        self._sources: list[tuple[str, Any]] = []  # (label, dataset index or image path)
        if dataset is not None:
            ids = getattr(dataset, "ids", list(range(len(dataset))))
            self._sources += [(f"val #{i} (image id {ids[i]})", i) for i in range(len(dataset))]
        if folder is not None:
            files = expand_inputs([folder] if isinstance(folder, (str, Path)) else [str(f) for f in folder])
            self._sources += [(p.name, p) for p in files]
        if not self._sources:
            raise ValueError("Explorer: give a dataset or a folder of images")
        self._cache: dict[tuple, dict] = {}
        self._image_cache: tuple = (None, None)
        self.figure = None
        self.last_drawn: dict = {}
        self.redraws = 0

        names = list(self._predictors) + [n for n in self._paths if n not in self._predictors]
        style = {"description_width": "initial"}
        self.image = w.Dropdown(options=[(label, i) for i, (label, _) in enumerate(self._sources)], value=0,
                                description="image", style=style)
        self.checkpoint = w.Dropdown(options=names, value=names[0], description="checkpoint", style=style)
        self.threshold = w.FloatSlider(value=float(score_threshold), min=0.0, max=1.0, step=0.01,
                                       description="score ≥", continuous_update=False, style=style)
        self.query = w.Dropdown(options=[("all above threshold", ALL)], value=ALL, description="query", style=style)
        self.layer = w.IntSlider(value=0, min=0, max=0, description="decoder layer", continuous_update=False,
                                 style=style)
        self.show_masks = w.Checkbox(value=True, description="masks", indent=False)
        self.show_boxes = w.Checkbox(value=True, description="boxes", indent=False)
        self.show_attention = w.Checkbox(value=False, description="attention points", indent=False)
        self.show_gt = w.Checkbox(value=False, description="ground truth", indent=False,
                                  disabled=dataset is None)
        self.status = w.HTML()
        self.output = w.Output()
        controls = [self.image, self.checkpoint, self.threshold, self.query, self.layer, self.show_masks,
                    self.show_boxes, self.show_attention, self.show_gt]
        self.widget = w.VBox([w.HBox([self.image, self.checkpoint]), w.HBox([self.threshold, self.query, self.layer]),
                              w.HBox([self.show_masks, self.show_boxes, self.show_attention, self.show_gt]),
                              self.status, self.output])
        self._updating = False
        for c in controls:
            c.observe(self._on_change, names="value")
        self._refresh_model()
        self.redraw()

    # ------------------------------------------------------------------------------------- data
    @property
    def predictor(self):
        """The predictor of the selected checkpoint (loaded on first use)."""
        name = self.checkpoint.value
        if name not in self._predictors:
            self._predictors[name] = Predictor.from_checkpoint(self._paths[name], device=self.device, name=name)
        return self._predictors[name]

    def current_image(self) -> tuple[Any, Optional[dict]]:
        """(uint8 image [H,W,3], ground truth dict or None) of the selected source (the last one is kept)."""
        index = self.image.value
        if self._image_cache[0] != index:
            _, src = self._sources[index]
            if isinstance(src, Path):
                self._image_cache = (index, (to_uint8_image(src), None))
            else:
                image, target = self.dataset[src]
                self._image_cache = (index, (to_uint8_image(image), ground_truth(target)))
        return self._image_cache[1]

    def current_result(self) -> dict:
        """The selected model's result (with attention) on the selected image, cached."""
        key = (self.checkpoint.value, self.image.value)
        if key not in self._cache:
            image, _ = self.current_image()
            self._cache[key] = self.predictor(image, return_attention=True)
        return self._cache[key]

    # ---------------------------------------------------------------------------------- updates
    def _refresh_model(self) -> None:
        """Layer range and query list follow the model and image."""
        self._updating = True
        try:
            p = self.predictor
            self.layer.max = max(int(p.num_decoder_layers) - 1, 0)
            if self.layer.value > self.layer.max:
                self.layer.value = self.layer.max
            res = self.current_result()
            names = getattr(p, "category_names", {}) or {}
            options = [("all above threshold", ALL)]
            for q in top_queries(res, self.max_queries).tolist():
                d = query_detection(res, q)
                label = int(as_numpy(res["labels"])[d])
                options.append((f"query {q}: {names.get(label, label)} {float(as_numpy(res['scores'])[d]):.2f}", q))
            keep = self.query.value if self.query.value in [v for _, v in options] else ALL
            self.query.options = options
            self.query.value = keep
        finally:
            self._updating = False

    def _on_change(self, change) -> None:
        if self._updating:
            return
        if change["owner"] in (self.image, self.checkpoint):
            self._refresh_model()
        self.redraw()

    def redraw(self) -> None:
        """Draw the current selection into a new figure, show it in ``output`` and record ``last_drawn``."""
        import matplotlib.pyplot as plt

        res = self.current_result()
        image, gt = self.current_image()
        p = self.predictor
        names = getattr(p, "category_names", {}) or {}
        q, layer = self.query.value, self.layer.value
        if q == ALL:
            shown, threshold, fallback = res, self.threshold.value, self.fallback_topk
        else:  # one query: its best detection, whatever its score
            d = query_detection(res, q)
            shown = {k: (v[[d]] if isinstance(v, np.ndarray) and v.ndim and len(v) == len(res["scores"]) else v)
                     for k, v in res.items() if k != "attention"}
            threshold, fallback = 0.0, 0
        fig, ax = plt.subplots(figsize=self.figsize)
        drawn = draw_instances(image, shown, ax=ax, score_threshold=threshold, category_names=names,
                               show_masks=self.show_masks.value, show_boxes=self.show_boxes.value,
                               ground_truth=gt if self.show_gt.value and gt is not None else None,
                               fallback_topk=fallback)
        n_points = 0
        if self.show_attention.value and "attention" in res and drawn.count:
            queries = as_numpy(shown["query_index"])[drawn.indices]
            queries = queries[np.sort(np.unique(queries, return_index=True)[1])]  # a query once, whatever its labels
            size = drawn.image.shape[:2]
            for query, color in zip(queries.tolist(), instance_colors(queries)):
                pts = attention_points(res["attention"], layer, int(query), size)
                ax.scatter(pts["x"], pts["y"], s=pts["weight"] * 300 + 2, color=color / 255.0, edgecolors="white",
                           linewidths=0.4, alpha=0.9)
                n_points += len(pts["x"])
            ax.set_xlim(-0.5, size[1] - 0.5)
            ax.set_ylim(size[0] - 0.5, -0.5)
        what = (f"all queries · {threshold_summary(drawn, threshold)}" if q == ALL  # says why a view is empty
                else f"query {q} · {drawn.count} shown")
        ax.set_title(f"{self.checkpoint.value} · {self._sources[self.image.value][0]} · {what}"
                     + (f" · attention of layer {layer}" if n_points else ""), fontsize=8)
        fig.tight_layout()
        self.figure = fig
        self.last_drawn = {"predictions": drawn.count, "above_threshold": drawn.above_threshold,
                           "fallback": drawn.fallback, "gt": int(len(drawn.gt_indices)),
                           "attention_points": n_points, "image": self.image.value,
                           "checkpoint": self.checkpoint.value, "query": q, "layer": layer,
                           "threshold": threshold}
        self.redraws += 1
        why = f" (none ≥ {threshold:.2f}: the best {drawn.count} by score)" if drawn.fallback else ""
        self.status.value = (f"<small>{drawn.count} detections shown{why}, {len(drawn.gt_indices)} ground-truth "
                             f"objects, {n_points} sampling points</small>")
        self._show(fig)

    def _show(self, fig) -> None:
        import matplotlib.pyplot as plt

        try:
            from IPython import get_ipython

            in_kernel = get_ipython() is not None and hasattr(get_ipython(), "kernel")
        except ImportError:
            in_kernel = False
        if in_kernel:  # headless (tests, scripts): nothing to show, the figure is kept in self.figure
            from IPython.display import display

            self.output.clear_output(wait=True)
            with self.output:
                display(fig)
        plt.close(fig)  # the figure object stays usable (savefig) but is not shown twice inline

    # -------------------------------------------------------------------------------- display
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
