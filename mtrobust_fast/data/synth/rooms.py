"""Random furnished rooms for the synthetic Taskonomy generator.

A building fixes a style (wall, floor and light colours), so buildings differ the way real ones do and
building-level splits measure generalisation; a point fixes the room, its furniture and the fixation point;
a view fixes the camera looking at that point.
"""
from dataclasses import dataclass

import numpy as np

from mtrobust_fast.data.synth import scene as sc

# Room surface index of each wall, the yaw that turns an object's local +z (its front) into the room,
# and the world axis running along the wall.
_WALLS = ((0, np.pi / 2, 2), (1, -np.pi / 2, 2), (4, 0.0, 0), (5, np.pi, 0))

_FLOOR_OBJECTS = {
    "table": 3, "chair": 3, "couch": 2, "bed": 1, "cabinet": 3, "shelf": 2, "fridge": 1, "oven": 1,
    "toilet": 1, "plant": 2, "pillar": 1, "ball": 1,
}
_SMALL_OBJECTS = {"bottle": 3, "vase": 2, "books": 3, "toaster": 1, "microwave": 1, "tv": 1, "plant": 1, "sink": 1}
_WALL_OBJECTS = {"tv": 1, "clock": 2, "picture": 3}


@dataclass(frozen=True)
class ScenePreset:
    """What a room holds and where the camera stands. Each catalogue maps an object kind to its draw weight;
    each count is a [low, high) range of draws (a draw may find no free spot)."""

    floor: dict
    floor_count: tuple
    small: dict
    small_count: tuple
    wall: dict
    wall_count: tuple
    room_width: tuple  # metres, [low, high) for the room's x and z sides
    camera_distance: tuple  # metres from the fixation point, open interval
    fixation_on_object: float  # probability that the camera looks at an object rather than a wall


SCENE_PRESETS = {
    # Cluttered furnished rooms: 16 object classes, many of them small at a distance (the default).
    "rooms": ScenePreset(_FLOOR_OBJECTS, (3, 8), _SMALL_OBJECTS, (2, 7), _WALL_OBJECTS, (0, 4),
                         (3.5, 7.0), (1.5, 5.5), 0.8),
    # Fewer, larger objects seen from closer: 2-4 pieces of five big furniture classes (table, chair, couch,
    # bed, refrigerator), nothing on tables or walls, a smaller room, the camera 1.2-3.2 m from an object.
    # Objects cover a large part of each image, so small models at 64 px can learn to segment them in minutes.
    "large": ScenePreset({"table": 1, "chair": 1, "couch": 1, "bed": 1, "fridge": 1}, (2, 5), {}, (0, 1), {}, (0, 1),
                         (3.0, 4.5), (1.2, 3.2), 1.0),
}


@dataclass
class BuildingStyle:
    wall: np.ndarray
    accent: np.ndarray
    wall_pattern: str
    floor_pattern: str
    floor_a: np.ndarray
    floor_b: np.ndarray
    ceiling: np.ndarray
    light_color: np.ndarray


def sample_style(rng):
    wood_hue = rng.uniform(0.03, 0.12)
    return BuildingStyle(
        wall=sc.hsv(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.6, 0.95)),
        accent=sc.hsv(rng.uniform(), rng.uniform(0.2, 0.6), rng.uniform(0.4, 0.9)),
        wall_pattern=str(rng.choice(["plain", "plain", "stripes"])),
        floor_pattern=str(rng.choice(["planks", "tiles", "checker", "plain"])),
        floor_a=sc.hsv(wood_hue, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)),
        floor_b=sc.hsv(wood_hue + rng.uniform(-0.03, 0.03), rng.uniform(0.2, 0.6), rng.uniform(0.5, 0.9)),
        ceiling=sc.hsv(rng.uniform(), 0.05, rng.uniform(0.8, 0.95)),
        light_color=sc.hsv(rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.2), 1.0),
    )


def _weighted_choice(rng, weights):
    names = list(weights)
    p = np.array([weights[n] for n in names], float)
    return names[rng.choice(len(names), p=p / p.sum())]


class _Furnisher:
    """Places furniture made of primitives without overlaps, remembering table tops for small objects."""

    def __init__(self, rng, room_size):
        self.rng, self.size = rng, room_size
        self.primitives, self.footprints, self.supports = [], [], []

    # --- materials -------------------------------------------------------------------------------
    def material(self, kind):
        rng = self.rng
        if kind == "wood":
            hue = rng.uniform(0.03, 0.11)
            return sc.random_material(
                rng, sc.hsv(hue, 0.6, rng.uniform(0.25, 0.55)), sc.hsv(hue, 0.5, rng.uniform(0.5, 0.8)),
                "stripes", rng.uniform(8, 20), int(rng.choice([0, 2])), 0.1,
            )
        if kind == "fabric":
            a = sc.hsv(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.85))
            b = sc.hsv(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.85))
            pattern = str(rng.choice(["plain", "plain", "stripes", "checker"]))
            return sc.random_material(rng, a, b, pattern, rng.uniform(4, 10), int(rng.choice([0, 1, 2])), 0.2)
        if kind == "appliance":
            return sc.random_material(rng, sc.hsv(rng.uniform(), 0.05, rng.choice([0.12, 0.6, 0.92])), noise_amp=0.04)
        if kind == "foliage":
            return sc.random_material(
                rng, sc.hsv(rng.uniform(0.22, 0.38), 0.7, 0.35), sc.hsv(rng.uniform(0.2, 0.3), 0.6, 0.6),
                "checker", rng.uniform(15, 30), 0, 0.5,
            )
        if kind == "terracotta":
            return sc.random_material(rng, sc.hsv(0.05, 0.6, rng.uniform(0.45, 0.7)), noise_amp=0.1)
        if kind == "picture":
            a, b = sc.hsv(rng.uniform(), 0.8, 0.9), sc.hsv(rng.uniform(), 0.6, 0.2)
            return sc.random_material(rng, a, b, str(rng.choice(["checker", "stripes"])), rng.uniform(6, 14), 1, 0.3)
        # "colour": saturated plain objects (books, bottles, vases, balls)
        return sc.random_material(rng, sc.hsv(rng.uniform(), rng.uniform(0.5, 0.9), rng.uniform(0.3, 0.9)), noise_amp=0.08)

    # --- parts in an object's frame (origin on the floor or a support, +z = front) ---------------
    @staticmethod
    def _world(base, yaw, offset):
        cos, sin = np.cos(yaw), np.sin(yaw)
        ox, oy, oz = offset
        return np.array([base[0] + cos * ox + sin * oz, base[1] + oy, base[2] - sin * ox + cos * oz])

    def box(self, base, yaw, offset, half, label, material):
        self.primitives.append(sc.Box(self._world(base, yaw, offset), np.array(half, float), float(yaw), label, material))

    def cylinder(self, base, yaw, offset, radius, half_length, label, material, axis=1):
        centre = self._world(base, yaw, offset)
        self.primitives.append(sc.Cylinder(centre, float(radius), float(half_length), axis, label, material))

    def sphere(self, base, yaw, offset, radius, label, material):
        self.primitives.append(sc.Sphere(self._world(base, yaw, offset), float(radius), label, material))

    # --- placement ----------------------------------------------------------------------------------
    def floor_spot(self, half_x, half_z, against_wall):
        """A free (base, yaw) on the floor for a footprint of these half sizes, or None."""
        rng, (width, _, depth) = self.rng, self.size
        radius = float(np.hypot(half_x, half_z))
        for _ in range(20):
            if against_wall:
                wall, yaw, along_axis = _WALLS[rng.integers(4)]
                length = self.size[along_axis]
                if length < 2 * half_x + 0.1:
                    continue
                along = rng.uniform(half_x + 0.05, length - half_x - 0.05)
                off = half_z + 0.02
                across = {0: off, 1: width - off, 4: off, 5: depth - off}[wall]
                x, z = (across, along) if along_axis == 2 else (along, across)
            else:
                if min(width, depth) < 2 * radius + 0.2:
                    return None
                yaw = rng.uniform(0, 2 * np.pi)
                x, z = rng.uniform(radius + 0.1, width - radius - 0.1), rng.uniform(radius + 0.1, depth - radius - 0.1)
            if all(np.hypot(x - fx, z - fz) > radius + fr for fx, fz, fr in self.footprints):
                self.footprints.append((x, z, radius))
                return np.array([x, 0.0, z]), yaw
        return None

    def support_spot(self, half_x, half_z):
        """A free (base, yaw) on a table or cabinet top, or None."""
        rng = self.rng
        for _ in range(10):
            if not self.supports:
                return None
            top = self.supports[rng.integers(len(self.supports))]
            room_x, room_z = top["half"][0] - half_x - 0.02, top["half"][1] - half_z - 0.02
            if room_x < 0 or room_z < 0:
                continue
            offset = (rng.uniform(-room_x, room_x), 0.0, rng.uniform(-room_z, room_z))
            base = self._world(top["base"], top["yaw"], offset)
            radius = float(np.hypot(half_x, half_z))
            if all(np.hypot(base[0] - x, base[2] - z) > radius + r for x, z, r in top["taken"]):
                top["taken"].append((base[0], base[2], radius))
                return base, top["yaw"] + rng.choice([0.0, np.pi / 2, np.pi, -np.pi / 2]) + rng.uniform(-0.3, 0.3)
        return None

    def add_support(self, base, yaw, height, half_x, half_z):
        self.supports.append({"base": base + [0.0, height, 0.0], "yaw": yaw, "half": (half_x, half_z), "taken": []})

    # --- furniture ------------------------------------------------------------------------------------
    def add_floor_object(self, kind):
        rng, u = self.rng, self.rng.uniform
        if kind == "table":
            hx, hz, h = u(0.45, 0.9), u(0.35, 0.5), u(0.7, 0.78)
            spot = self.floor_spot(hx, hz, against_wall=False)
            if spot:
                base, yaw = spot
                wood = self.material("wood")
                self.box(base, yaw, (0, h - 0.02, 0), (hx, 0.02, hz), sc.DINING_TABLE, wood)
                for sx in (-1, 1):
                    for sz in (-1, 1):
                        leg = (sx * (hx - 0.06), (h - 0.04) / 2, sz * (hz - 0.06))
                        self.box(base, yaw, leg, (0.03, (h - 0.04) / 2, 0.03), sc.DINING_TABLE, wood)
                self.add_support(base, yaw, h, hx, hz)
        elif kind == "chair":
            s, seat_h, back_h = u(0.2, 0.25), u(0.42, 0.48), u(0.18, 0.25)
            spot = self.floor_spot(s, s, against_wall=False)
            if spot:
                base, yaw = spot
                mat = self.material(str(rng.choice(["wood", "fabric"])))
                self.box(base, yaw, (0, seat_h, 0), (s, 0.03, s), sc.CHAIR, mat)
                self.box(base, yaw, (0, seat_h + 0.03 + back_h, -s + 0.025), (s, back_h, 0.025), sc.CHAIR, mat)
                for sx in (-1, 1):
                    for sz in (-1, 1):
                        leg = (sx * (s - 0.03), (seat_h - 0.03) / 2, sz * (s - 0.03))
                        self.box(base, yaw, leg, (0.02, (seat_h - 0.03) / 2, 0.02), sc.CHAIR, mat)
        elif kind == "couch":
            hx, hz = u(0.75, 1.1), u(0.4, 0.48)
            spot = self.floor_spot(hx, hz, against_wall=True)
            if spot:
                base, yaw = spot
                mat = self.material("fabric")
                self.box(base, yaw, (0, 0.21, 0), (hx, 0.21, hz), sc.COUCH, mat)
                self.box(base, yaw, (0, 0.62, -hz + 0.1), (hx, 0.2, 0.1), sc.COUCH, mat)
                for sx in (-1, 1):
                    self.box(base, yaw, (sx * (hx - 0.1), 0.54, 0.0), (0.1, 0.12, hz), sc.COUCH, mat)
        elif kind == "bed":
            hx, hz = u(0.6, 0.9), u(0.95, 1.05)
            spot = self.floor_spot(hx, hz, against_wall=True)
            if spot:
                base, yaw = spot
                self.box(base, yaw, (0, 0.25, 0), (hx, 0.25, hz), sc.BED, self.material("fabric"))
                self.box(base, yaw, (0, 0.5, -hz + 0.04), (hx, 0.5, 0.04), sc.BED, self.material("wood"))
                self.box(base, yaw, (0, 0.56, -hz + 0.3), (hx - 0.15, 0.06, 0.18), sc.BED, self.material("fabric"))
        elif kind in ("cabinet", "shelf"):
            hx, hz = u(0.35, 1.0), u(0.2, 0.32)
            h = u(0.4, 0.5) if kind == "cabinet" else u(0.8, 1.0)
            spot = self.floor_spot(hx, hz, against_wall=True)
            if spot:
                base, yaw = spot
                self.box(base, yaw, (0, h, 0), (hx, h, hz), sc.BACKGROUND, self.material(str(rng.choice(["wood", "fabric"]))))
                self.add_support(base, yaw, 2 * h, hx, hz)
        elif kind == "fridge":
            hx, h = u(0.33, 0.45), u(0.8, 0.95)
            spot = self.floor_spot(hx, 0.35, against_wall=True)
            if spot:
                base, yaw = spot
                mat = self.material("appliance")
                self.box(base, yaw, (0, h, 0), (hx, h, 0.35), sc.REFRIGERATOR, mat)
                self.box(base, yaw, (hx - 0.08, h, 0.37), (0.015, 0.3, 0.02), sc.REFRIGERATOR, self.material("appliance"))
        elif kind == "oven":
            spot = self.floor_spot(0.3, 0.3, against_wall=True)
            if spot:
                base, yaw = spot
                self.box(base, yaw, (0, 0.43, 0), (0.3, 0.43, 0.3), sc.OVEN, self.material("appliance"))
                dark = sc.random_material(rng, sc.hsv(0.0, 0.0, 0.05), noise_amp=0.02)
                self.box(base, yaw, (0, 0.38, 0.31), (0.22, 0.15, 0.01), sc.OVEN, dark)
                self.add_support(base, yaw, 0.86, 0.3, 0.3)
        elif kind == "toilet":
            spot = self.floor_spot(0.2, 0.3, against_wall=True)
            if spot:
                base, yaw = spot
                white = sc.random_material(rng, sc.hsv(0.0, 0.0, 0.93), noise_amp=0.03)
                self.cylinder(base, yaw, (0, 0.2, 0.08), 0.19, 0.2, sc.TOILET, white)
                self.box(base, yaw, (0, 0.55, -0.2), (0.2, 0.2, 0.09), sc.TOILET, white)
        elif kind == "plant":
            r = u(0.12, 0.2)
            spot = self.floor_spot(r + 0.15, r + 0.15, against_wall=False)
            if spot:
                self._plant(*spot, r)
        elif kind == "pillar":
            r = u(0.15, 0.3)
            spot = self.floor_spot(r, r, against_wall=False)
            if spot:
                base, yaw = spot
                h = self.size[1] / 2
                self.cylinder(base, yaw, (0, h, 0), r, h, sc.BACKGROUND, self.material("fabric"))
        elif kind == "ball":
            r = u(0.1, 0.3)
            spot = self.floor_spot(r, r, against_wall=False)
            if spot:
                self.sphere(spot[0], spot[1], (0, r, 0), r, sc.BACKGROUND, self.material("colour"))

    def _plant(self, base, yaw, pot_radius):
        u = self.rng.uniform
        pot_half = pot_radius * u(0.8, 1.3)
        self.cylinder(base, yaw, (0, pot_half, 0), pot_radius, pot_half, sc.POTTED_PLANT, self.material("terracotta"))
        foliage = self.material("foliage")
        for _ in range(self.rng.integers(1, 4)):
            r = pot_radius * u(1.0, 1.8)
            offset = (u(-0.5, 0.5) * pot_radius, 2 * pot_half + r * u(0.6, 1.1), u(-0.5, 0.5) * pot_radius)
            self.sphere(base, yaw, offset, r, sc.POTTED_PLANT, foliage)

    def add_small_object(self, kind):
        rng, u = self.rng, self.rng.uniform
        if kind == "bottle":
            r, h = u(0.03, 0.045), u(0.1, 0.16)
            spot = self.support_spot(r, r)
            if spot:
                mat = self.material("colour")
                self.cylinder(*spot, (0, h, 0), r, h, sc.BOTTLE, mat)
                self.cylinder(*spot, (0, 2 * h + 0.04, 0), r * 0.35, 0.04, sc.BOTTLE, mat)
        elif kind == "vase":
            r = u(0.06, 0.12)
            spot = self.support_spot(r, r)
            if spot:
                mat = self.material("colour")
                self.sphere(*spot, (0, r, 0), r, sc.VASE, mat)
                self.cylinder(*spot, (0, 2 * r, 0), r * 0.45, r * 0.4, sc.VASE, mat)
        elif kind == "books":
            hx, hz = u(0.08, 0.13), u(0.1, 0.16)
            spot = self.support_spot(hx, hz)
            if spot:
                y = 0.0
                for _ in range(rng.integers(1, 4)):
                    t = u(0.01, 0.03)
                    self.box(*spot, (u(-0.01, 0.01), y + t, 0), (hx, t, hz), sc.BOOK, self.material("colour"))
                    y += 2 * t
        elif kind == "toaster":
            spot = self.support_spot(0.14, 0.1)
            if spot:
                self.box(*spot, (0, 0.09, 0), (0.14, 0.09, 0.1), sc.TOASTER, self.material("appliance"))
        elif kind == "microwave":
            spot = self.support_spot(0.25, 0.18)
            if spot:
                self.box(*spot, (0, 0.15, 0), (0.25, 0.15, 0.18), sc.MICROWAVE, self.material("appliance"))
                dark = sc.random_material(rng, sc.hsv(0.0, 0.0, 0.08), noise_amp=0.02)
                self.box(*spot, (-0.05, 0.15, 0.185), (0.15, 0.1, 0.006), sc.MICROWAVE, dark)
        elif kind == "tv":
            hx = u(0.3, 0.5)
            spot = self.support_spot(hx, 0.08)
            if spot:
                dark = sc.random_material(rng, sc.hsv(0.0, 0.0, 0.06), noise_amp=0.05)
                self.box(*spot, (0, 0.05, 0), (0.12, 0.05, 0.07), sc.TV, dark)
                self.box(*spot, (0, 0.1 + hx * 0.6, 0), (hx, hx * 0.6, 0.025), sc.TV, dark)
        elif kind == "plant":
            r = u(0.05, 0.09)
            spot = self.support_spot(r, r)
            if spot:
                self._plant(*spot, r)
        elif kind == "sink":
            spot = self.support_spot(0.2, 0.2)
            if spot:
                steel = sc.random_material(rng, sc.hsv(0.0, 0.0, u(0.6, 0.85)), noise_amp=0.05)
                self.cylinder(*spot, (0, 0.03, 0), 0.19, 0.03, sc.SINK, steel)
                self.cylinder(*spot, (0, 0.12, -0.16), 0.015, 0.1, sc.SINK, steel)

    def add_wall_object(self, kind):
        rng, u = self.rng, self.rng.uniform
        wall, yaw, along_axis = _WALLS[rng.integers(4)]
        length, height = self.size[along_axis], self.size[1]
        half_w, half_h = (u(0.35, 0.6), u(0.2, 0.35)) if kind != "clock" else (u(0.12, 0.2),) * 2
        if length < 2 * half_w + 0.2:
            return
        along = u(half_w + 0.1, length - half_w - 0.1)
        centre_y = min(u(1.1, 1.6) if kind == "tv" else u(1.3, 2.1), height - half_h - 0.1)
        across = {0: 0.0, 1: self.size[0], 4: 0.0, 5: self.size[2]}[wall]
        base = np.array([across, centre_y, along] if along_axis == 2 else [along, centre_y, across])
        if kind == "clock":
            axis = 0 if along_axis == 2 else 2
            self.cylinder(base, yaw, (0, 0, 0.025), half_w, 0.025, sc.CLOCK, self.material("colour"), axis=axis)
        elif kind == "tv":
            dark = sc.random_material(rng, sc.hsv(0.0, 0.0, 0.05), noise_amp=0.05)
            self.box(base, yaw, (0, 0, 0.03), (half_w, half_h, 0.03), sc.TV, dark)
        else:
            self.box(base, yaw, (0, 0, 0.015), (half_w, half_h, 0.015), sc.BACKGROUND, self.material("picture"))

    def light_position(self):
        rng, (width, height, depth) = self.rng, self.size
        for _ in range(20):
            light = np.array([rng.uniform(0.25, 0.75) * width, height - rng.uniform(0.25, 0.7), rng.uniform(0.25, 0.75) * depth])
            if not any(np.all(light > lo - 0.1) and np.all(light < hi + 0.1) for lo, hi in (p.aabb() for p in self.primitives)):
                return light
        return np.array([width / 2, height - 0.05, depth / 2])


def _room_materials(style, rng):
    wall = sc.random_material(rng, style.wall, style.wall * 0.85, style.wall_pattern, rng.uniform(3, 8), 1, 0.06)
    accent = sc.random_material(rng, style.accent, style.accent * 0.8, "plain", 4.0, 0, 0.08)
    floor_freq = {"planks": rng.uniform(5, 8), "tiles": rng.uniform(2, 4), "checker": rng.uniform(1.5, 3), "plain": 4.0}
    floor = sc.random_material(
        rng, style.floor_a, style.floor_b, style.floor_pattern, floor_freq[style.floor_pattern], int(rng.choice([0, 2])), 0.15
    )
    ceiling = sc.random_material(rng, style.ceiling, noise_amp=0.03)
    walls = [wall, wall, wall, wall]
    walls[rng.integers(4)] = accent
    return [walls[0], walls[1], floor, ceiling, walls[2], walls[3]]


def _windows(size, rng):
    """One to three windows (or door-like openings) on distinct walls: the scene's invalid-depth holes."""
    windows = []
    for w in rng.choice(4, size=rng.integers(1, 4), replace=False):
        wall, _, along_axis = _WALLS[w]
        length = size[along_axis]
        width = rng.uniform(0.7, min(2.0, length - 0.6))
        start = rng.uniform(0.3, length - 0.3 - width)
        if rng.uniform() < 0.25:
            bottom, top = 0.0, min(2.1, size[1] - 0.2)
        else:
            bottom = rng.uniform(0.6, 1.0)
            top = min(bottom + rng.uniform(0.9, 1.6), size[1] - 0.2)
        windows.append(sc.Window(wall, (start, start + width), (bottom, top)))
    return windows


def sample_scene(style, rng, preset="rooms"):
    """A furnished room in ``style`` with a light and a fixation point, drawn from ``rng`` (see ``SCENE_PRESETS``)."""
    preset = SCENE_PRESETS[preset]
    size = np.array([rng.uniform(*preset.room_width), rng.uniform(2.5, 3.2), rng.uniform(*preset.room_width)])
    room = sc.Room(size, _room_materials(style, rng), _windows(size, rng))
    furnish, groups = _Furnisher(rng, size), []
    for add, catalogue, (low, high) in (
        (furnish.add_floor_object, preset.floor, preset.floor_count),
        (furnish.add_small_object, preset.small, preset.small_count),
        (furnish.add_wall_object, preset.wall, preset.wall_count),
    ):
        for _ in range(rng.integers(low, high)):
            start = len(furnish.primitives)
            add(_weighted_choice(rng, catalogue))
            if len(furnish.primitives) > start:
                groups.append((start, len(furnish.primitives)))
    light = furnish.light_position()
    if furnish.primitives and rng.uniform() < preset.fixation_on_object:
        lo, hi = furnish.primitives[rng.integers(len(furnish.primitives))].aabb()
        fixation = (lo + hi) / 2
    else:
        wall, _, along_axis = _WALLS[rng.integers(4)]
        across = {0: 0.0, 1: size[0], 4: 0.0, 5: size[2]}[wall]
        along, height = rng.uniform(0.3, size[along_axis] - 0.3), rng.uniform(0.3, size[1] - 0.3)
        fixation = np.array([across, height, along] if along_axis == 2 else [along, height, across])
    return sc.Scene(
        room=room,
        primitives=furnish.primitives,
        light=light,
        light_color=style.light_color,
        ambient=float(rng.uniform(0.2, 0.4)),
        exposure=float(rng.uniform(0.9, 1.3)),
        sky_top=sc.hsv(rng.uniform(0.55, 0.65), rng.uniform(0.1, 0.4), 1.0),
        sky_bottom=sc.hsv(rng.uniform(0.55, 0.65), 0.05, rng.uniform(0.85, 1.0)),
        fixation=fixation,
        groups=groups,
    )


def sample_camera(scene, rng, preset="rooms"):
    """A camera inside the room, outside all furniture, at the preset's distance from the fixation point (1.5-5.5
    m for rooms) and looking at it."""
    near, far = SCENE_PRESETS[preset].camera_distance
    size = scene.room.size
    boxes = [p.aabb() for p in scene.primitives]
    for _ in range(100):
        position = np.array([rng.uniform(0.3, size[0] - 0.3), rng.uniform(0.9, 1.8), rng.uniform(0.3, size[2] - 0.3)])
        offset = scene.fixation - position
        dist = np.linalg.norm(offset)
        if not near < dist < far or abs(offset[1]) > 0.8 * dist:
            continue
        if any(np.all(position > lo - 0.15) and np.all(position < hi + 0.15) for lo, hi in boxes):
            continue
        return sc.look_at(position, scene.fixation)
    centre = np.array([size[0] / 2, 1.5, size[2] / 2])
    target = scene.fixation if np.linalg.norm(scene.fixation - centre) > 0.5 else centre + [1.0, 0.0, 0.0]
    return sc.look_at(centre, target)
