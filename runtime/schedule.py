"""When each layer computes, refreshes its residual, and keeps or frees its caches."""

from __future__ import annotations

from schemas.latency import COMPUTES_FULL, HEAD_LETTERS, USES_RESIDUAL, Heads, reads_residual, refreshed_cells
from schemas.plan import REUSES_OUTPUT


class Schedule:
    """The method grid plus the cache policy derived from it.

    With ``keep_all`` (used while a plan is still being searched, when later steps
    are unknown) every computed step keeps its output and every ``full``/``asc``
    step refreshes its residual. Otherwise caches are kept only when a later step
    reads them, and freed after that step: the outputs are the same either way.
    An ``ast`` step reads the layer's last computed output, a ``forecast`` step its
    last two (``LayerCache.output`` and ``LayerCache.previous``). ``heads`` are the
    per-head cells (``wars`` cells, ``schemas.plan.HeadCell``): their ``a`` heads read
    the per-head output of the layer's last computed step (``LayerCache.head_output``),
    kept only for them.
    """

    def __init__(self, methods: list[list[str]], *, keep_all: bool = False, heads: Heads | None = None) -> None:
        self.methods = methods
        self.keep_all = keep_all
        self.heads: Heads = dict(heads or {})
        self._keep_heads: set[tuple[int, int]] = set()
        self._free_heads: set[tuple[int, int]] = set()
        self._refresh: set[tuple[int, int]] = set()
        self._keep_output: set[tuple[int, int]] = set()
        self._free_residual: set[tuple[int, int]] = set()
        self._free_output: set[tuple[int, int]] = set()
        if not keep_all:
            self._derive()

    @property
    def num_steps(self) -> int:
        return len(self.methods)

    def method(self, step: int, layer: int) -> str:
        return self.methods[step][layer]

    def head_groups(self, step: int, layer: int) -> tuple[tuple[int, ...], ...] | None:
        """A per-head cell's heads by method, ``(full, wars, ast)``; ``None`` elsewhere."""
        letters = self.heads.get((step, layer))
        if letters is None:
            return None
        return tuple(tuple(h for h, c in enumerate(letters) if c == letter) for letter in HEAD_LETTERS)

    def keeps_head_output(self, step: int, layer: int) -> bool:
        """Whether this computed step keeps its per-head output for a later cell's ``a`` heads."""
        if self.keep_all:
            return bool(self.heads) and self.methods[step][layer] not in REUSES_OUTPUT
        return (step, layer) in self._keep_heads

    def frees_head_output(self, step: int, layer: int) -> bool:
        """Whether the layer's per-head output is not read after this step."""
        return (step, layer) in self._free_heads

    def refreshes_residual(self, step: int, layer: int) -> bool:
        """Whether this ``full``/``asc`` step stores ``R = full - window`` for later use."""
        if self.keep_all:
            return self.methods[step][layer] in COMPUTES_FULL
        return (step, layer) in self._refresh

    def keeps_output(self, step: int, layer: int) -> bool:
        """Whether this step's computed output is kept for a later ``ast``/``forecast`` step."""
        if self.keep_all:
            return self.methods[step][layer] not in REUSES_OUTPUT
        return (step, layer) in self._keep_output

    def frees_after(self, step: int, layer: int) -> tuple[bool, bool]:
        """(residual, output): caches of this layer not needed after this step."""
        if self.keep_all:
            return False, False
        return (step, layer) in self._free_residual, (step, layer) in self._free_output

    def variants(self) -> set[tuple]:
        """The distinct layer-steps of the grid, ``(method, refresh, keep, cond_residual,
        head_groups, keeps_head_output)``.

        ``cond_residual``: a ``wars``/``wars_asc`` step reads a residual refreshed at an
        ``asc`` step (conditional rows only). A compiled block runs one graph per variant
        (and window and block kind), whatever the layer or step.
        """
        found = set()
        for i in range(len(self.methods[0]) if self.methods else 0):
            source = None  # method of the step whose residual is current
            for t, row in enumerate(self.methods):
                m = row[i]
                cond = m in USES_RESIDUAL and source == "asc"
                found.add((m, m in COMPUTES_FULL and self.refreshes_residual(t, i),
                           m not in REUSES_OUTPUT and self.keeps_output(t, i), cond,
                           self.head_groups(t, i), self.keeps_head_output(t, i)))
                if m in COMPUTES_FULL:
                    source = m
        return found

    def _derive(self) -> None:
        steps = len(self.methods)
        layers = len(self.methods[0]) if steps else 0
        self._refresh = refreshed_cells(self.methods, self.heads)
        for i in range(layers):
            column = [self.methods[t][i] for t in range(steps)]
            reads = [reads_residual(m, self.heads.get((t, i))) for t, m in enumerate(column)]
            # a residual is freed after its last reader (before the next refresh, if any)
            for t in range(steps):
                if not reads[t]:
                    continue
                later = next((u for u in range(t + 1, steps) if reads[u] or column[u] in COMPUTES_FULL), None)
                if later is None or not reads[later]:
                    self._free_residual.add((t, i))
            self._derive_outputs(i, column)
            self._derive_heads(i, column)

    def _derive_heads(self, layer: int, column: list[str]) -> None:
        """Keep a computed step's per-head output when the layer's next computed step is a
        per-head cell with ``a`` heads; free it after that cell unless it keeps its own."""
        last = None  # the layer's last computed step
        for t, m in enumerate(column):
            if m in REUSES_OUTPUT:
                continue
            letters = self.heads.get((t, layer))
            if letters is not None and "a" in letters and last is not None:
                self._keep_heads.add((last, layer))
                self._free_heads.add((t, layer))
            last = t
        self._free_heads -= self._keep_heads
    def _derive_outputs(self, layer: int, column: list[str]) -> None:
        """Keep each computed output a later reader reads; free the outputs after a reader
        whose sources no later reader reads (a later reader reading the older of a pair
        always reads the newer too, so the pair goes together)."""
        computed: list[int] = []
        readers: list[tuple[int, set[int]]] = []
        for t, m in enumerate(column):
            if m not in REUSES_OUTPUT:
                computed.append(t)
                continue
            sources = set(computed[-1:] if m == "ast" else computed[-2:])
            readers.append((t, sources))
            self._keep_output.update((s, layer) for s in sources)
        later: set[int] = set()
        for t, sources in reversed(readers):
            if not sources & later:
                self._free_output.add((t, layer))
            later |= sources
