"""Observers that keep a sample of token vectors and search a range on it: OMSE (the range with the least
squared quantization error on the point's real grid), per-channel quantiles, FQ-ViT's PTF factor search,
and the range-and-sample base that methods' own searches build on (I&S-ViT's SULQ). They register
themselves with `observers.OBSERVERS` (omse, quantile) and `observers.GRID_OBSERVERS` (ptf)."""
from __future__ import annotations

import torch

from .observers import GRID_OBSERVERS, OBSERVERS, MinMaxObserver, Observer, make_observer, tail_quantiles
from .quantizers import Grid, UniformQuantizer


PTF_SAMPLES = ("last_batch", "tokens")  # the tokens PTF's factor search scores (PTFObserver)
KEY_RANGE = 2**62  # token keys are uniform integers below this: ties are negligible (unlike float32's 2^24 values)


class TokenSampleMixin:
    """A uniform random sample of up to `max_tokens` token vectors (one value per channel of the layout;
    None: every token, as RepQ-ViT's and I&S-ViT's searches on their one calibration batch) from everything
    observed, kept as state `sample` [C, T] with random keys `keys` [T] (a reservoir:
    the tokens with the smallest keys, in key order). Every channel of a kept token is kept, so a search
    scores all channels, and the sample spans the whole calibration set, not its last batches. A batch's
    keys are drawn from its global index, and merging concatenates and keeps the smallest keys again, so
    N processes hold exactly the sample one process draws over the same batches.
    """

    max_tokens: int | None
    state: dict[str, torch.Tensor]
    channel_axis: int

    def _add_tokens(self, x: torch.Tensor, batch: int) -> None:
        x = x.detach()
        ch = self.channel_axis % x.dim()
        tokens = x.movedim(ch, -1).reshape(-1, x.shape[ch])  # a view when channels are last
        keys = torch.randint(0, KEY_RANGE, (tokens.shape[0],), generator=torch.Generator().manual_seed(batch + 1))
        keys = keys.to(tokens.device)
        old_keys = self.state.get("keys")
        old = 0 if old_keys is None else old_keys.numel()
        all_keys = keys if old_keys is None else torch.cat([old_keys, keys])
        keep = all_keys.topk(self._cap(all_keys.numel()), largest=False).indices  # in key order
        kept_old, kept_new = keep[keep < old], keep[keep >= old] - old
        new = tokens[kept_new].t().float()  # only the kept tokens are copied
        sample = new if old_keys is None else torch.cat([self.state["sample"][:, kept_old], new], 1)
        sample_keys = all_keys[torch.cat([kept_old, kept_new + old])]
        order = sample_keys.argsort()
        self.state["sample"], self.state["keys"] = sample[:, order], sample_keys[order]

    def _cap(self, n: int) -> int:
        return n if self.max_tokens is None else min(self.max_tokens, n)

    def _trim_sample(self) -> None:
        keys = self.state.get("keys")
        if keys is not None:
            keep = keys.topk(self._cap(keys.numel()), largest=False).indices  # in key order
            self.state["sample"], self.state["keys"] = self.state["sample"][:, keep], keys[keep]

    def _values(self, per_channel: bool) -> torch.Tensor:
        """The sample as [C, T] (per channel) or [1, C T] (per tensor)."""
        x = self.state["sample"]
        return x if per_channel else x.reshape(1, -1)


class RangeSampleObserver(TokenSampleMixin, MinMaxObserver):
    """Min, max and a token sample: what a search over clips (or grid shifts) scores candidates on."""

    reductions = {"min": "min", "max": "max", "sample": "cat", "keys": "cat"}

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        self._add_tokens(x, self._next_batch())

    def _after_merge(self) -> None:
        self._trim_sample()


class OMSEObserver(RangeSampleObserver):
    """Shrink [min, max] by i% (i = 0..steps-1) and keep the clip with the lowest L2 error, scored on the
    point's own grid (`quantizer.probe()`), over a token sample that spans the calibration set."""

    def __init__(self, axis: int | None = None, channel_axis: int = -1, steps: int = 90,
                 max_tokens: int | None = 2048) -> None:
        super().__init__(axis, channel_axis)
        self.steps, self.max_tokens = steps, max_tokens

    @torch.no_grad()
    def range(self, quantizer: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi, x = self.state["min"], self.state["max"], self._values(self.axis is not None)
        probe = quantizer.probe()
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.steps):
            f = 1.0 - 0.01 * i
            probe.set_range(lo * f, hi * f)
            err = (probe(x) - x).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * f, best_lo)
            best_hi = torch.where(better, hi * f, best_hi)
        return best_lo, best_hi


class QuantileObserver(TokenSampleMixin, Observer):
    """Clip at the candidate quantile pair (1 - p, p) with the lowest L2 error on the point's own grid
    (RepQ-ViT's search: p in {0.999, 0.9999, 0.99999}), per tensor or per channel, over a token sample
    that spans the calibration set."""

    reductions = {"sample": "cat", "keys": "cat"}

    def __init__(self, axis: int | None = None, channel_axis: int = -1,
                 quantiles: tuple[float, ...] = (0.999, 0.9999, 0.99999), max_tokens: int | None = 4096) -> None:
        super().__init__(axis, channel_axis)
        quantiles = tuple(float(q) for q in quantiles)
        if not quantiles or not all(0.5 < q <= 1.0 for q in quantiles):
            raise ValueError(f"quantile candidates must be in (0.5, 1], got {quantiles}")
        self.quantiles, self.max_tokens = quantiles, max_tokens

    def observe(self, x: torch.Tensor) -> None:
        self._add_tokens(x, self._next_batch())

    def _after_merge(self) -> None:
        self._trim_sample()

    @torch.no_grad()
    def range(self, quantizer: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._values(self.axis is not None)
        probe = quantizer.probe()
        best = None
        for q, (lo, hi) in tail_quantiles(x, self.quantiles).items():
            probe.set_range(lo, hi)
            err = (probe(x) - x).pow(2).sum(dim=1)
            if best is None:
                best = [err, lo, hi]
                continue
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, lo, best[1]),
                    torch.where(better, hi, best[2])]
        return best[1], best[2]


class PTFObserver(TokenSampleMixin, Observer):
    """FQ-ViT's Power-of-Two Factor: the layer-wise range comes from an inner calibrator (minmax, ema,
    percentile or omse); each channel then takes the factor 2^alpha (alpha in 0..K) with the lowest L2
    error on the search tokens: `sample="last_batch"` every token of the last calibration batch (FQ-ViT's
    code: `PtfObserver.get_quantization_params` runs on the `last_calibrate` batch), `"tokens"` a sample of
    up to `max_tokens` spanning the calibration set.

    In last_batch mode the kept tokens' `keys` are their global batch index, so a merge keeps the batch
    with the highest index, wherever it was observed: N processes search the tokens one process does."""

    reductions = {"sample": "cat", "keys": "cat"}

    def __init__(self, axis: int | None = -1, calibrator: str = "minmax", max_tokens: int | None = 4096,
                 sample: str = "tokens", **calibrator_args) -> None:  # noqa: ANN003
        super().__init__(-1 if axis is None else axis)
        if calibrator == "ptf":
            raise ValueError("PTF needs a layer-wise calibrator: minmax, ema, percentile or omse")
        if sample not in PTF_SAMPLES:
            raise ValueError(f"PTF search sample {sample!r} is unknown: choose last_batch (FQ-ViT's code) or tokens")
        self.inner = make_observer(calibrator, axis=None, channel_axis=self.axis, **calibrator_args)
        self.max_tokens, self.sample = max_tokens, sample

    @property
    def shard(self) -> tuple[int, int] | None:
        return self._shard

    @shard.setter
    def shard(self, value: tuple[int, int] | None) -> None:
        self._shard = value
        if hasattr(self, "inner"):
            self.inner.shard = value

    def reset(self) -> None:
        super().reset()
        self.inner.reset()

    def observe(self, x: torch.Tensor) -> None:
        self.inner.observe(x)
        batch = self._next_batch()
        if self.sample == "tokens":
            self._add_tokens(x, batch)
            return
        x = x.detach()
        tokens = x.movedim(self.axis % x.dim(), -1).reshape(-1, x.shape[self.axis]).t().float()
        self.state["sample"] = tokens
        self.state["keys"] = torch.full((tokens.shape[1],), batch, dtype=torch.long, device=tokens.device)

    def _after_merge(self) -> None:
        if self.sample == "tokens":
            self._trim_sample()
            return
        last = self.state["keys"] == self.state["keys"].max()
        self.state["sample"], self.state["keys"] = self.state["sample"][:, last], self.state["keys"][last]

    def merge_(self, other: "Observer") -> "Observer":
        self.inner.merge_(other.inner)  # type: ignore[attr-defined]
        return super().merge_(other)

    def sync_(self, group=None) -> "Observer":  # noqa: ANN001
        self.inner.sync_(group)
        return super().sync_(group)

    @torch.no_grad()
    def fit(self, quantizer) -> None:  # noqa: ANN001  (a PTFQuantizer)
        probe = UniformQuantizer(quantizer.bits, symmetric=False, signed=False)
        base, zp = quantizer.base_grid(*self.inner.range(probe))
        x = self.state["sample"]
        errors = []
        for a in range(quantizer.max_factor + 1):
            s = base * 2**a
            deq = (torch.clamp(torch.round(x / s) + zp, quantizer.qmin, quantizer.qmax) - zp) * s
            errors.append((deq - x).pow(2).sum(dim=1))
        alpha = torch.stack(errors).argmin(dim=0)  # ties: the finest scale
        quantizer.set_ptf(base, zp, alpha)


OBSERVERS.register("omse", OMSEObserver)
OBSERVERS.register("quantile", QuantileObserver)
GRID_OBSERVERS.register("ptf", lambda grid, spec, axis, channel_axis: PTFObserver(
    grid.axis, calibrator=spec.observer, **dict(spec.observer_args)))
