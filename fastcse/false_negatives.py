"""False negatives by similarity (GISTEmbed's guided in-sample selection, Qwen3-Embedding's and
NV-Retriever's self-guided filtering), applied tile by tile.

The rule (``fastcse.reference`` materializes it; this module holds its checks and the CPU
backend's per-tile form). With s_g(q, k) the guide's similarity of a (query, key) pair and
t_i = s_g(anchor i, positive i), key j is left out of row i's softmax when

    s_g(query i, key j) > t_i - m            (margin_strategy="absolute")
    s_g(query i, key j) > t_i - |t_i| m      (margin_strategy="relative")

strictly greater, as sentence-transformers' ``GISTEmbedLoss``: a key exactly AT the threshold
stays. The pair compared is the logit's own pair in every direction (query_to_doc: anchor i vs
candidate j, hard and extra negatives included; query_to_query: anchor i vs anchor j;
doc_to_query: positive i vs anchor j; doc_to_doc: positive i vs document j), always against
the one t_i. Never left out: row i's target(s) in query_to_doc (its positive, or with labels
every positive of its label), and row i's own anchor in doc_to_query. A negative margin is
allowed (Qwen3-Embedding leaves out keys above the positive + 0.1: m = -0.1).

The guide: ``guide=(anchor, positive[, negative])`` a guide model's embeddings of the same rows
(any width, compared by cosine, never differentiated: requires-grad tensors are detached), or
None, self-guided: the loss's own similarity without gradient (the cosine with
``normalize=True``, the dot product with ``normalize=False``; before the temperature, the hard
negatives' weight and the hardness penalty), which costs no extra product.

With Matryoshka dimensions the rule applies per dimension (the loss on the first m_k
coordinates is the loss of those inputs): self-guided, each dimension's own similarity and t_i;
a guide, never truncated, the same cells for every dimension (``fastcse.cpu_matryoshka``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastcse import checks
from fastcse.checks import NORMALIZE_EPS
from fastcse.problem import (ANCHOR_KEYS, ANCHORS, CANDIDATES, DIRECTION_ROLES, DOC_TO_QUERY, MARGIN_STRATEGIES,
                             LossProblem)


class FalseNegativeOptions(NamedTuple):
    """The checked keywords: the guide's rows detached (None: self-guided)."""

    margin: float
    strategy: str
    guide_anchor: torch.Tensor | None = None  # [B, d_g]
    guide_positive: torch.Tensor | None = None  # [B, d_g]
    guide_negative: torch.Tensor | None = None  # [B * k, d_g], row-major as the hard negatives
    guide_extra_negatives: torch.Tensor | None = None  # [Q, d_g]

    @property
    def guided(self) -> bool:
        return self.guide_anchor is not None


class GuideRows(NamedTuple):
    """The guide's rows as a backend reads them, in the layout of the loss's own operands."""

    anchor: torch.Tensor  # [B, d_g]: the query rows
    candidates: torch.Tensor  # [N, d_g]: positives, hard negatives, extra negatives
    anchor_keys: torch.Tensor | None  # [M, d_g], None: the anchors themselves


def threshold(positive_similarity: torch.Tensor, margin: float, strategy: str) -> torch.Tensor:
    """t_i - m ("absolute") or t_i - |t_i| m ("relative"): keys scoring above it are left out."""
    if strategy == "absolute":
        return positive_similarity - margin
    return positive_similarity - positive_similarity.abs() * margin


def _check_guide_tensor(name: str, x, rows: int, anchor: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.device != anchor.device:
        raise ValueError(f"{name} is on {x.device} but anchor is on {anchor.device}: put all inputs on one device")
    if x.dim() != 2 or x.shape[0] != rows or x.shape[1] == 0:
        raise ValueError(f"{name} must be [{rows}, d_g] (one guide row per row of the loss), got {tuple(x.shape)}")
    # The guide only decides which keys are left out: it never gets a gradient.
    return x.detach()


def _check_guide(guide, anchor, negative) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(guide anchor, guide positive, guide negatives [B k, d_g] or None), checked and detached."""
    want = 2 if negative is None else 3
    if not isinstance(guide, (tuple, list)) or len(guide) != want:
        got = f"{len(guide)} tensors" if isinstance(guide, (tuple, list)) else type(guide).__name__
        raise ValueError(f"guide must be a tuple of {want} tensors (anchor, positive"
                         f"{', negative' if want == 3 else ''}), one per input of the loss, got {got}")
    batch = anchor.shape[0]
    guide_anchor = _check_guide_tensor("guide[0] (the anchors' guide rows)", guide[0], batch, anchor)
    guide_positive = _check_guide_tensor("guide[1] (the positives' guide rows)", guide[1], batch, anchor)
    guide_negative = None
    if negative is not None:
        raw = guide[2]
        rows = negative.shape[:-1]  # [B] or [B, k]
        if isinstance(raw, torch.Tensor) and tuple(raw.shape[:-1]) != tuple(rows):
            raise ValueError(f"guide[2] (the hard negatives' guide rows) must be [{', '.join(map(str, rows))}, "
                             f"d_g] like negative, got {tuple(raw.shape)}")
        flat = raw.reshape(-1, raw.shape[-1]) if isinstance(raw, torch.Tensor) else raw
        guide_negative = _check_guide_tensor("guide[2] (the hard negatives' guide rows)", flat, rows.numel(), anchor)
    widths = {t.shape[1] for t in (guide_anchor, guide_positive, guide_negative) if t is not None}
    if len(widths) != 1:
        raise ValueError(f"the guide's tensors must share one width d_g, got widths {sorted(widths)}")
    return guide_anchor, guide_positive, guide_negative


def check_options(margin, strategy, guide, guide_extra_negatives, *, anchor, negative,
                  extra_negatives) -> FalseNegativeOptions | None:
    """The keywords ``info_nce`` takes for false negatives by similarity, checked (None: off)."""
    checks.choice("margin_strategy", strategy, MARGIN_STRATEGIES)
    if margin is None:
        if guide is not None or guide_extra_negatives is not None:
            raise ValueError("guide was given without false_negative_margin: the guide only decides which "
                             "negatives the margin leaves out, give false_negative_margin too")
        return None
    margin = checks.finite_float("false_negative_margin", margin)
    if guide is None:
        if guide_extra_negatives is not None:
            raise ValueError("guide_extra_negatives was given without guide: give the guide's rows of the batch too")
        return FalseNegativeOptions(margin, strategy)
    guide_anchor, guide_positive, guide_negative = _check_guide(guide, anchor, negative)
    guide_extra = None
    if extra_negatives is not None:
        if guide_extra_negatives is None:
            raise ValueError("extra_negatives with a guide need guide_extra_negatives=: the guide's rows of the "
                             "extra negatives, [Q, d_g]")
        guide_extra = _check_guide_tensor("guide_extra_negatives", guide_extra_negatives, extra_negatives.shape[0],
                                          anchor)
        if guide_extra.shape[1] != guide_anchor.shape[1]:
            raise ValueError(f"guide_extra_negatives must be [Q, {guide_anchor.shape[1]}] like the guide's other "
                             f"rows, got {tuple(guide_extra.shape)}")
    elif guide_extra_negatives is not None and guide_extra_negatives.numel() > 0:
        raise ValueError("guide_extra_negatives was given without extra_negatives")
    return FalseNegativeOptions(margin, strategy, guide_anchor, guide_positive, guide_negative, guide_extra)


def guide_candidates(options: FalseNegativeOptions) -> torch.Tensor:
    """The guide's rows of the candidates, in their layout: positives, hard negatives, extra negatives."""
    blocks = [options.guide_positive, options.guide_negative, options.guide_extra_negatives]
    blocks = [b for b in blocks if b is not None]
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def problem_keywords(options: FalseNegativeOptions | None, guide: GuideRows | None) -> dict:
    """``fastcse.problem.describe``'s keywords for the rule (none without one)."""
    if options is None:
        return {}
    return dict(false_negative_margin=options.margin, margin_strategy=options.strategy, guide=guide)


class FalseNegativeTiles:
    """The CPU backend's per-call state for the rule: the guide's normalized rows, every row's
    threshold, and the buffers ``left_out`` fills with one direction's [R, n] cells per tile.

    Self-guided, the tile is the direction's own score block before any bias or penalty, i.e.
    sim / tau: the thresholds are scaled by 1 / tau (exact for both strategies, tau > 0).

    Per tile the rule costs one compare into a reused bool buffer (and, guided, the guide's
    product into a reused block): the cells that always stay (the targets, doc_to_query's own
    anchor) sit on one diagonal of the tile and are cleared through a view, no index tensors."""

    def __init__(self, problem: LossProblem, guide: GuideRows | None, operands):
        self.problem = problem
        self.operands = operands
        self.guide = None
        if guide is not None:
            normalized = [None if x is None else F.normalize(x.to(operands.dtype), dim=1, eps=NORMALIZE_EPS)
                          for x in guide]
            self.guide = GuideRows(normalized[0], normalized[1],
                                   normalized[0] if normalized[2] is None else normalized[2])
        self.thresholds = self._thresholds()
        # One buffer of each kind, shared by the directions (each tile is consumed before the next
        # is built): reusing them keeps the allocator from cycling R x n blocks on every tile.
        widest = operands.rows * max(operands.widths.values())
        self._cells = torch.empty(widest, dtype=torch.bool)
        self._tile = None if self.guide is None else torch.empty(widest, dtype=operands.dtype)

    def _thresholds(self) -> torch.Tensor:
        """[B]: every row's threshold, once per call (a row dot per row)."""
        problem = self.problem
        positives = slice(problem.pos_start, problem.pos_start + problem.batch)
        margin = problem.false_negative_margin
        if self.guide is not None:
            similarity = (self.guide.anchor * self.guide.candidates[positives]).sum(1)
        else:
            similarity = (self.operands.a_scaled * self.operands.candidates.hat[positives]).sum(1)
            if problem.margin_strategy == "absolute":  # relative margins are scale-free already
                margin = margin / problem.tau
        return threshold(similarity, margin, problem.margin_strategy)

    def row_limits(self, r0: int, r1: int) -> torch.Tensor:
        """[R]: the thresholds of rows [r0, r1) that ``left_out`` compares the tile with."""
        return self.thresholds[r0:r1]

    def _guide_tile(self, direction: str, r0: int, r1: int) -> torch.Tensor:
        """The guide's cosines of the direction's (query, key) pairs: one R x n x d_g product."""
        role = DIRECTION_ROLES[direction]
        if role.queries == ANCHORS:
            queries = self.guide.anchor[r0:r1]
        else:
            queries = self.guide.candidates[self.problem.pos_start + r0: self.problem.pos_start + r1]
        if role.keys == ANCHOR_KEYS:
            keys = self.guide.anchor_keys
        else:
            keys = self.guide.candidates if role.keys == CANDIDATES else \
                self.guide.candidates[: self.problem.num_documents]
        out = self._tile[: (r1 - r0) * keys.shape[0]].view(r1 - r0, keys.shape[0])
        return torch.mm(queries, keys.T, out=out)

    def left_out(self, direction: str, raw_block: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """[R, n] bool: the cells of rows [r0, r1) the rule leaves out (``raw_block``: the
        direction's scores before any bias or penalty, the tile when self-guided). A view of a
        buffer that the next call overwrites: consume it first."""
        tile = raw_block if self.guide is None else self._guide_tile(direction, r0, r1)
        rows, width = tile.shape
        cells = torch.gt(tile, self.row_limits(r0, r1)[:, None], out=self._cells[: rows * width].view(rows, width))
        role = DIRECTION_ROLES[direction]
        if role.holds_target:  # the targets stay: the positive, or with labels every positive of the label
            if self.problem.id_mode == "label":
                cells[:, : self.problem.num_positives].masked_fill_(self.operands.same_id(r0, r1), False)
            else:  # row i's positive is column pos_start + r0 + i
                cells.narrow(1, self.problem.pos_start + r0, rows).diagonal().fill_(False)
        elif direction == DOC_TO_QUERY:  # positive i's own anchor is its pair, not a negative
            cells.narrow(1, self.problem.anchor_start + r0, rows).diagonal().fill_(False)
        return cells
