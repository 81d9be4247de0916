"""The vision tower + projector replayed as CUDA graphs, one per (images in the chunk, padding-row width).

Why: in a burst of 32 requests over HTTP the first tower chunk (one image: ~40 ms of kernels on an H200 alone)
took 196-534 ms on the device (bench/results/engine.md, Session 13, burst probe): the model thread launches the
tower's ~1,000 kernels one by one, and while request threads decode and prepare images it waits for the GIL
between launches, so the GPU waits for it. A replay is one launch, whatever the GIL does.

Shapes are static per graph. The processor pads every image to ``max_num_tiles`` tiles, so a chunk's pixels
depend only on its image count; the split mask's padding pass (vision.py) depends on the widest image's padding
rows, one of ``tiles`` widths (one per count of used tiles). All chunk sizes x widths are captured at start (a
capture in the middle of a burst would cost what it saves) into one memory pool: the graphs run one at a time on
the vision stream, each keeps nothing after it ends but what it writes into the static ``states`` buffer, which
``encode`` copies out before the next replay can overwrite it (the copy is what the join reads, on another
stream, later).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llamactl.server.engine.continuous.green import priority_stream
from llamactl.server.engine.continuous.vision import VisionEncoder

Body = Callable[[], None]
Capture = Callable[[Body], Body]  # a body that works on the static buffers -> its replay


class TowerGraphs:
    """Static input/output buffers for up to ``max_images`` images of ``tiles`` tiles, and a replay per shape."""

    def __init__(self, encoder: VisionEncoder, max_images: int, tiles: int, size: int, dtype: torch.dtype,
                 device: torch.device | str, capture: Capture) -> None:
        """``capture(body)`` -> a callable that replays ``body`` (``cuda_capture`` on GPUs)."""
        self.encoder = encoder
        self.max_images, self.tiles = max_images, tiles
        self.widths = encoder.row_widths(tiles) if encoder.split_mask else [0]
        self._capture = capture
        self._length = tiles * encoder.padded
        hidden = int(encoder.projector.out_features)
        self.pixel = torch.zeros(max_images, 1, tiles, 3, size, size, dtype=dtype, device=device)
        self.ar_ids = torch.ones(max_images, 1, dtype=torch.long, device=device)
        self.ar_mask = torch.ones(max_images, 1, tiles, dtype=torch.long, device=device)
        self.rows = torch.zeros(max_images * max(self.widths), dtype=torch.long, device=device)
        self.key_bias = torch.zeros(max_images * self._length, dtype=dtype, device=device)
        self.states = torch.zeros(max_images, tiles * encoder.patches, hidden, dtype=dtype, device=device)
        self._replays: dict[tuple[int, int], Body] = {}
        self.capture_s = 0.0

    @property
    def count(self) -> int:
        return len(self._replays)

    def capture_all(self) -> None:
        """Capture every chunk size (1..max_images) x padding width, largest first."""
        start = time.monotonic()
        for n in range(self.max_images, 0, -1):
            for width in self.widths:
                self._replays[(n, width)] = self._capture(self._body(n, width))
        self.capture_s = time.monotonic() - start

    def encode(self, pixels: Sequence[torch.Tensor], ar_ids: Sequence[torch.Tensor],
               ar_masks: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The images' states [n, tiles * patches, hidden] by replay, from each image's pixel values [1, 1, tiles,
        3, px, px], aspect-ratio ids [1, 1] and mask [1, 1, tiles] (CPU); None where no graph has this shape
        (more images, or another tile count), for the caller's eager tower. On the current stream."""
        n = len(pixels)
        mask = torch.cat(list(ar_masks))  # [n, 1, tiles]
        if n > self.max_images or mask.shape[-1] != self.tiles:
            return None
        per_image = mask.reshape(n, -1)
        width = 0
        if self.encoder.split_mask:
            need = self.encoder.padding_width(per_image)
            width = min((w for w in self.widths if w >= need), default=-1)
        replay = self._replays.get((n, width))
        if replay is None:
            return None
        for i, pixel in enumerate(pixels):  # pinned by the engine's prepare on GPUs: queued, not waited for
            self.pixel[i : i + 1].copy_(pixel, non_blocking=True)
        put(self.ar_ids[:n], torch.cat(list(ar_ids)))
        put(self.ar_mask[:n], mask)
        if self.encoder.split_mask:
            rows, key_bias = self.encoder.host_rows(per_image, self.key_bias.dtype, width)
            put(self.rows[: n * width], rows.reshape(-1))
            put(self.key_bias[: n * self._length], key_bias.reshape(-1))
        replay()
        return self.states[:n].clone()

    def _body(self, n: int, width: int) -> Body:
        rows = self.rows[: n * width].view(n, width) if self.encoder.split_mask else None
        key_bias = self.key_bias[: n * self._length].view(n, 1, 1, self._length) if rows is not None else None

        def body() -> None:
            states = self.encoder.forward(self.pixel[:n], self.ar_ids[:n], self.ar_mask[:n], rows, key_bias)
            self.states[:n].copy_(states)

        return body


def put(buffer: torch.Tensor, host: torch.Tensor) -> None:
    """A small CPU tensor into a device buffer (pinned first: queued on the stream, the host does not wait)."""
    buffer.copy_(host.pin_memory() if buffer.is_cuda else host, non_blocking=True)


def own_stream(priority: int = 0) -> Any:
    """A CUDA stream no other code uses: not one of PyTorch's pooled streams, which come round again after 32.
    ``priority`` other than 0 (lower = served first) takes the driver (green.priority_stream); a graph captured
    on the stream keeps it (encoding.StreamPriorities)."""
    if priority:
        return priority_stream(priority)
    cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    handle = torch.zeros(1, dtype=torch.int64)
    error = cudart.cudaStreamCreate(handle.data_ptr())
    if error != cudart.cudaError.success:
        raise RuntimeError(f"cudaStreamCreate: {cudart.cudaGetErrorString(error)}")
    return torch.cuda.ExternalStream(int(handle.item()))  # type: ignore[no-untyped-call]


def cuda_capture(pool: Any = None, stream: Any = None) -> Capture:
    """Captures into one memory pool (``pool``, or a new one) on one capture stream (``stream``, or one of its own):
    a warm-up run first (attention plans, kernel compilation and cuBLAS's workspace for this shape happen outside
    the capture), then the capture.

    Why a capture stream of its own: PyTorch keys cuBLAS's workspace by stream, and a captured GEMM keeps the
    workspace of the stream it was captured on. Graphs captured on torch.cuda.graph's default stream (the decode
    graphs) share one workspace; a tower graph among them, replayed on the vision stream while a decode graph
    replays on the main stream, would have two GEMMs use one workspace at once (pytorch/pytorch#193402 describes
    that sharing). A first version did so and the server stopped at the first decode step beside a tower replay
    (bench/results/engine.md, Session 14)."""
    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    stream = own_stream() if stream is None else stream

    def capture(body: Body) -> Body:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            body()
        torch.cuda.current_stream().wait_stream(stream)
        return graph.replay

    return capture
