"""A simulated scintillation detector with six faces of photosensors (seed 002), with known truth.

Geometry (lengths in cm, energies in MeV, counts in photoelectrons)
------------------------------------------------------------------
The scintillator fills the box ``0 <= x <= depth``, ``|y| <= height / 2``, ``|z| <= length / 2``
(``x``: depth from the inner face, ``y``: vertical, ``z``: along the beam). With the defaults
(``pitch_inner = 1.5``): ``height = 93 * 1.5 = 139.5``, ``length = 44 * 1.5 = 66``, ``depth = 38.4``.
Sensors cover six faces; a face's image has rows and columns as listed:

==============  ============  ==========================  =========================================
face            plane         sensors (rows x cols)       sensor
==============  ============  ==========================  =========================================
``inner``       x = 0         93 (y) x 44 (z)             1.5 cm squares that tile the face
``outer``       x = depth     24 (y) x 9 (z)              5 cm squares centred in their cells
``upstream``    z = -length/2 24 (y) x 6 (x)              5 cm squares centred in their cells
``downstream``  z = +length/2 24 (y) x 6 (x)              5 cm squares centred in their cells
``top``         y = +height/2 hexagonal lattice in (x,z)  regular hexagons, circumradius 2.8 cm
``bottom``      y = -height/2 the same lattice            the same hexagons
==============  ============  ==========================  =========================================

Rows run along the first named axis from its low end, columns along the second. The hexagonal
lattice (pitch 6.2 cm, rows along ``z``, odd rows shifted by half a pitch in ``x``) keeps the nodes
whose hexagon lies inside the face with 0.5 cm to spare; its graph joins nodes closer than 1.1
pitches (the six lattice neighbours). The flat sensor order is ``inner, outer, upstream, downstream,
top, bottom``, each face row-major (hexagonal faces in lattice order); ``face_slices`` locates them.

Physics
-------
An event deposits energy ``E`` at ``(x, y, z)``. Sensor ``i`` expects
``mu_i = E * light_yield * Omega_i / (4 pi) * exp(-r_i / attenuation_length)`` photoelectrons, where
``Omega_i`` is the exact solid angle of the sensor's surface seen from the deposit (rectangle: the
four-corner ``atan`` formula; hexagon: six triangles by Van Oosterom & Strackee) and ``r_i`` the
distance to the sensor's centre. ``light_yield`` is photoelectrons per MeV emitted into 4 pi
(detection efficiency included). The observed count is ``N ~ Poisson(mu_i)``; with
``gain_smearing = s > 0`` each photoelectron has gain ``1 + s * normal``, so the observed charge is
``N + s * sqrt(N) * normal`` (exactly the sum of ``N`` such gains). The true mean is ``mu_i`` and the
true variance ``mu_i * (1 + s**2)``. A fixed map of dead sensors (``dead_fraction`` of every face,
drawn from ``dead_seed``) reads zero. Events: ``E ~ U(energy_range)``, the position uniform in the
box shrunk by ``margin`` on every side.

Everything is vectorized torch and deterministic by seed: events come in chunks of
``CHUNK_EVENTS``, chunk ``k`` drawn from a generator seeded by ``(seed, k)``, so the first ``n``
events of a larger draw are the same ``n`` events.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

FACE_NAMES = ("inner", "outer", "upstream", "downstream", "top", "bottom")
RECT_FACES = FACE_NAMES[:4]
HEX_FACES = FACE_NAMES[4:]
TARGET_NAMES = ("energy", "x", "y", "z")  # MeV, cm, cm, cm
CHUNK_EVENTS = 2048  # events per generator (fixes the random streams)
_BLOCK_EVENTS = 256  # events per vectorized solid-angle evaluation (a speed choice only)
_AXIS = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class RectFace:
    """A planar face of ``rows x cols`` rectangular sensors in the plane ``axis = plane``.

    ``row_lo/row_hi`` ([rows]) and ``col_lo/col_hi`` ([cols]) are each sensor's extent along the
    row axis and the column axis. ``normal`` (+1/-1) points into the scintillator.
    """

    name: str
    axis: int
    plane: float
    normal: int
    row_axis: int
    col_axis: int
    row_lo: torch.Tensor
    row_hi: torch.Tensor
    col_lo: torch.Tensor
    col_hi: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.row_lo), len(self.col_lo))

    @property
    def num_sensors(self) -> int:
        return self.shape[0] * self.shape[1]

    def centers(self) -> torch.Tensor:
        """Sensor centres ``[rows * cols, 3]`` (row-major)."""
        rows, cols = self.shape
        out = torch.empty(rows, cols, 3, dtype=torch.float64)
        out[..., self.axis] = self.plane
        out[..., self.row_axis] = ((self.row_lo + self.row_hi) / 2)[:, None]
        out[..., self.col_axis] = ((self.col_lo + self.col_hi) / 2)[None, :]
        return out.reshape(-1, 3)


@dataclass(frozen=True)
class HexFace:
    """A planar face of regular hexagonal sensors at ``positions [N, 2]`` (the in-plane axes
    ``plane_axes``), circumradius ``radius``, joined by the undirected ``edges [E, 2]`` (i < j)."""

    name: str
    axis: int
    plane: float
    normal: int
    plane_axes: tuple[int, int]
    positions: torch.Tensor
    radius: float
    edges: torch.Tensor

    @property
    def num_sensors(self) -> int:
        return len(self.positions)

    def centers(self) -> torch.Tensor:
        out = torch.empty(self.num_sensors, 3, dtype=torch.float64)
        out[:, self.axis] = self.plane
        out[:, self.plane_axes[0]] = self.positions[:, 0]
        out[:, self.plane_axes[1]] = self.positions[:, 1]
        return out

    def vertices(self) -> torch.Tensor:
        """Hexagon corners ``[N, 6, 2]`` in the plane coordinates, counter-clockwise."""
        angles = torch.arange(6, dtype=torch.float64) * (math.pi / 3)
        corner = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1) * self.radius
        return self.positions[:, None, :] + corner[None]

    def adjacency(self) -> torch.Tensor:
        """``[N, N]`` bool adjacency of the lattice graph (no self-loops)."""
        adj = torch.zeros(self.num_sensors, self.num_sensors, dtype=torch.bool)
        adj[self.edges[:, 0], self.edges[:, 1]] = True
        adj[self.edges[:, 1], self.edges[:, 0]] = True
        return adj


def _check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return int(value) if integer else float(value)


def _cells(
    count: int, extent: float, start: float, active: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` cells tiling ``[start, start + extent]``; each sensor ``active`` wide and centred
    in its cell (None: the whole cell)."""
    pitch = extent / count
    centre = start + pitch * (torch.arange(count, dtype=torch.float64) + 0.5)
    half = pitch / 2 if active is None else min(active, pitch) / 2
    return centre - half, centre + half


def _hex_lattice(width: float, length: float, pitch: float, radius: float, spare: float) -> torch.Tensor:
    """Lattice nodes ``[N, 2]`` (x in ``[0, width]``, z in ``[-length/2, length/2]``) whose hexagon fits."""
    row_step = pitch * math.sqrt(3) / 2
    reach = radius + spare
    nodes = []
    n_rows = int(length // row_step) + 2
    n_cols = int(width // pitch) + 2
    z0 = -(n_rows - 1) * row_step / 2
    x0 = (width - (n_cols - 1) * pitch) / 2
    for j in range(n_rows):
        z = z0 + j * row_step
        for i in range(n_cols):
            x = x0 + i * pitch + (pitch / 2 if j % 2 else 0.0) - pitch / 4
            if reach <= x <= width - reach and -length / 2 + reach <= z <= length / 2 - reach:
                nodes.append((x, z))
    return torch.tensor(nodes, dtype=torch.float64)


def _triangle_solid_angle(r1: torch.Tensor, r2: torch.Tensor, r3: torch.Tensor) -> torch.Tensor:
    """Signed solid angle of triangles ``(r1, r2, r3)`` (vectors from the viewpoint, ``[..., 3]``)
    by Van Oosterom & Strackee (1983): ``tan(O/2) = r1.(r2 x r3) / (|r1||r2||r3| + (r1.r2)|r3| +
    (r1.r3)|r2| + (r2.r3)|r1|)``."""
    n1, n2, n3 = r1.norm(dim=-1), r2.norm(dim=-1), r3.norm(dim=-1)
    triple = (r1 * torch.linalg.cross(r2, r3, dim=-1)).sum(-1)
    denom = n1 * n2 * n3 + (r1 * r2).sum(-1) * n3 + (r1 * r3).sum(-1) * n2 + (r2 * r3).sum(-1) * n1
    return 2.0 * torch.atan2(triple, denom)


class EventBatch(NamedTuple):
    params: torch.Tensor  # [N, 4]: energy (MeV), x, y, z (cm)
    expected: torch.Tensor  # [N, S]: the true mean count of every sensor
    observed: torch.Tensor  # [N, S]: the observed count (dead sensors read 0)
    variance: torch.Tensor  # [N, S]: the true variance of the observed count


@dataclass(frozen=True)
class Detector:
    """The detector: geometry, physics constants and the fixed dead-sensor map (module docstring).

    Construct with keyword arguments to change any constant; the defaults need no files.
    """

    inner_shape: tuple[int, int] = (93, 44)
    outer_shape: tuple[int, int] = (24, 9)
    side_shape: tuple[int, int] = (24, 6)
    pitch_inner: float = 1.5  # cm
    depth: float = 38.4  # cm
    pmt_size: float = 5.0  # cm, outer/upstream/downstream square sensors
    hex_pitch: float = 6.2  # cm
    hex_radius: float = 2.8  # cm
    light_yield: float = 2000.0  # photoelectrons per MeV into 4 pi
    attenuation_length: float = 100.0  # cm; math.inf disables attenuation
    gain_smearing: float = 0.0  # relative gain spread per photoelectron
    energy_range: tuple[float, float] = (1.0, 10.0)  # MeV
    margin: float = 1.0  # cm kept free of deposits at every wall
    dead_fraction: float = 0.02
    dead_seed: int = 12345
    faces: dict = field(init=False, repr=False, compare=False)
    dead: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("inner_shape", "outer_shape", "side_shape"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(f"{name} must be a (rows, cols) pair of ints, got {value!r}")
            for v in value:
                _check_positive(name, v, integer=True)
        for name in ("pitch_inner", "depth", "pmt_size", "hex_pitch", "hex_radius", "light_yield"):
            _check_positive(name, getattr(self, name))
        att = self.attenuation_length
        if isinstance(att, bool) or not isinstance(att, numbers.Real) or not att > 0:
            raise ValueError(f"attenuation_length must be > 0 (math.inf: none), got {att!r}")
        _check_positive("gain_smearing", self.gain_smearing, allow_zero=True)
        _check_positive("margin", self.margin, allow_zero=True)
        lo, hi = self.energy_range
        if not 0 < _check_positive("energy_range", lo) < _check_positive("energy_range", hi):
            raise ValueError(f"energy_range must be (low, high) with 0 < low < high, got {self.energy_range}")
        if not 0.0 <= float(self.dead_fraction) < 1.0:
            raise ValueError(f"dead_fraction must be in [0, 1), got {self.dead_fraction}")
        if self.hex_radius * math.sqrt(3) > self.hex_pitch:
            raise ValueError(
                f"hex_radius must leave the hexagons apart: radius * sqrt(3) <= hex_pitch, got "
                f"{self.hex_radius} and {self.hex_pitch}"
            )
        if 2 * self.margin >= min(self.depth, self.height, self.length):
            raise ValueError(f"margin must be < half the smallest box side, got {self.margin}")
        faces: dict = {}
        h, length, d = self.height, self.length, self.depth
        rows, cols = self.inner_shape
        faces["inner"] = RectFace(
            "inner", 0, 0.0, 1, 1, 2, *_cells(rows, h, -h / 2, None), *_cells(cols, length, -length / 2, None)
        )
        rows, cols = self.outer_shape
        faces["outer"] = RectFace(
            "outer", 0, d, -1, 1, 2, *_cells(rows, h, -h / 2, self.pmt_size),
            *_cells(cols, length, -length / 2, self.pmt_size),
        )  # fmt: skip
        rows, cols = self.side_shape
        for name, plane, normal in (("upstream", -length / 2, 1), ("downstream", length / 2, -1)):
            faces[name] = RectFace(
                name, 2, plane, normal, 1, 0, *_cells(rows, h, -h / 2, self.pmt_size),
                *_cells(cols, d, 0.0, self.pmt_size),
            )  # fmt: skip
        nodes = _hex_lattice(d, length, self.hex_pitch, self.hex_radius, 0.5)
        if len(nodes) < 2:
            raise ValueError("the hexagonal faces hold fewer than two sensors; reduce hex_pitch")
        dist = torch.cdist(nodes, nodes)
        i, j = torch.nonzero(torch.triu(dist < 1.1 * self.hex_pitch, diagonal=1), as_tuple=True)
        edges = torch.stack([i, j], dim=1)
        for name, plane, normal in (("top", h / 2, -1), ("bottom", -h / 2, 1)):
            faces[name] = HexFace(name, 1, plane, normal, (0, 2), nodes, self.hex_radius, edges)
        object.__setattr__(self, "faces", faces)
        gen = torch.Generator().manual_seed(int(self.dead_seed))
        dead = torch.zeros(self.num_sensors, dtype=torch.bool)
        for sl in self.face_slices.values():
            n = sl.stop - sl.start
            k = int(round(self.dead_fraction * n))
            if k:
                dead[sl.start + torch.randperm(n, generator=gen)[:k]] = True
        object.__setattr__(self, "dead", dead)

    # ------------------------------------------------------------------------------- geometry
    @property
    def height(self) -> float:
        return self.inner_shape[0] * self.pitch_inner

    @property
    def length(self) -> float:
        return self.inner_shape[1] * self.pitch_inner

    @property
    def face_sizes(self) -> dict[str, int]:
        return {name: face.num_sensors for name, face in self.faces.items()}

    @property
    def face_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name in FACE_NAMES:
            n = self.faces[name].num_sensors
            out[name] = slice(start, start + n)
            start += n
        return out

    @property
    def num_sensors(self) -> int:
        return sum(self.face_sizes.values())

    @property
    def live(self) -> torch.Tensor:
        return ~self.dead

    def sensor_positions(self) -> torch.Tensor:
        """Centres of all sensors ``[S, 3]`` in the flat order (float64, cm)."""
        return torch.cat([self.faces[name].centers() for name in FACE_NAMES])

    def split_faces(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat [..., S]`` as ``{face: [..., rows, cols]}`` (rectangular) / ``[..., N]`` (hexagonal)."""
        if flat.shape[-1] != self.num_sensors:
            raise ValueError(
                f"flat must have {self.num_sensors} sensors in its last dim, got {list(flat.shape)}"
            )
        out = {}
        for name, sl in self.face_slices.items():
            part = flat[..., sl]
            face = self.faces[name]
            out[name] = part.reshape(*part.shape[:-1], *face.shape) if isinstance(face, RectFace) else part
        return out

    def join_faces(self, faces: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of ``split_faces``."""
        parts = []
        for name in FACE_NAMES:
            t = faces[name]
            parts.append(t.flatten(-2) if isinstance(self.faces[name], RectFace) else t)
        return torch.cat(parts, dim=-1)

    def target_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offset, scale)`` ``[4]`` mapping the event parameters' ranges to about ``[-1, 1]``."""
        lo, hi = self.energy_range
        offset = torch.tensor([(lo + hi) / 2, self.depth / 2, 0.0, 0.0])
        scale = torch.tensor([(hi - lo) / 2, self.depth / 2, self.height / 2, self.length / 2])
        return offset, scale

    # -------------------------------------------------------------------------------- physics
    def solid_angles(self, positions: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Exact solid angle (sr) of every sensor seen from ``positions [N, 3]`` (cm): ``[N, S]``,
        computed in ``dtype`` (float32 is faster but the four-corner differences of far sensors
        lose up to ~3e-6 sr to rounding)."""
        pos = positions.to(dtype)
        parts = []
        for name in FACE_NAMES:
            face = self.faces[name]
            dist = ((pos[:, face.axis] - face.plane) * face.normal).clamp_min(1e-9)  # [N]
            if isinstance(face, RectFace):
                parts.append(self._rect_solid_angle(face, pos, dist).flatten(1))
            else:
                parts.append(self._hex_solid_angle(face, pos, dist))
        return torch.cat(parts, dim=1)

    @staticmethod
    def _rect_solid_angle(face: RectFace, pos: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        # Omega of [a1, a2] x [b1, b2] at height d over the origin: F(a2,b2) - F(a1,b2) - F(a2,b1) +
        # F(a1,b1), F(a, b) = atan(a b / (d sqrt(a^2 + b^2 + d^2))). F is evaluated once per edge pair
        # (the sorted edges hold each sensor's low and high edge next to each other, so the double
        # difference of F along both axes, taken at each sensor's low edges, is its solid angle).
        dtype = pos.dtype
        a_edges, a_idx = torch.unique(torch.cat([face.row_lo, face.row_hi]), return_inverse=True)
        b_edges, b_idx = torch.unique(torch.cat([face.col_lo, face.col_hi]), return_inverse=True)
        rows, cols = face.shape
        a = (a_edges.to(dtype)[None, :] - pos[:, face.row_axis, None])[:, :, None]  # [N, A, 1]
        b = (b_edges.to(dtype)[None, :] - pos[:, face.col_axis, None])[:, None, :]  # [N, 1, B]
        d = dist[:, None, None]
        f = torch.atan(a * b / (d * torch.sqrt(a * a + b * b + d * d)))  # [N, A, B]
        dd = torch.diff(torch.diff(f, dim=1), dim=2)  # [N, A - 1, B - 1]
        lo_r, lo_c = a_idx[:rows], b_idx[:cols]
        if len(lo_r) != dd.shape[1]:
            dd = dd.index_select(1, lo_r)
        if len(lo_c) != dd.shape[2]:
            dd = dd.index_select(2, lo_c)
        return dd

    @staticmethod
    def _hex_solid_angle(face: HexFace, pos: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        # Six triangles (centre, v_k, v_k+1) by Van Oosterom & Strackee. Every corner lies in the
        # face's plane at height d over the deposit, so with in-plane offsets (u, v) from the foot of
        # the perpendicular: r = (u, v, d), r_i . r_j = u_i u_j + v_i v_j + d^2, and the triple
        # product is d times twice the triangle's (fixed) area.
        dtype = pos.dtype
        ax_u, ax_v = face.plane_axes
        pts = torch.cat([face.positions[:, None, :], face.vertices()], dim=1).to(dtype)  # [H, 7, 2]
        u = pts[None, :, :, 0] - pos[:, ax_u, None, None]  # [N, H, 7]
        v = pts[None, :, :, 1] - pos[:, ax_v, None, None]
        d2 = (dist * dist)[:, None, None]
        norm = torch.sqrt(u * u + v * v + d2)
        uc, vc, nc = u[..., :1], v[..., :1], norm[..., :1]
        u1, v1, n1 = u[..., 1:], v[..., 1:], norm[..., 1:]
        u2, v2, n2 = u1.roll(-1, dims=-1), v1.roll(-1, dims=-1), n1.roll(-1, dims=-1)
        dot_c1 = uc * u1 + vc * v1 + d2
        dot_c2 = uc * u2 + vc * v2 + d2
        dot_12 = u1 * u2 + v1 * v2 + d2
        twice_area = 1.5 * math.sqrt(3) * face.radius**2 / 3  # each of the six triangles
        triple = dist[:, None, None] * twice_area
        denom = nc * n1 * n2 + dot_c1 * n2 + dot_c2 * n1 + dot_12 * nc
        return (2.0 * torch.atan2(triple.expand_as(denom), denom)).sum(-1)

    def distances(self, positions: torch.Tensor) -> torch.Tensor:
        """Distance (cm) from ``positions [N, 3]`` to every sensor centre: ``[N, S]``."""
        return torch.cdist(positions.to(torch.float32), self.sensor_positions().to(torch.float32))

    def expected_counts(self, params: torch.Tensor) -> torch.Tensor:
        """The true mean count ``[N, S]`` (float32) of events ``params [N, 4]`` = (E, x, y, z)."""
        if params.dim() != 2 or params.shape[1] != 4:
            raise ValueError(f"params must have shape [N, 4] (E, x, y, z), got {list(params.shape)}")
        params = params.to(torch.float32)
        pos = params[:, 1:]
        mu = self.solid_angles(pos).to(torch.float32).mul_(params[:, :1] * (self.light_yield / (4 * math.pi)))
        if math.isfinite(self.attenuation_length):
            mu.mul_(torch.exp(self.distances(pos).div_(-self.attenuation_length)))
        return mu.clamp_min_(0.0)

    def true_variance(self, expected: torch.Tensor) -> torch.Tensor:
        """The true variance of the observed count given its mean: ``mu * (1 + gain_smearing**2)``."""
        return expected * (1.0 + self.gain_smearing**2)

    def sample_params(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` events ``[n, 4]`` (E, x, y, z): E uniform in ``energy_range``, position uniform
        in the box shrunk by ``margin``."""
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        m = self.margin
        lo = torch.tensor([self.energy_range[0], m, -self.height / 2 + m, -self.length / 2 + m])
        hi = torch.tensor([self.energy_range[1], self.depth - m, self.height / 2 - m, self.length / 2 - m])
        return (lo + (hi - lo) * u).to(torch.float32)

    def observe(self, expected: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Poisson counts (with gain smearing when set) of ``expected [N, S]``; dead sensors read 0."""
        counts = torch.poisson(expected, generator=generator)
        if self.gain_smearing > 0:
            noise = torch.randn(counts.shape, generator=generator)
            counts = counts + self.gain_smearing * counts.sqrt() * noise
        return counts.masked_fill_(self.dead, 0.0)

    def simulate(self, n: int, seed: int = 0) -> EventBatch:
        """``n`` events, deterministic by ``seed`` (module docstring): params, true means, observed
        counts and true variances."""
        n = _check_positive("n", n, integer=True, allow_zero=True)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        params, expected, observed = [], [], []
        for k, start in enumerate(range(0, n, CHUNK_EVENTS)):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
            p = self.sample_params(CHUNK_EVENTS, gen)[: n - start]
            # Cache-sized blocks: the same numbers, several times faster than one large block.
            mu = torch.cat([self.expected_counts(block) for block in p.split(_BLOCK_EVENTS)])
            params.append(p)
            expected.append(mu)
            observed.append(self.observe(mu, gen))
        if not params:
            empty = torch.zeros(0, self.num_sensors)
            return EventBatch(torch.zeros(0, 4), empty, empty.clone(), empty.clone())
        mu = torch.cat(expected)
        return EventBatch(torch.cat(params), mu, torch.cat(observed), self.true_variance(mu))

    # --------------------------------------------------------------------------------- masks
    def random_mask(
        self, batch: int, ratio: float = 0.6, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """A pretraining mask ``[batch, S]`` bool: exactly ``round(ratio * n_live)`` of each
        face's live sensors are masked per event (dead sensors are never in it)."""
        if not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        scores = torch.rand(batch, self.num_sensors, generator=generator)
        scores = scores.masked_fill(self.dead, 2.0)  # dead sensors rank last
        mask = torch.zeros(batch, self.num_sensors, dtype=torch.bool)
        for sl in self.face_slices.values():
            live = int(self.live[sl].sum())
            k = min(live - 1, max(1, round(ratio * live)))
            ranks = scores[:, sl].argsort(dim=1).argsort(dim=1)
            mask[:, sl] = ranks < k
        return mask.to(device) if device is not None else mask

    def neighbours(self) -> torch.Tensor:
        """Neighbour table ``[S, 8]`` int64 of flat sensor indices (-1 pads): the 8 surrounding
        sensors within a rectangular face, the graph neighbours on a hexagonal face."""
        table = torch.full((self.num_sensors, 8), -1, dtype=torch.long)
        for name, sl in self.face_slices.items():
            face = self.faces[name]
            if isinstance(face, RectFace):
                rows, cols = face.shape
                r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
                r, c = r.flatten(), c.flatten()
                k = 0
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        if dr == 0 and dc == 0:
                            continue
                        rr, cc = r + dr, c + dc
                        ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
                        table[sl, k] = torch.where(ok, sl.start + rr * cols + cc, -1)
                        k += 1
            else:
                adj = face.adjacency()
                for i in range(face.num_sensors):
                    nb = torch.nonzero(adj[i]).flatten()[:8]
                    table[sl.start + i, : len(nb)] = sl.start + nb
        return table

    def neighbour_average(self, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The mean of each sensor's visible neighbours (``neighbours()``), ``[B, S]``; a sensor
        with none visible gets the mean of its face's visible sensors."""
        table = self.neighbours().to(values.device)
        valid = table >= 0
        idx = table.clamp_min(0)
        vis = visible.to(values.dtype)
        num = (values * vis)[:, idx].mul(valid).sum(-1)
        den = vis[:, idx].mul(valid).sum(-1)
        out = num / den.clamp_min(1.0)
        for sl in self.face_slices.values():
            face_mean = (values[:, sl] * vis[:, sl]).sum(1, keepdim=True) / vis[:, sl].sum(
                1, keepdim=True
            ).clamp_min(1)
            out[:, sl] = torch.where(den[:, sl] > 0, out[:, sl], face_mean)
        return out


DEFAULT_EVENTS = {"train": 4000, "test": 1000}


class DetectorEvents(Dataset):
    """``num_events`` simulated events held in memory; item ``i`` is ``(counts [S] float32,
    params [4] float32 (E MeV, x, y, z cm), live [S] bool)``. ``true_mean(indices)`` /
    ``true_variance(indices)`` recompute the truth of any events."""

    def __init__(self, num_events: int, seed: int = 0, detector: Detector | None = None):
        self.detector = detector if detector is not None else Detector()
        self.seed = int(seed)
        events = self.detector.simulate(num_events, self.seed)
        self.params = events.params
        self.counts = events.observed
        self.live = self.detector.live
        sensors = self.detector.num_sensors
        self.describe = f"simulated detector events (n={num_events}, seed={self.seed}, {sensors} sensors)"

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int):
        return self.counts[index], self.params[index], self.live

    def true_mean(self, indices) -> torch.Tensor:
        return self.detector.expected_counts(self.params[indices].reshape(-1, 4))

    def true_variance(self, indices) -> torch.Tensor:
        return self.detector.true_variance(self.true_mean(indices))


def build_detector_dataset(split: str, num_samples: int | None = None, seed: int = 0) -> DetectorEvents:
    """The ``detector`` dataset of ``fastvision.data.build_dataset``: train and test draw disjoint
    seeds (``2 * seed`` and ``2 * seed + 1``)."""
    n = num_samples if num_samples is not None else DEFAULT_EVENTS[split]
    return DetectorEvents(n, seed=2 * int(seed) + (split == "test"))


__all__ = [
    "CHUNK_EVENTS",
    "FACE_NAMES",
    "HEX_FACES",
    "RECT_FACES",
    "TARGET_NAMES",
    "Detector",
    "DetectorEvents",
    "EventBatch",
    "HexFace",
    "RectFace",
    "build_detector_dataset",
]
