"""Point-cloud modality: the data side (decode ``npy``/``npz`` arrays, normalise, sample, augment), pure-torch
batched grouping (farthest-point sampling + kNN) and the Point-BERT / Point-MAE / ULIP group-embedding
transformer (``point_cloud/point_transformer``).

Per-sample work (decode, sampling, augmentation) is cheap numpy in DataLoader workers; grouping runs on the
batch on the training device, vectorised over clouds and points (no CUDA extension: Point-MAE's
``pointnet2_ops`` / ``knn_cuda`` builds are a common failure in its issue tracker).
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmpt.contracts import (
    DemoConcepts,
    MiB,
    ModalityData,
    SampleRejected,
    SampleTooLarge,
    SourceSample,
    StemOutput,
)
from mmpt.data.concepts import COLORS, SIZES
from mmpt.nn.layers import Transformer, init_weights
from mmpt.nn.token_encoder import PrefixTokenEncoder, check_token_drop, stack_present
from mmpt.registry import ConfigError, encoders, modalities

# Channel layouts a cloud may carry after xyz; normals rotate with the cloud, rgb does not.
CHANNELS = {"xyz": 3, "xyzrgb": 6, "xyznormal": 6, "xyzrgbnormal": 9}
NORMALIZE = ("sphere", "center", "none")


class BadPointCloud(ValueError):
    """A point-cloud member that cannot be used (wrong rank or channels, non-finite values, too few points)."""


def _npy_bytes(f: Any) -> int:
    """Bytes the array whose ``.npy`` header starts at ``f`` states (shape x itemsize); reads the header only."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(f)
    return math.prod(shape) * dtype.itemsize


def stated_npy_bytes(data: bytes) -> int:
    """Bytes ``np.load`` allocates for an ``npy`` member, or for every array of an ``npz`` member (a zip),
    from the npy headers alone: an npz member is inflated only as far as its header."""
    import zipfile

    if not data.startswith(b"PK"):
        return _npy_bytes(io.BytesIO(data))
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            with z.open(info) as f:
                total += _npy_bytes(f)
    return total


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_PLY_FORMATS = {"ascii": "", "binary_little_endian": "<", "binary_big_endian": ">"}


def _ply_header(data: bytes) -> tuple[str, list[tuple[str, int, list[tuple[str, str | None]]]], int]:
    """(format, elements as (name, count, [(property, numpy type or None for a list)]), body offset)."""
    end = data.find(b"end_header", 0, 1 << 16)
    if end < 0:
        raise BadPointCloud("PLY file without 'end_header' in its first 64 KiB")
    body = data.index(b"\n", end) + 1 if b"\n" in data[end:end + 16] else len(data)
    fmt, elements = None, []
    for line in data[:end].decode("ascii", "replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) >= 3:
            kind = None if words[1] == "list" else _PLY_TYPES.get(words[1])
            if words[1] != "list" and kind is None:
                raise BadPointCloud(f"PLY property type {words[1]!r}")
            elements[-1][2].append((words[-1], kind))
    if fmt not in _PLY_FORMATS:
        raise BadPointCloud(f"PLY format {fmt!r}; expected one of {', '.join(_PLY_FORMATS)}")
    return fmt, elements, body


def read_ply_xyz(data: bytes, max_bytes: int | None = None) -> np.ndarray:
    """The vertex x, y, z of a PLY file (ascii, binary little- or big-endian) as an (N, 3) float32 array.

    Elements before ``vertex`` are skipped (in binary files only when their properties have fixed sizes);
    the stated vertex count is checked against the bytes there are and ``max_bytes`` before reading."""
    fmt, elements, offset = _ply_header(data)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise BadPointCloud(f"PLY file without a vertex element (elements: {', '.join(names) or 'none'})")
    at = names.index("vertex")
    _, count, props = elements[at]
    prop_names = [name for name, _ in props]
    if not {"x", "y", "z"} <= set(prop_names) or any(kind is None for _, kind in props):
        raise BadPointCloud(f"PLY vertex properties {prop_names}: expected scalar x, y, z")
    if max_bytes is not None and 12 * count > max_bytes:
        raise SampleTooLarge(f"PLY file states {count} vertices, over max_sample_bytes={max_bytes}")
    if fmt == "ascii":
        lines = data[offset:].split(b"\n", sum(e[1] for e in elements[:at]) + count)
        rows = lines[sum(e[1] for e in elements[:at]):][:count]
        if len(rows) < count:
            raise BadPointCloud(f"PLY file states {count} vertices but has {len(rows)} vertex lines")
        try:
            values = np.array(b" ".join(rows).split(), dtype=np.float64)
        except ValueError:
            raise BadPointCloud("PLY vertex lines with values that are no numbers") from None
        if values.size != count * len(props):
            raise BadPointCloud(f"PLY vertex lines hold {values.size} values; expected {count} x {len(props)}")
        table = values.reshape(count, len(props))
        return np.stack([table[:, prop_names.index(a)] for a in "xyz"], 1).astype(np.float32)
    order = _PLY_FORMATS[fmt]
    for name, n, before in elements[:at]:
        if any(kind is None for _, kind in before):
            raise BadPointCloud(f"binary PLY: element {name!r} with list properties comes before the vertices")
        offset += n * np.dtype([(p, order + k) for p, k in before]).itemsize
    dtype = np.dtype([(p, order + k) for p, k in props])
    if offset + count * dtype.itemsize > len(data):
        raise BadPointCloud(f"binary PLY states {count} vertices of {dtype.itemsize} bytes; the file is too short")
    table = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return np.stack([table[a] for a in "xyz"], 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- grouping

def farthest_point_sample(xyz: Tensor, groups: int, start: Tensor | None = None) -> Tensor:
    """Indices (B, G) of ``groups`` farthest-point-sampled centres of clouds ``xyz`` (B, N, 3).

    ``start`` (B,) long picks each cloud's first centre; None starts from the point farthest from the
    cloud's centroid, which does not depend on the order of the points (eval: a shuffled cloud gets the
    same centres). One loop step per centre, each vectorised over clouds and points.
    """
    b, n, _ = xyz.shape
    if groups > n:
        raise ValueError(f"farthest_point_sample: {groups} groups from clouds of {n} points")
    xyz = xyz.float()
    if start is None:
        start = (xyz - xyz.mean(1, keepdim=True)).square().sum(-1).argmax(1)
    rows = torch.arange(b, device=xyz.device)
    idx = torch.empty(b, groups, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), device=xyz.device)
    current = start.to(xyz.device)
    for g in range(groups):
        idx[:, g] = current
        centre = xyz[rows, current].unsqueeze(1)
        dist = torch.minimum(dist, (xyz - centre).square().sum(-1))
        current = dist.argmax(1)
    return idx


def knn(xyz: Tensor, centres: Tensor, k: int, chunk_elems: int = 1 << 25) -> Tensor:
    """Indices (B, G, K) of the ``k`` points of ``xyz`` (B, N, 3) nearest to each of ``centres`` (B, G, 3),
    nearest first; the (G, N) distance matrix is built for a few clouds at a time to bound memory."""
    b, n, _ = xyz.shape
    if k > n:
        raise ValueError(f"knn: {k} neighbours from clouds of {n} points")
    per = max(1, chunk_elems // max(1, centres.shape[1] * n))
    out = []
    for s in range(0, b, per):
        d = torch.cdist(centres[s:s + per].float(), xyz[s:s + per].float())
        out.append(d.topk(k, dim=-1, largest=False, sorted=True).indices)
    return torch.cat(out)


def gather_points(points: Tensor, idx: Tensor) -> Tensor:
    """``points`` (B, N, C) at indices ``idx`` (B, ...) -> (B, ..., C)."""
    b, c = points.shape[0], points.shape[-1]
    flat = idx.reshape(b, -1)
    out = points.gather(1, flat.unsqueeze(-1).expand(-1, -1, c))
    return out.reshape(*idx.shape, c)


def group_points(points: Tensor, groups: int, k: int, start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Centres (B, G, 3) and neighbourhoods (B, G, K, C) of ``points`` (B, N, C; xyz first), the
    neighbourhoods' xyz relative to their centre and their extra channels unchanged."""
    with torch.no_grad():
        xyz = points[..., :3].float()
        centre_idx = farthest_point_sample(xyz, groups, start)
        centres = gather_points(xyz, centre_idx)
        neighbour_idx = knn(xyz, centres, k)
    neighbourhoods = gather_points(points, neighbour_idx)
    rel = neighbourhoods[..., :3] - centres.unsqueeze(2).to(points.dtype)
    return centres, torch.cat([rel, neighbourhoods[..., 3:]], -1)


def chamfer_distance(a: Tensor, b: Tensor) -> Tensor:
    """Point-MAE's L2 Chamfer distance of point sets ``a`` (..., K, 3) and ``b`` (..., M, 3): the mean squared
    distance from each point of ``a`` to its nearest in ``b`` plus the same from ``b`` to ``a``; shape (...)."""
    d = (a.float().unsqueeze(-2) - b.float().unsqueeze(-3)).square().sum(-1)  # (..., K, M)
    return d.min(-1).values.mean(-1) + d.min(-2).values.mean(-1)


# ----------------------------------------------------------------------------------------------- encoder

class MiniPointNet(nn.Module):
    """Point-MAE's group encoder: shared per-point MLP, max-pool, concatenate the group feature to each
    point, a second MLP, max-pool. LayerNorm instead of BatchNorm so a sample's features never depend on
    the rest of its batch (GradCache re-forwards chunks)."""

    def __init__(self, in_chans: int, hidden: int, width: int):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(in_chans, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                   nn.Linear(hidden, 2 * hidden))
        self.second = nn.Sequential(nn.Linear(4 * hidden, 4 * hidden), nn.LayerNorm(4 * hidden), nn.GELU(),
                                    nn.Linear(4 * hidden, width))

    def forward(self, groups: Tensor) -> Tensor:
        """(B, G, K, C) -> (B, G, width)."""
        f = self.first(groups)
        pooled = f.max(2, keepdim=True).values.expand_as(f)
        return self.second(torch.cat([pooled, f], -1)).max(2).values


@encoders.register("point_cloud/point_transformer")
class PointTransformer(PrefixTokenEncoder):
    """Point-BERT / Point-MAE / ULIP point encoder: FPS centres + kNN groups -> mini-PointNet group tokens
    + MLP positional embedding of the centres -> pre-norm transformer -> CLS or mean pool.

    Args:
        num_points: points per cloud after sampling (data side). groups: G centres (tokens). group_size: K
        neighbours per group. channels: 'xyz', 'xyzrgb', 'xyznormal' or 'xyzrgbnormal'. width: token width.
        depth: transformer blocks. heads: attention heads. mlp_ratio: MLP hidden size over width.
        pointnet_hidden: first hidden size of the mini-PointNet. pool: 'cls' or 'mean'.
        normalize: 'sphere', 'center' or 'none' (data side, see :class:`PointCloudData`).
        train_scale: per-axis training scale range. train_jitter: std of training xyz noise.
        train_dropout: largest fraction of points dropped in training. train_rotate: rotate about the
        up axis in training. train_color_drop: probability that a training cloud's rgb is replaced by
        mid-gray (SimCLR's colour-dropping argument: colour alone must not explain every pair).
        train_token_drop: share of group tokens dropped at random in training forwards (FLIP; 0: none).

    Masked modelling (``masked_tokens``, Point-MAE): each group's K points relative to its centre are the
    target, compared by the squared-L2 Chamfer distance; 60% of the groups are dropped by default.
    """

    modality = "point_cloud"
    mask_ratio_default = 0.6
    tiny_configs = ({"num_points": 64, "groups": 8, "group_size": 8, "width": 32, "depth": 2, "heads": 2,
                     "pointnet_hidden": 16},)

    def __init__(self, num_points: int = 1024, groups: int = 64, group_size: int = 32, channels: str = "xyz",
                 width: int = 384, depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0,
                 pointnet_hidden: int = 128, pool: str = "cls", normalize: str = "sphere",
                 train_scale: list = (0.8, 1.2), train_jitter: float = 0.01, train_dropout: float = 0.1,
                 train_rotate: bool = True, train_color_drop: float = 0.0, train_token_drop: float = 0.0):
        super().__init__()
        _check_layout(num_points, groups, group_size, channels)
        self.train_token_drop = check_token_drop(train_token_drop)
        if pool not in ("cls", "mean"):
            raise ConfigError(f"point_cloud: pool must be 'cls' or 'mean', got {pool!r}")
        self.width, self.groups, self.group_size, self.pool = width, groups, group_size, pool
        self.in_chans = CHANNELS[channels]
        self.group_embed = MiniPointNet(self.in_chans, pointnet_hidden, width)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.norm_pre = nn.LayerNorm(width)
        self.trunk = Transformer(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.group_embed.apply(init_weights)
        self.pos_embed.apply(init_weights)

    def group(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Centres (B, G, 3) and relative neighbourhoods (B, G, K, C). Training starts FPS at each cloud's
        first point, a random one since the data side samples training clouds in random order: the forward
        draws no random numbers, so a re-forward (gradient checkpointing, GradCache) or a resume sees the
        same groups. Eval starts at the point farthest from the centroid, whatever the points' order."""
        b, n, c = points.shape
        if c != self.in_chans:
            raise ConfigError(f"point_cloud: points have {c} channels; the encoder expects {self.in_chans}")
        start = torch.zeros(b, dtype=torch.long, device=points.device) if self.training else None
        return group_points(points.float(), self.groups, self.group_size, start)

    def stem(self, inputs: dict[str, Tensor], with_targets: bool = False) -> StemOutput:
        """Points -> CLS + group tokens (centre positions embedded); targets: each group's xyz relative
        to its centre, (B, G, K*3), Point-MAE's reconstruction target."""
        centres, neighbourhoods = self.group(inputs["points"])
        dtype = self.cls_token.dtype
        tokens = self.group_embed(neighbourhoods.to(dtype)) + self.pos_embed(centres.to(dtype))
        b = tokens.shape[0]
        cls = (self.cls_token + self.cls_pos).expand(b, -1, -1)
        tokens = torch.cat([cls, tokens], 1)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(b, -1)
        targets = neighbourhoods[..., :3].flatten(2) if with_targets else None
        coords = (centres.float() + 1) / 2  # unit-sphere clouds: centres in [0, 1]
        return StemOutput(tokens=tokens, positions=positions, targets=targets, prefix=1, coords=coords)

    def num_patches(self, inputs: dict[str, Tensor]) -> int:
        return self.groups

    def reconstruction_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """(B, G) squared-L2 Chamfer distance between predicted and true groups (B, G, K*3)."""
        return chamfer_distance(pred.unflatten(-1, (-1, 3)), target.unflatten(-1, (-1, 3)))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "cls_pos"}


def _check_layout(num_points: int, groups: int, group_size: int, channels: str) -> None:
    if channels not in CHANNELS:
        raise ConfigError(f"point_cloud: channels must be one of {sorted(CHANNELS)}, got {channels!r}")
    if not 0 < groups <= num_points or not 0 < group_size <= num_points:
        raise ConfigError(f"point_cloud: groups={groups} and group_size={group_size} must be in 1..num_points "
                          f"({num_points})")


# --------------------------------------------------------------------------------------------- data side

@modalities.register("point_cloud")
class PointCloudData(ModalityData):
    """Decode ``npy``/``npz`` (N, C) arrays, normalise, sample to ``num_points`` (random in training, evenly
    strided in eval) and augment in training: rotation about the up axis (y), anisotropic scale, jitter
    and point dropout (a dropped point repeats a kept one, so the count stays fixed and no mask is needed).

    Args: num_points, groups, channels: as the encoder's (a cloud with fewer than ``groups`` points, or
    another channel count, is rejected). normalize: 'sphere' (centre, scale into the unit ball), 'center'
    (centre only: keeps absolute size) or 'none'. train_scale: per-axis scale range. train_jitter: std
    of the Gaussian xyz noise. train_dropout: largest fraction of points dropped. train_rotate: rotate
    about the up axis. train_color_drop: probability that a training cloud's rgb becomes mid-gray, so its
    geometry, not its colour, has to match the other side (colour is learned from the clouds that keep it).
    """

    modality = "point_cloud"
    extensions = ("npy", "npz")
    source_extensions = ("npy", "npz", "ply")

    def source_samples(self, data: bytes, ext: str) -> list[SourceSample]:
        """``npy``/``npz`` files as they are (named by their bytes: an npz is a zip); a PLY file's vertex x, y, z
        as an (N, 3) float32 ``npy`` member (ascii or binary PLY, read with numpy)."""
        if data.startswith(b"ply"):
            xyz = read_ply_xyz(data, max_bytes=self.max_sample_bytes)
            buf = io.BytesIO()
            np.save(buf, xyz, allow_pickle=False)
            return [SourceSample({"npy": buf.getvalue()})]
        if data.startswith(b"\x93NUMPY"):
            return [SourceSample({"npy": data})]
        if data.startswith(b"PK"):
            return [SourceSample({"npz": data})]
        raise SampleRejected(f".{ext} file is no npy, npz or PLY data", reason="unsupported_format")

    def __init__(self, num_points: int = 1024, groups: int = 64, channels: str = "xyz", normalize: str = "sphere",
                 train_scale: list = (0.8, 1.2), train_jitter: float = 0.01, train_dropout: float = 0.1,
                 train_rotate: bool = True, train_color_drop: float = 0.0):
        _check_layout(num_points, groups, 1, channels)
        if normalize not in NORMALIZE:
            raise ConfigError(f"point_cloud: normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.num_points, self.groups, self.channels = num_points, groups, channels
        self.in_chans = CHANNELS[channels]
        self.normalize = normalize
        self.scale = tuple(train_scale)
        self.jitter, self.dropout, self.rotate = train_jitter, train_dropout, train_rotate
        if not 0 <= train_color_drop <= 1:
            raise ConfigError(f"point_cloud: train_color_drop must be in [0, 1], got {train_color_drop}")
        self.color_drop = train_color_drop if "rgb" in channels else 0.0

    max_sample_bytes = 128 * MiB  # 4 M points x 8 float64 channels; ULIP's clouds are 8,192 points

    def decoded_size(self, data: bytes, ext: str) -> int | None:
        """What the member's arrays state in their npy headers (None if the headers do not read: decode says why)."""
        try:
            return stated_npy_bytes(data)
        except Exception:
            return None

    def decode(self, data: bytes, ext: str) -> np.ndarray:
        """Bytes -> (N, C) float32 cloud, normalised; never unpickles (object arrays raise).

        ``npy``: one (N, C) array in the ``channels`` layout. ``npz``: one such array, or one named
        ``points`` in the layout, or ``points`` (N, 3) plus ``rgb`` / ``normal`` (N, 3) arrays, from which
        the layout takes what it needs (the demo writes these, so any layout reads it)."""
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return self.check(self._from_npz({name: loaded[name] for name in loaded.files}))
        return self.check(loaded)

    def _from_npz(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        if "points" not in arrays:
            if len(arrays) != 1:
                raise BadPointCloud(f"npz with arrays {sorted(arrays)}: expected one array or one named 'points'")
            return next(iter(arrays.values()))
        points = arrays["points"]
        if points.ndim != 2 or points.shape[1] != 3 or self.in_chans == 3:
            return points
        extra = [name for name in ("rgb", "normal") if name in self.channels]
        missing = [name for name in extra if name not in arrays]
        if missing:
            raise BadPointCloud(f"npz with arrays {sorted(arrays)}: channels={self.channels!r} needs {missing}")
        parts = [points] + [arrays[name] for name in extra]
        if any(a.shape != points.shape or a.dtype.kind not in "fiu" for a in parts):
            raise BadPointCloud(f"npz arrays {[(n, arrays[n].shape) for n in ['points', *extra]]}: expected "
                                "numeric (N, 3) each")
        return np.concatenate(parts, 1)

    def check(self, arr: np.ndarray) -> np.ndarray:
        """Validate an (N, C) numeric array and return it normalised as float32."""
        if arr.dtype.kind not in "fiu":
            raise BadPointCloud(f"point cloud of dtype {arr.dtype}; expected a numeric array")
        if arr.ndim != 2 or arr.shape[1] != self.in_chans:
            raise BadPointCloud(f"point cloud of shape {arr.shape}; expected (N, {self.in_chans}) for "
                                f"channels={self.channels!r}")
        if arr.shape[0] < self.groups:
            raise BadPointCloud(f"point cloud of {arr.shape[0]} points; fewer than groups={self.groups}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise BadPointCloud("point cloud with NaN or infinite values")
        return self._normalised(arr)

    def _normalised(self, arr: np.ndarray) -> np.ndarray:
        if self.normalize == "none":
            return arr
        arr[:, :3] -= arr[:, :3].mean(0)
        if self.normalize == "sphere":
            arr[:, :3] /= max(float(np.sqrt((arr[:, :3] ** 2).sum(1).max())), 1e-8)
        return arr

    def transform(self, cloud: np.ndarray, train: bool) -> Tensor:
        """Sample to ``num_points`` and, in training, augment; (num_points, C) float32."""
        n = len(cloud)
        if train:
            # seeded from `random`, which the loader reseeds per sample: augmentation is resume-exact
            rng = np.random.default_rng(random.getrandbits(64))
            idx = rng.choice(n, self.num_points, replace=n < self.num_points)
            cloud = self._augment(cloud[idx], rng)
        else:
            cloud = cloud[np.linspace(0, n - 1, self.num_points).round().astype(np.int64)]
        return torch.from_numpy(np.ascontiguousarray(cloud, dtype=np.float32))

    def _augment(self, cloud: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cloud = cloud.copy()
        xyz = cloud[:, :3]
        if self.rotate:
            rot = _rotation_y(rng.uniform(0, 2 * math.pi))
            xyz[:] = xyz @ rot.T
            if self.channels.endswith("normal"):
                cloud[:, -3:] = cloud[:, -3:] @ rot.T
        xyz *= rng.uniform(*self.scale, size=3).astype(np.float32)
        if self.jitter:
            xyz += rng.normal(0, self.jitter, size=xyz.shape).astype(np.float32)
        if self.dropout:
            dropped = rng.random(len(cloud)) < rng.uniform(0, self.dropout)
            if dropped.any() and not dropped.all():
                cloud[dropped] = cloud[np.flatnonzero(~dropped)[0]]
        if self.color_drop and rng.random() < self.color_drop:
            cloud[:, 3:6] = 0.5  # rgb follows xyz in every layout that has it
        return cloud

    def collate(self, values: list[Any]) -> dict[str, Tensor]:
        like = torch.zeros(self.num_points, self.in_chans)
        return {"points": stack_present(values, like)}

    def coerce(self, value: Any) -> np.ndarray:
        """A raw user input (array, tensor, path or ``npy``/``npz`` bytes) -> a checked, normalised cloud."""
        if isinstance(value, (str, bytes)):
            data = value if isinstance(value, bytes) else open(value, "rb").read()
            return self.decode(data, "npy")
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            return self.check(value)
        raise TypeError(f"point cloud input must be an array, a tensor, a path or bytes, got {type(value).__name__}")

    def fields_from_tensor(self, x: Tensor) -> dict[str, Tensor]:
        """A (B, N, C) float batch, already normalised and sampled -> ``{"points": x}``."""
        if x.ndim != 3 or x.shape[2] != self.in_chans or x.shape[1] < self.groups or not x.is_floating_point():
            raise ConfigError(f"encode('point_cloud', ...): tensor of shape {tuple(x.shape)} and dtype {x.dtype}; "
                              f"expected float (B, N >= {self.groups}, {self.in_chans})")
        return {"points": x}

    def render_demo(self, concepts: DemoConcepts, rng: Any) -> list[dict[str, bytes]]:
        """Each concept as a ``num_points`` cloud of its solid: ``npz`` with float16 ``points`` and ``rgb``
        (and ``normal`` when the layout has normals), so a data side of any layout reads the same shards."""
        clouds = render_solids(concepts, self.num_points, "xyzrgbnormal" if "normal" in self.channels else "xyzrgb",
                               rng)
        return [{"npz": _npz(points=c[:, :3], rgb=c[:, 3:6], **({"normal": c[:, 6:]} if c.shape[1] > 6 else {}))}
                for c in clouds]


def _rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float32)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- demo solids
# One solid per demo shape (mmpt.data.concepts.SHAPES order): circle, square, triangle, diamond, star, cross,
# ring, hexagon -> sphere, cube, cone, octahedron, star prism, 3D cross, torus, hexagonal prism. Each
# samples its surface from uniform numbers u (N, 3) in [0, 1), vectorised over every cloud of that shape.

def _sphere(u: np.ndarray) -> np.ndarray:
    z = 2 * u[:, 0] - 1
    phi = 2 * math.pi * u[:, 1]
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), z, r * np.sin(phi)], -1)


def _box(u: np.ndarray) -> np.ndarray:
    """The surface of the cube [-1, 1]^3."""
    face = (u[:, 2] * 6).astype(np.int64)
    a, b = 2 * u[:, 0] - 1, 2 * u[:, 1] - 1
    sign = np.where(face % 2 == 0, 1.0, -1.0)
    axis = face // 2
    out = np.empty((len(u), 3))
    out[np.arange(len(u)), axis] = sign
    out[np.arange(len(u)), (axis + 1) % 3] = a
    out[np.arange(len(u)), (axis + 2) % 3] = b
    return out


def _cube(u: np.ndarray) -> np.ndarray:
    return _box(u) / math.sqrt(3)  # corners on the unit sphere, like every solid's extent


def _cone(u: np.ndarray) -> np.ndarray:
    base = u[:, 2] < 0.3
    phi = 2 * math.pi * u[:, 0]
    h = np.where(base, 0.0, 1 - np.sqrt(u[:, 1]))  # side: area grows towards the base
    r = np.where(base, np.sqrt(u[:, 1]), 1 - h)
    return np.stack([0.8 * r * np.cos(phi), 1.6 * h - 0.6, 0.8 * r * np.sin(phi)], -1)


def _octahedron(u: np.ndarray) -> np.ndarray:
    a, b = u[:, 0], u[:, 1]
    fold = a + b > 1
    a, b = np.where(fold, 1 - a, a), np.where(fold, 1 - b, b)
    face = (u[:, 2] * 8).astype(np.int64)
    signs = np.stack([(face & 1) * 2 - 1, (face >> 1 & 1) * 2 - 1, (face >> 2 & 1) * 2 - 1], -1)
    return np.stack([a, b, 1 - a - b], -1) * signs


def _polygon_prism(u: np.ndarray, radii: np.ndarray, depth: float) -> np.ndarray:
    """A prism over the closed polygon with vertex radii ``radii`` at even angles: side walls and caps."""
    k = len(radii)
    angles = 2 * math.pi * np.arange(k) / k
    verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)
    cap = u[:, 2] < 0.5
    edge = (u[:, 0] * k).astype(np.int64) % k
    t = u[:, 0] * k - np.floor(u[:, 0] * k)
    wall = verts[edge] + t[:, None] * (verts[(edge + 1) % k] - verts[edge])
    # cap: a point of the triangle (centre, v_i, v_i+1), folded into it
    s, r = u[:, 1], (u[:, 2] * 2) % 1
    fold = s + r > 1
    s, r = np.where(fold, 1 - s, s), np.where(fold, 1 - r, r)
    fill = s[:, None] * verts[edge] + r[:, None] * verts[(edge + 1) % k]
    xy = np.where(cap[:, None], fill, wall)
    z = np.where(cap, np.where(u[:, 1] * 7 % 1 < 0.5, depth, -depth), (2 * u[:, 1] - 1) * depth)
    return np.stack([xy[:, 0], xy[:, 1], z], -1)


def _star(u: np.ndarray) -> np.ndarray:
    return _polygon_prism(u, np.tile([1.0, 0.42], 5), 0.25)


def _hexagon(u: np.ndarray) -> np.ndarray:
    return _polygon_prism(u, np.ones(6), 0.35)


def _cross(u: np.ndarray) -> np.ndarray:
    bar = (u[:, 2] * 3).astype(np.int64)
    box = _box(u) * np.array([0.94, 0.235, 0.235])  # a long bar along x, rolled onto each axis
    rows = np.arange(len(u))[:, None]
    return box[rows, (np.arange(3) - bar[:, None]) % 3]


def _torus(u: np.ndarray) -> np.ndarray:
    phi, theta = 2 * math.pi * u[:, 0], 2 * math.pi * u[:, 1]
    ring = 0.72 + 0.28 * np.cos(theta)
    return np.stack([ring * np.cos(phi), 0.28 * np.sin(theta), ring * np.sin(phi)], -1)


SOLIDS = (_sphere, _cube, _cone, _octahedron, _star, _cross, _torus, _hexagon)


def render_solids(concepts: DemoConcepts, num_points: int, channels: str, rng: np.random.Generator) -> list[np.ndarray]:
    """(num_points, C) float16 clouds of the concepts' solids in the ``channels`` layout: scaled by size,
    randomly rotated about the up axis, rgb from the colour, normals as the direction from the centre."""
    n = len(concepts)
    shape, color, size = (np.asarray(a, np.int64) for a in (concepts.shape, concepts.color, concepts.size))
    xyz = np.empty((n, num_points, 3))
    for s, solid in enumerate(SOLIDS):
        rows = np.flatnonzero(shape == s)
        if len(rows):
            xyz[rows] = solid(rng.random((len(rows) * num_points, 3))).reshape(len(rows), num_points, 3)
    rot = np.stack([_rotation_y(a) for a in rng.uniform(0, 2 * math.pi, n)])
    xyz = np.einsum("bnj,bij->bni", xyz, rot)
    scale = np.array(list(SIZES.values()))[size] * rng.uniform(0.95, 1.05, n)
    xyz = xyz * scale[:, None, None] + rng.normal(0, 0.005, xyz.shape)
    parts = [xyz]
    if "rgb" in channels:
        rgb = np.array(list(COLORS.values()), np.float64)[color] / 255
        parts.append(np.clip(rgb[:, None, :] + rng.normal(0, 0.02, (n, num_points, 3)), 0, 1))
    if channels.endswith("normal"):
        parts.append(xyz / np.maximum(np.linalg.norm(xyz, axis=-1, keepdims=True), 1e-8))
    return list(np.concatenate(parts, -1).astype(np.float16))
