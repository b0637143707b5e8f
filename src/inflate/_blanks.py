"""Blank tensors the input is copied into: torchvision's padded batch of images.

``images[0].new_full((B, C, H, W), 0)`` is *blank* (one value everywhere, no data of the
input), and ``batch[i, :C, :h, :w].copy_(image)`` copies each image into a view of it. The
blank then holds the input's channel block, if the view spans its whole channel axis; its
sizes, which came from the input's shape, may scale from ``C`` to ``N*C`` in the replay,
whose expected shapes are therefore read from the tags as they are at the end of the trace
(:meth:`Blanks.resolve`). A copy into only some of its channels loses the blank's tag, and
so does a view of it taken *before* the copy: it holds the input, but no tag ever reached it.

:class:`Blanks` keeps this state for :mod:`inflate._discovery`'s tracer, which owns the tags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ._tags import Channels, Lookup, Lost, Tag, getitem_dim

if TYPE_CHECKING:
    from ._discovery import Step

__all__ = ["Blanks", "storage"]


def storage(t: Tensor) -> int | None:
    """Identity of the memory ``t`` views (None: a tensor without a storage)."""
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - tensors without a storage (some subclasses) alias nothing we track
        return None


class Blanks:
    """Blank tensors and their untagged views, and the step outputs to tag at the end.

    Args:
        tag: the tracer's tag lookup.
        mark: the tracer's way to tag a tensor.
    """

    def __init__(self, tag: Lookup, mark: Callable[[Tensor, Tag], None]) -> None:
        self.tag, self.mark = tag, mark
        self.members: dict[int, list[Tensor]] = {}  # storage of a blank -> it, then its untagged views
        self.views: dict[int, tuple[Tensor, Tensor, Any]] = {}  # blank[index] -> (it, blank, index)
        self.pending: list[tuple[int, int, Tensor]] = []  # (step, output) untagged as made

    def see(self, step: int, kind: str | None, args: Any, operands: list[Tensor], results: list[Tensor]) -> None:
        """After operation number ``step``: a blank made (kind ``new``), or a view of one taken."""
        if kind != "new" and not self.members:  # most forwards make no blank: no storage lookups then
            return
        if kind == "new" and len(results) == 1:
            key = storage(results[0])
            if key is not None and self.tag(results[0]) is None:
                self.members[key] = [results[0]]
        else:
            for t in results:
                key = storage(t)
                if key in self.members and self.tag(t) is None and all(t is not v for v in self.members[key]):
                    self.members[key].append(t)
                    if kind == "index" and operands and operands[0] is self.members[key][0]:
                        self.views[id(t)] = (t, operands[0], args[1])
        for i, t in enumerate(results):
            if self.tag(t) is None and storage(t) in self.members:
                self.pending.append((step, i, t))

    def holds(self, t: Tensor) -> bool:
        """Whether ``t`` is a blank or a view of one."""
        return bool(self.members) and storage(t) in self.members

    def fill(self, view: Tensor, tag: Channels, where: str) -> None:
        """The input was copied into ``view`` (of a blank; ``where`` names the module): the
        blank holds the channel block where ``view`` spans its whole channel axis."""
        members = self.members[storage(view)]
        blank = members[0]
        entry = self.views.get(id(view))
        if view is blank:
            blank_tag: Tag = tag
        elif entry is not None and entry[0] is view and tag.outer == tag.inner == 1:
            dims = [d for d in range(blank.ndim) if getitem_dim(blank, entry[2], Channels(d)) == tag.dim]
            blank_tag = Channels(dims[0]) if len(dims) == 1 else \
                Lost(f"a copy of the input into some channels of another tensor{where}")
        else:
            blank_tag = Lost(f"a copy of the input into a view inflate cannot place in its base{where}")
        was = self.tag(blank)
        if was is not None and was != blank_tag:
            blank_tag = Lost(f"copies of the input into one tensor in two layouts{where}")
        self.mark(blank, blank_tag)
        stale = Lost(f"a view taken before the input was copied into its tensor{where}")
        for other in members[1:]:
            if other is not view and self.tag(other) is None:
                self.mark(other, stale)

    def resolve(self, steps: list[Step]) -> None:
        """Give the outputs that were untagged when made their tags at the end of the trace."""
        for i, pos, t in self.pending:
            tag = self.tag(t)
            if tag is not None:
                outs = list(steps[i].outs)
                outs[pos] = (outs[pos][0], tag)
                steps[i] = dataclasses.replace(steps[i], outs=outs)
