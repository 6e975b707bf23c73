"""Arrow windows of joint (MMDiT) layers (DESIGN §6).

A joint layer attends over ``num_tokens`` image tokens and ``text`` text tokens together,
the text first (FLUX) or last (SD3). Its window is an arrow: image queries see the
window (band or tiled shape) over the image tokens plus every text token; text queries
see every token. ``arrow_mask`` is that one function of (query, key) indices; the kernels
compute exactly ``softmax(q k^T / sqrt(d) + mask) v`` restricted to it, with no dense
mask but for ``dense``: text queries run full attention, image queries the window's
kernel with the text keys appended to each key slab (the band's chunks, the tiles'
gathered slabs: one SDPA call), or, for the band with ``flex``, one FlexAttention call
over the joint sequence.
"""

from __future__ import annotations

import functools
import warnings

import torch

from runtime.kernels import _compiled_flex_attention, chunked_window_attention, full_attention
from runtime.windows import BoundKernel, TiledKernel, TileIndex, check_fits, shape_of, tile_index
from schemas import PlanError, WindowShape, window_name
from schemas.windows import TILED


def _image_index(idx: torch.Tensor, num_tokens: int, text: int, text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(is text, image index clamped into range) of joint-sequence indices."""
    image = idx - text if text_first else idx
    is_text = (image < 0) | (image >= num_tokens)
    return is_text, image.clamp(0, num_tokens - 1)


def arrow_mask(
    q_idx: torch.Tensor, k_idx: torch.Tensor, window: WindowShape, num_tokens: int, text: int, text_first: bool
) -> torch.Tensor:
    """True where joint query ``i`` may see joint key ``j``: either is a text token, or both
    are image tokens inside ``window`` (its own index function over the image tokens)."""
    q_text, q_image = _image_index(q_idx, num_tokens, text, text_first)
    k_text, k_image = _image_index(k_idx, num_tokens, text, text_first)
    inside = shape_of(window).mask(q_image, k_image, window, num_tokens)
    return q_text[:, None] | k_text[None, :] | inside


def mask(
    window: WindowShape, num_tokens: int, text: int, text_first: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """The dense ``[N + T, N + T]`` boolean mask of the arrow of ``window``."""
    idx = torch.arange(num_tokens + text, device=device)
    return arrow_mask(idx, idx, window, num_tokens, text, text_first)


@functools.lru_cache(maxsize=64)
def arrow_tile_index(
    window: WindowShape, num_tokens: int, text: int, text_first: bool, device: torch.device | None = None
) -> TileIndex:
    """The gather indices of a tiled window's arrow: each tile's image keys, as positions of
    the joint sequence, followed by every text position; queries as the image tokens'."""
    if device is not None and device != torch.device("cpu"):
        return arrow_tile_index(window, num_tokens, text, text_first).to(device)
    base = tile_index(window, num_tokens)
    image_keys = base.keys if base.keys is not None else base.order
    if image_keys is None:
        image_keys = torch.arange(num_tokens)
    offset = text if text_first else 0
    text_keys = torch.arange(text) + (0 if text_first else num_tokens)
    keys = torch.cat(
        [image_keys.view(base.tiles, base.seen * base.tile) + offset, text_keys.expand(base.tiles, text)], dim=1
    )
    return TileIndex(base.tiles, base.tile, base.seen, base.order, keys.reshape(-1), base.inverse, text)


class _ArrowTiles(TiledKernel):
    """A tiled window's gathered kernel over the image queries and the joint keys."""

    def __init__(self, window: WindowShape, num_tokens: int, text: int, text_first: bool) -> None:
        self.text, self.text_first = text, text_first
        super().__init__(window, num_tokens)

    def index_on(self, device: torch.device | None) -> TileIndex:
        return arrow_tile_index(self.window, self.num_tokens, self.text, self.text_first, device)


@functools.lru_cache(maxsize=32)
def _arrow_block_mask(
    num_tokens: int, text: int, text_first: bool, window: int, device: torch.device, compiled: bool
) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    bound = torch.tensor(window, device=device)
    start = text if text_first else 0  # first image position

    def inside(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qi, ki = q_idx - start, kv_idx - start
        q_text = (qi < 0) | (qi >= num_tokens)
        k_text = (ki < 0) | (ki >= num_tokens)
        return q_text | k_text | ((qi - ki).abs() <= bound)

    total = num_tokens + text
    return create_block_mask(inside, None, None, total, total, device=device, _compile=compiled)


class ArrowKernel:
    """A window bound to a joint layer as its arrow: ``kernel(q, k, v)`` over the joint sequence."""

    def __init__(self, window: WindowShape, num_tokens: int, text: int, text_first: bool, kernel: str) -> None:
        self.window, self.num_tokens, self.text, self.text_first = window, num_tokens, text, text_first
        self.kernel = kernel
        start = text if text_first else 0
        self.image = slice(start, start + num_tokens)
        self.text_part = slice(0, text) if text_first else slice(num_tokens, num_tokens + text)
        tiled = isinstance(window, TILED) and kernel != "dense"
        self.tiles = _ArrowTiles(window, num_tokens, text, text_first) if tiled else None
        self._mask: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        total = self.num_tokens + self.text
        if q.shape[-2] != total:
            raise PlanError(
                f"window {window_name(self.window)}: fits {self.num_tokens} image and {self.text} text tokens, "
                f"the layer runs {q.shape[-2]}"
            )
        if self.kernel == "dense":
            if self._mask is None or self._mask.device != q.device:
                self._mask = mask(self.window, self.num_tokens, self.text, self.text_first, q.device)
            return full_attention(q, k, v, self._mask)
        if self.tiles is None and (self.kernel == "flex" or (self.kernel == "auto" and q.device.type == "cuda")):
            return self._flex(q, k, v)
        text_out = full_attention(q[..., self.text_part, :], k, v)
        q_image = q[..., self.image, :]
        if self.tiles is not None:
            image_out = self.tiles(q_image, k, v)
        else:
            extra = (k[..., self.text_part, :], v[..., self.text_part, :])
            image_out = chunked_window_attention(
                q_image, k[..., self.image, :], v[..., self.image, :], self.window, extra
            )
        parts = [text_out, image_out] if self.text_first else [image_out, text_out]
        return torch.cat(parts, dim=-2)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The band's arrow as one FlexAttention call: compiled on CUDA, eager (exact, slow) elsewhere."""
        compiled = q.device.type == "cuda"
        block_mask = _arrow_block_mask(self.num_tokens, self.text, self.text_first, self.window, q.device, compiled)
        if compiled:
            return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=block_mask)


def bind_arrow(
    window: WindowShape, num_tokens: int, text: int, text_first: bool, kernel: str = "auto", field: str = "$.window"
) -> BoundKernel:
    """The arrow kernel of ``window`` on a joint layer of ``num_tokens`` image and ``text``
    text tokens (the text first or last), resolved once; as ``bind_window`` for the rest."""
    check_fits(window, num_tokens, kernel, field)
    return ArrowKernel(window, num_tokens, text, text_first, kernel)
