"""Procedural indoor scenes and a vectorised numpy ray caster.

One ray cast per image gives every geometric buffer (distance, normals, curvature, surface ids, albedo,
shading), so all synthetic Taskonomy domains derived from it are consistent with each other.

Frames: the world is y-up and the room spans [0, W] x [0, H] x [0, D]. Pixel rays follow the pinhole
model of :func:`camera_intrinsics` (x right, y down, z forward). Normals are returned in the camera frame
x right, y up, z towards the viewer, so a wall facing the camera is (0, 0, 1) and the floor is (0, 1, 0)
when the camera looks horizontally.

Curvature sign: principal curvatures (k1 >= k2, in 1/m) are negative on convex surfaces (spheres,
cylinders, the rounded edges of boxes) and positive on concave ones (the room's inner corners). Box and
room edges count as rounded with radius ``BEVEL_M``.
"""
from dataclasses import dataclass, field

import numpy as np

FOV_DEGREES = 60.0
BEVEL_M = 0.04
_EPS = 1e-4
_NEAR = 0.05
_UNIT_ATTENUATION_M = 4.0

# Taskonomy's semantic ids: 0 uncertain (no geometry here), 1 background, 2..17 COCO classes.
BACKGROUND = 1
BOTTLE, CHAIR, COUCH, POTTED_PLANT, BED, DINING_TABLE, TOILET, TV = range(2, 10)
MICROWAVE, OVEN, TOASTER, SINK, REFRIGERATOR, BOOK, CLOCK, VASE = range(10, 18)


def camera_intrinsics(size):
    """3x3 pinhole matrix shared by every synthetic image of this size (pixel centres at index + 0.5)."""
    focal = 0.5 * size / np.tan(np.radians(FOV_DEGREES) / 2)
    centre = size / 2
    return np.array([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]])


def hsv(hue, saturation, value):
    """One RGB colour (3,) from HSV in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


@dataclass
class Material:
    """Procedural albedo: two colours mixed by a pattern evaluated on local 3-D coordinates."""

    color_a: np.ndarray
    color_b: np.ndarray
    pattern: str  # plain | stripes | checker | planks | tiles
    frequency: float  # pattern cycles per metre
    axis: int  # main pattern axis (planks, stripes)
    noise_waves: np.ndarray  # (K, 3) wave vectors of a smooth sum-of-sines noise
    noise_phase: np.ndarray  # (K,)
    noise_amp: float

    def albedo(self, q):
        """Albedo (3, N) in [0, 1] at local coordinates q (3, N)."""
        qa = q[self.axis] * self.frequency
        if self.pattern == "stripes":
            mix = np.clip(3.0 * np.sin(2 * np.pi * qa), -1.0, 1.0) * 0.5 + 0.5
        elif self.pattern == "checker":
            cells = np.floor(q * self.frequency + 0.25).sum(axis=0)
            mix = np.mod(cells, 2.0)
        elif self.pattern == "planks":
            plank = np.floor(qa)
            mix = np.mod(np.sin(plank * 12.9898 + 4.1) * 43758.5453, 1.0)
            mix = mix * 0.7 + 0.3 * (np.abs(qa - plank - 0.5) > 0.47)
        elif self.pattern == "tiles":
            frac = np.abs(np.mod(q * self.frequency, 1.0) - 0.5)
            grout = frac[[a for a in range(3) if a != 1]].max(axis=0) > 0.45
            mix = grout.astype(q.dtype)
        else:
            mix = np.zeros_like(qa)
        noise = sum(  # explicit sums: BLAS is slow for an inner dimension of 3
            np.sin(q[0] * float(w[0]) + q[1] * float(w[1]) + q[2] * float(w[2]) + float(phase))
            for w, phase in zip(self.noise_waves, self.noise_phase)
        )
        shade = 1.0 + (self.noise_amp / len(self.noise_phase)) * noise
        color_a, color_b = (c[:, None].astype(q.dtype) for c in (self.color_a, self.color_b))
        return np.clip((color_a + (color_b - color_a) * mix) * shade, 0.0, 1.0)


def random_material(rng, color_a, color_b=None, pattern="plain", frequency=4.0, axis=0, noise_amp=0.15):
    """A Material with random smooth noise (2-8 cycles/m) over the given colours and pattern."""
    waves = rng.normal(size=(3, 3))
    waves *= (rng.uniform(2.0, 8.0, size=3) * 2 * np.pi / np.linalg.norm(waves, axis=1))[:, None]
    return Material(
        np.asarray(color_a, float), np.asarray(color_a if color_b is None else color_b, float), pattern,
        float(frequency), int(axis), waves, rng.uniform(0, 2 * np.pi, size=3), float(noise_amp),
    )


@dataclass
class Box:
    """A box rotated by ``yaw`` about the vertical axis (local +z maps to world (sin yaw, 0, cos yaw))."""

    center: np.ndarray
    half: np.ndarray
    yaw: float
    label: int
    material: Material

    def _to_local(self, x, y, z):
        cos, sin = float(np.cos(self.yaw)), float(np.sin(self.yaw))
        return cos * x - sin * z, y, sin * x + cos * z

    def aabb(self):
        cos, sin = abs(np.cos(self.yaw)), abs(np.sin(self.yaw))
        ext = np.array([cos * self.half[0] + sin * self.half[2], self.half[1], sin * self.half[0] + cos * self.half[2]])
        return self.center - ext, self.center + ext

    def intersect(self, origin, dx, dy, dz):
        rel = origin - self.center
        lo = [float(v) for v in self._to_local(*rel)]
        ld = self._to_local(dx, dy, dz)
        near = far = None
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):
                inv = 1.0 / ld[a]
                t1 = (-float(self.half[a]) - lo[a]) * inv
                t2 = (float(self.half[a]) - lo[a]) * inv
                lo_t, hi_t = np.minimum(t1, t2), np.maximum(t1, t2)
                near = lo_t if near is None else np.maximum(near, lo_t)
                far = hi_t if far is None else np.minimum(far, hi_t)
            return np.where((near <= far) & (near > _EPS), near, np.inf)

    def surface(self, p):
        """World normals (3, N), curvatures k1, k2 (N,) and local texture coordinates (3, N) at points p."""
        q = np.stack(self._to_local(*(p - self.center[:, None].astype(p.dtype))))
        half = self.half[:, None].astype(p.dtype)
        axis = np.argmax(np.abs(q) / half, axis=0)
        cols = np.arange(q.shape[1])
        local_n = np.zeros_like(q)
        local_n[axis, cols] = np.sign(q[axis, cols])
        cos, sin = float(np.cos(self.yaw)), float(np.sin(self.yaw))
        normal = np.stack([cos * local_n[0] + sin * local_n[2], local_n[1], cos * local_n[2] - sin * local_n[0]])
        edge_gap = half - np.abs(q)
        edge_gap[axis, cols] = np.inf
        near_edges = (edge_gap < np.minimum(BEVEL_M, 0.5 * half)).sum(axis=0)
        k1 = np.where(near_edges == 2, -1.0 / BEVEL_M, 0.0)
        k2 = np.where(near_edges >= 1, -1.0 / BEVEL_M, 0.0)
        return normal, k1, k2, q


@dataclass
class Sphere:
    center: np.ndarray
    radius: float
    label: int
    material: Material

    def aabb(self):
        return self.center - self.radius, self.center + self.radius

    def intersect(self, origin, dx, dy, dz):
        rel = [float(v) for v in origin - self.center]
        b = dx * rel[0] + dy * rel[1] + dz * rel[2]
        disc = b * b - (sum(v * v for v in rel) - self.radius**2)
        t = -b - np.sqrt(np.maximum(disc, 0.0))
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def surface(self, p):
        q = p - self.center[:, None].astype(p.dtype)
        k = np.full(q.shape[1], -1.0 / self.radius)
        return q / self.radius, k, k, q


@dataclass
class Cylinder:
    """A capped cylinder whose axis is the world axis ``axis`` (0 x, 1 y, 2 z)."""

    center: np.ndarray
    radius: float
    half_length: float
    axis: int
    label: int
    material: Material

    def aabb(self):
        ext = np.full(3, self.radius)
        ext[self.axis] = self.half_length
        return self.center - ext, self.center + ext

    def intersect(self, origin, dx, dy, dz):
        d = (dx, dy, dz)
        rel = [float(v) for v in origin - self.center]
        i, j = [a for a in range(3) if a != self.axis]
        ax = self.axis
        with np.errstate(divide="ignore", invalid="ignore"):
            a = d[i] * d[i] + d[j] * d[j]
            b = d[i] * rel[i] + d[j] * rel[j]
            disc = b * b - a * (rel[i] ** 2 + rel[j] ** 2 - self.radius**2)
            t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            along = rel[ax] + t_side * d[ax]
            best = np.where((disc >= 0) & (t_side > _EPS) & (np.abs(along) <= self.half_length), t_side, np.inf)
            for cap in (-self.half_length, self.half_length):
                t_cap = (cap - rel[ax]) / d[ax]
                ri, rj = rel[i] + t_cap * d[i], rel[j] + t_cap * d[j]
                hit = (t_cap > _EPS) & (ri * ri + rj * rj <= self.radius**2)
                best = np.where(hit & (t_cap < best), t_cap, best)
        return best

    def surface(self, p):
        q = p - self.center[:, None].astype(p.dtype)
        i, j = [a for a in range(3) if a != self.axis]
        rho = np.sqrt(q[i] ** 2 + q[j] ** 2)
        cap_gap = self.half_length - np.abs(q[self.axis])
        on_cap = cap_gap < np.abs(rho - self.radius)
        normal = np.zeros_like(q)
        safe_rho = np.maximum(rho, 1e-6)
        normal[i] = np.where(on_cap, 0.0, q[i] / safe_rho)
        normal[j] = np.where(on_cap, 0.0, q[j] / safe_rho)
        normal[self.axis] = np.where(on_cap, np.sign(q[self.axis]), 0.0)
        bevel = min(BEVEL_M, 0.5 * self.radius, self.half_length)
        rim = np.where(on_cap, self.radius - rho, cap_gap) < bevel
        side_k = np.where(on_cap, 0.0, -1.0 / self.radius)
        rim_k = np.where(rim, -1.0 / BEVEL_M, 0.0)
        return normal, np.maximum(side_k, rim_k), np.minimum(side_k, rim_k), q


@dataclass
class Window:
    """A hole in a wall through which rays see no geometry (Taskonomy's invalid depth)."""

    wall: int  # room surface index (0, 1, 4, 5)
    u_range: tuple  # along the wall (z for x-walls, x for z-walls)
    v_range: tuple  # height


@dataclass
class Room:
    """The inside of the box [0, W] x [0, H] x [0, D]; surface s lies on axis s // 2, at the far side if s odd."""

    size: np.ndarray
    materials: list  # six Materials: x=0, x=W, floor, ceiling, z=0, z=D
    windows: list = field(default_factory=list)

    def intersect(self, origin, dx, dy, dz):
        """Distance to the room's inner surface (inf through windows) and the surface index hit."""
        with np.errstate(divide="ignore", invalid="ignore"):
            tx, ty, tz = (
                np.where(d != 0, (np.where(d > 0, float(self.size[a]), 0.0) - float(origin[a])) / d, np.inf)
                for a, d in enumerate((dx, dy, dz))
            )
        t = np.minimum(np.minimum(tx, ty), tz)
        surface = np.where(t == tx, np.where(dx > 0, 1, 0), np.where(t == ty, np.where(dy > 0, 3, 2), np.where(dz > 0, 5, 4)))
        surface = surface.astype(np.int16)
        direction = (dx, dy, dz)
        for window in self.windows:
            u_axis = 2 if window.wall < 2 else 0
            u = float(origin[u_axis]) + t * direction[u_axis]
            v = float(origin[1]) + t * dy
            inside = (surface == window.wall) & (u > window.u_range[0]) & (u < window.u_range[1])
            inside &= (v > window.v_range[0]) & (v < window.v_range[1])
            t = np.where(inside, np.inf, t)
        return t, surface

    def surface(self, index, p):
        axis, far_side = divmod(index, 2)
        normal = np.zeros_like(p)
        normal[axis] = -1.0 if far_side else 1.0
        size = self.size[:, None].astype(p.dtype)
        gap = np.minimum(p, size - p)
        gap[axis] = np.inf
        near_edges = (gap < BEVEL_M).sum(axis=0)
        k1 = np.where(near_edges >= 1, 1.0 / BEVEL_M, 0.0)
        k2 = np.where(near_edges == 2, 1.0 / BEVEL_M, 0.0)
        return normal, k1, k2, p


@dataclass
class Scene:
    room: Room
    primitives: list
    light: np.ndarray
    light_color: np.ndarray
    ambient: float
    exposure: float
    sky_top: np.ndarray
    sky_bottom: np.ndarray
    fixation: np.ndarray  # the "point" every view of this scene looks at
    groups: list  # (start, stop) ranges of primitives forming one furniture item


@dataclass
class Camera:
    position: np.ndarray
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray


@dataclass
class Render:
    """Per-pixel buffers of one ray-cast image (H x W), in float32 unless noted."""

    distance: np.ndarray  # euclidean distance along the ray, inf where no geometry
    zdepth: np.ndarray  # distance projected on the optical axis
    normal: np.ndarray  # (H, W, 3) camera-frame unit normals, 0 where invalid
    curvature: np.ndarray  # (H, W, 2) k1 >= k2 in 1/m
    surface_id: np.ndarray  # int16: 0..5 room surfaces, 6+k primitive k, -1 none
    label: np.ndarray  # uint8 Taskonomy semantic id
    shading: np.ndarray  # Lambertian shading in [0, 1] (what multiplies albedo in rgb)
    rgb: np.ndarray  # (H, W, 3) display colour in [0, 1]

    @property
    def valid(self):
        return np.isfinite(self.distance)


def look_at(position, target):
    forward = np.asarray(target, float) - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    return Camera(np.asarray(position, float), right, np.cross(right, forward), forward)


# Corner pairs (indices into the 8 corners of a box, ordered as by np.meshgrid) joined by its 12 edges.
_BOX_EDGES = np.array([(a, a | bit) for bit in (1, 2, 4) for a in range(8) if not a & bit])


def _pixel_rect(aabb, camera, size, focal):
    """Rows and columns (slices) that can see the box ``aabb``: the projection of its part in front of the
    near plane (corners in front, plus the points where its edges cross the plane)."""
    lo, hi = aabb
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T - camera.position
    cam = np.stack([corners @ camera.right, -(corners @ camera.up), corners @ camera.forward], axis=1)
    z = cam[:, 2]
    if z.max() < _NEAR:
        return slice(0, 0), slice(0, 0)
    points = cam[z >= _NEAR]
    a, b = cam[_BOX_EDGES[:, 0]], cam[_BOX_EDGES[:, 1]]
    crossing = (a[:, 2] < _NEAR) != (b[:, 2] < _NEAR)
    if crossing.any():
        a, b = a[crossing], b[crossing]
        w = ((_NEAR - a[:, 2]) / (b[:, 2] - a[:, 2]))[:, None]
        points = np.concatenate([points, a + w * (b - a)])
    cols = focal * points[:, 0] / points[:, 2] + size / 2
    rows = focal * points[:, 1] / points[:, 2] + size / 2
    c0, c1 = int(np.clip(np.floor(cols.min()) - 1, 0, size)), int(np.clip(np.ceil(cols.max()) + 1, 0, size))
    r0, r1 = int(np.clip(np.floor(rows.min()) - 1, 0, size)), int(np.clip(np.ceil(rows.max()) + 1, 0, size))
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _shadowed(scene, to_light, dist):
    """Which surface points the light cannot see, given their offsets to the light (3, N) and distances (N,).

    Rays go from the light to the points; a point is tested against a primitive only if its ray lies in the
    cone around that primitive's bounding sphere, and against a furniture item's parts only if it lies in
    the item's cone.
    """
    unit = to_light / -np.maximum(dist, 1e-6)
    blocked = np.zeros(dist.shape, bool)
    tolerance = 2e-3 + 1e-3 * dist

    def in_cone(aabb, ux, uy, uz):
        lo, hi = aabb
        towards = (lo + hi) / 2 - scene.light
        reach, radius = np.linalg.norm(towards), np.linalg.norm(hi - lo) / 2
        if reach <= radius:
            return np.ones(ux.shape, bool)
        ax, ay, az = (float(v) for v in towards / reach)
        return ux * ax + uy * ay + uz * az > np.sqrt(1.0 - (radius / reach) ** 2)

    for start, stop in scene.groups:
        parts = scene.primitives[start:stop]
        lows, highs = zip(*(p.aabb() for p in parts))
        near_item = np.flatnonzero(in_cone((np.min(lows, axis=0), np.max(highs, axis=0)), *unit))
        if not near_item.size:
            continue
        item_unit = unit[:, near_item]
        for prim in parts:
            idx = near_item[in_cone(prim.aabb(), *item_unit)] if len(parts) > 1 else near_item
            if idx.size:
                t = prim.intersect(scene.light, unit[0, idx], unit[1, idx], unit[2, idx])
                blocked[idx] |= t < dist[idx] - tolerance[idx]
    return blocked


def render(scene, camera, size, dtype=np.float32):
    """Ray-cast ``scene`` from ``camera`` into a ``size`` x ``size`` :class:`Render`."""
    focal = float(camera_intrinsics(size)[0, 0])
    coords = ((np.arange(size, dtype=dtype) + 0.5) - size / 2) / focal
    x, y = coords[None, :], coords[:, None]  # camera x right, y down
    scale = 1.0 / np.sqrt(1.0 + x * x + y * y)
    f, r, u = (v.astype(dtype) for v in (camera.forward, camera.right, camera.up))
    dx, dy, dz = ((f[a] + x * r[a] - y * u[a]) * scale for a in range(3))
    origin = camera.position

    t, surface_id = scene.room.intersect(origin, dx, dy, dz)
    t = t.astype(dtype)
    for k, prim in enumerate(scene.primitives):
        rows, cols = _pixel_rect(prim.aabb(), camera, size, focal)
        if rows.start == rows.stop or cols.start == cols.stop:
            continue
        t_prim = prim.intersect(origin, dx[rows, cols], dy[rows, cols], dz[rows, cols])
        closer = t_prim < t[rows, cols]
        t[rows, cols][closer] = t_prim[closer]
        surface_id[rows, cols][closer] = 6 + k
    valid = np.isfinite(t)
    surface_id[~valid] = -1

    n_pix = size * size
    direction = np.stack([dx.ravel(), dy.ravel(), dz.ravel()])
    hit_t = np.where(valid, t, 0.0).ravel()
    points = np.stack([float(origin[a]) + direction[a] * hit_t for a in range(3)])
    normal = np.zeros((3, n_pix), dtype)
    curvature = np.zeros((2, n_pix), dtype)
    albedo = np.zeros((3, n_pix), dtype)
    label = np.zeros(n_pix, np.uint8)
    ids = surface_id.ravel()
    order = np.argsort(ids, kind="stable")
    present, starts = np.unique(ids[order], return_index=True)
    bounds = list(starts) + [n_pix]
    for sid, start, stop in zip(present, bounds[:-1], bounds[1:]):
        if sid < 0:
            continue
        idx = order[start:stop]
        if sid < 6:
            n, k1, k2, q = scene.room.surface(int(sid), points[:, idx])
            material, sem = scene.room.materials[sid], BACKGROUND
        else:
            prim = scene.primitives[sid - 6]
            n, k1, k2, q = prim.surface(points[:, idx])
            material, sem = prim.material, prim.label
        normal[:, idx], curvature[0, idx], curvature[1, idx] = n, k1, k2
        albedo[:, idx] = material.albedo(q)
        label[idx] = sem

    # Lambertian shading from the point light with soft distance fall-off and hard shadows (0 where invalid:
    # the normal is 0 there), plus ambient light on every surface.
    to_light = np.stack([float(scene.light[a]) - points[a] for a in range(3)])
    light_dist = np.sqrt(to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2)
    lambert = np.maximum((normal[0] * to_light[0] + normal[1] * to_light[1] + normal[2] * to_light[2]) / light_dist, 0.0)
    direct = lambert / (1.0 + (light_dist / _UNIT_ATTENUATION_M) ** 2)
    facing = np.flatnonzero(direct > 0)  # only surfaces facing the light can be shadowed
    direct[facing[_shadowed(scene, to_light[:, facing], light_dist[facing])]] = 0.0
    shading = np.where(valid.ravel(), scene.ambient + (1.0 - scene.ambient) * direct, 0.0).astype(dtype)

    lit = albedo * shading * (scene.light_color[:, None] * scene.exposure).astype(dtype)
    height = np.clip(direction[1] * 0.5 + 0.5, 0.0, 1.0)
    sky = scene.sky_bottom[:, None] * (1 - height) + scene.sky_top[:, None] * height
    rgb = np.where(valid.ravel(), np.sqrt(np.clip(lit, 0.0, 1.0)), sky).astype(dtype)  # display gamma 2

    def project(axis):  # explicit sums: BLAS is slow for an inner dimension of 3
        return normal[0] * float(axis[0]) + normal[1] * float(axis[1]) + normal[2] * float(axis[2])

    cam_normal = np.stack([project(r), project(u), -project(f)], axis=-1).reshape(size, size, 3)
    return Render(
        distance=t,
        zdepth=t * scale,
        normal=cam_normal,
        curvature=curvature.T.reshape(size, size, 2),
        surface_id=surface_id,
        label=label.reshape(size, size),
        shading=shading.reshape(size, size),
        rgb=rgb.T.reshape(size, size, 3),
    )
