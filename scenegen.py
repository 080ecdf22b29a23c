"""The embedded scene generator: exact instance masks with no download, in five styles (data.SYNTHETIC names them).

    render(seed, resolution, min_objects, max_objects, style) -> image (H,W,3) uint8, mask (H,W) uint8

Two families: CLEVR-like 3-D scenes, ray-cast analytically (render_scene), and flat 2-D shape scenes
(render_shapes). Both paint objects in order with hard edges, so the mask is exactly what was drawn. data.py
turns many of them into cached `Scenes`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from errors import InputError

# ----------------------------------------------------------------------------------------------------------------
# Synthetic CLEVR-like scenes: spheres, cubes and cylinders on a floor in front of a wall, in two styles:
#   "clevr":    flat-coloured objects on a plain grey floor and wall, 3-6 objects (like CLEVR6);
#   "clevrtex": two-tone procedural textures on objects, floor and wall, 3-10 objects (like CLEVRTex).
# Each object is ray-cast analytically over its screen bounding box only (that is what makes it fast), then the
# objects are painted far-to-near with hard edges, so the instance mask is exactly what was drawn.

GENERATOR_VERSION = 2  # bump whenever the rendered pixels change, so stale caches are not reused
CAMERA_POS = np.array([0.0, 6.0, -9.5], np.float32)
CAMERA_TARGET = np.array([0.0, 0.0, 1.2], np.float32)
FIELD_OF_VIEW_DEG = 26.0
WALL_Z = 9.0  # the back wall is the plane z = WALL_Z; the floor is y = 0
TO_LIGHT = np.array([-0.55, 0.75, -0.4], np.float32) / np.linalg.norm([-0.55, 0.75, -0.4])
AMBIENT, DIFFUSE = 0.38, 0.72
PIXEL_NOISE = 0.012
PLACE_X, PLACE_Z = (-2.4, 2.4), (-2.0, 3.2)  # where object centres may stand on the floor
SIZE_RANGE = (0.42, 0.9)
SHAPES = ("sphere", "cube", "cylinder")
TEXTURES = ("checker", "stripes", "dots", "marble", "blotches")
STYLES = ("clevr", "clevrtex")


@dataclass
class _Object:
    shape: str
    x: float
    z: float
    size: float  # sphere radius; other shapes derive their extents from it
    yaw: float
    colors: np.ndarray  # (2, 3) float32: the two colours its binary texture chooses between
    texture: str
    tex_freq: float
    tex_dirs: np.ndarray  # (2, 3) random unit directions used by stripes/marble/blotches
    tex_offset: np.ndarray  # (3,) random phase
    shiny: bool

    @property
    def height(self) -> float:  # y of the centre: every object stands on the floor
        return HEIGHT[self.shape] * self.size

    @property
    def footprint(self) -> float:  # radius of the floor disc it occupies (objects never intersect)
        return FOOTPRINT[self.shape] * self.size

    @property
    def center(self) -> np.ndarray:
        return np.array([self.x, self.height, self.z], np.float32)


HEIGHT = {"sphere": 1.0, "cube": 0.8, "cylinder": 0.9}  # centre height / size
FOOTPRINT = {"sphere": 1.0, "cube": 0.8 * 1.42, "cylinder": 0.85}  # floor radius / size (cube: half diagonal)


@dataclass
class _Grid:  # everything about the camera that depends on the resolution only
    rays: np.ndarray  # (H, W, 3) unit ray directions through pixel centres
    tan_half: float
    to_camera: np.ndarray  # (3, 3) world offset -> (up, right, depth) coordinates
    floor_xz: np.ndarray  # (F, 2) floor hit points of the floor samples of a 2x2 supersampled grid (anti-aliasing)
    wall_xy: np.ndarray  # (M, 2) wall hit points of the wall samples of the same grid
    is_wall: np.ndarray  # (2H, 2W) bool: the supersample hits the wall before the floor
    plane_shade: np.ndarray  # (H, W) Lambert shading of the background, averaged over supersamples
    pixel_floor_xz: np.ndarray  # (H, W, 2) floor hit point of each pixel centre (for shadows)


def _camera_rays(size: int, forward, right, up, tan_half) -> np.ndarray:
    centers = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    u, v = centers[None, :], -centers[:, None]
    rays = forward + (u[..., None] * right + v[..., None] * up) * tan_half
    return (rays / np.linalg.norm(rays, axis=-1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _grid(resolution: int) -> _Grid:
    forward = CAMERA_TARGET - CAMERA_POS
    forward /= np.linalg.norm(forward)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    tan_half = float(np.tan(np.radians(FIELD_OF_VIEW_DEG) / 2))
    rays = _camera_rays(resolution, forward, right, up, tan_half)
    ss = _camera_rays(2 * resolution, forward, right, up, tan_half)
    with np.errstate(divide="ignore"):
        t_floor = np.where(ss[..., 1] < 0, -CAMERA_POS[1] / ss[..., 1], np.inf)
        t_wall = np.where(ss[..., 2] > 0, (WALL_Z - CAMERA_POS[2]) / ss[..., 2], np.inf)
    is_wall = t_wall < t_floor
    floor_pts = CAMERA_POS + np.where(np.isfinite(t_floor), t_floor, 0)[..., None] * ss
    wall_pts = CAMERA_POS + np.where(np.isfinite(t_wall), t_wall, 0)[..., None] * ss
    shade_floor = AMBIENT + DIFFUSE * max(TO_LIGHT[1], 0)
    shade_wall = AMBIENT + DIFFUSE * max(-TO_LIGHT[2], 0)
    # the far floor and wall fade a little: cheap depth cue that makes the horizon read as "far"
    dist = np.minimum(t_floor, t_wall)
    fade = np.clip(1.15 - dist / 60, 0.75, 1.0)
    shade = np.where(is_wall, shade_wall, shade_floor) * fade
    plane_shade = shade.reshape(resolution, 2, resolution, 2).mean((1, 3))
    with np.errstate(divide="ignore"):
        t_px = np.where(rays[..., 1] < 0, -CAMERA_POS[1] / rays[..., 1], 1e4)
    pixel_floor = CAMERA_POS + t_px[..., None] * rays
    return _Grid(rays, tan_half, np.stack([up, right, forward], 1).astype(np.float32),
                 floor_pts[~is_wall][:, [0, 2]].astype(np.float32), wall_pts[is_wall][:, [0, 1]].astype(np.float32),
                 is_wall, plane_shade.astype(np.float32), pixel_floor[..., [0, 2]].astype(np.float32))


def _project(points: np.ndarray, grid: _Grid, resolution: int) -> np.ndarray:
    """World points (..., 3) -> pixel coordinates (..., 2) as (row, col)."""
    cam = (points - CAMERA_POS) @ grid.to_camera  # (..., 3): up, right, depth
    return (0.5 - 0.5 * cam[..., :2] / (cam[..., 2:] * grid.tan_half) * np.float32([1, -1])) * resolution - 0.5


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    h, s, v = (np.asarray(a, np.float32) for a in (h, s, v))
    k = (np.array([5.0, 3.0, 1.0], np.float32) + h[..., None] * 6) % 6
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _pattern(kind: str, p: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Binary procedural texture on points p (..., 3) already scaled to texture units -> bool (...)."""
    if kind == "checker":
        return (np.floor(p).sum(-1).astype(np.int64) & 1).astype(bool)
    if kind == "stripes":
        return (p @ dirs[0]) % 1.0 < 0.5
    if kind == "dots":
        return (((p % 1.0) - 0.5) ** 2).sum(-1) < 0.1
    if kind == "marble":
        return np.sin(2 * np.pi * (p @ dirs[0]) + 2.5 * np.sin(4.4 * (p @ dirs[1]))) > 0.25
    # blotches: a few interfering waves thresholded -> irregular patches
    return np.sin(2.1 * p[..., 0]) * np.sin(2.3 * p[..., 1]) * np.sin(1.9 * p[..., 2]) \
        + 0.45 * np.sin(5.0 * (p @ dirs[1])) > 0.12


def _random_directions(rng: np.random.Generator) -> np.ndarray:
    d = rng.normal(size=(2, 3)).astype(np.float32)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _sample_look(rng: np.random.Generator, hue: float, shape: str, x: float, z: float, size: float,
                 style: str) -> _Object:
    # saturated, fairly bright objects against a desaturated background: separable, but not flat colours
    base = hsv_to_rgb(hue, rng.uniform(0.5, 0.95), rng.uniform(0.6, 1.0))
    second = hsv_to_rgb((hue + rng.uniform(-0.08, 0.08)) % 1, rng.uniform(0.3, 1.0), rng.uniform(0.25, 0.55))
    if rng.random() < 0.3:  # sometimes a light second tone instead of a dark one
        second = base + (1 - base) * rng.uniform(0.45, 0.7)
    if style == "clevr":    # flat colour: both texture tones are the base colour
        second = base
    return _Object(shape=shape, x=x, z=z, size=size, yaw=rng.uniform(0, np.pi / 2),
                   colors=np.stack([base, second]).astype(np.float32), texture=TEXTURES[rng.integers(len(TEXTURES))],
                   tex_freq=rng.uniform(2.0, 4.5), tex_dirs=_random_directions(rng),
                   tex_offset=rng.uniform(0, 1, 3).astype(np.float32), shiny=bool(rng.random() < 0.4))


BOX_CORNERS = np.float32([[dx, dy, dz] for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)])


def _bbox(obj: _Object, grid: _Grid, resolution: int) -> tuple[int, int, int, int] | None:
    # the object fits in a box of half-width footprint and height 2*height standing on the floor
    corners = np.float32([obj.x, obj.height, obj.z]) + BOX_CORNERS * np.float32([obj.footprint, obj.height,
                                                                                  obj.footprint])
    rc = _project(corners, grid, resolution)
    r0, c0 = np.floor(rc.min(0)).astype(int) - 1
    r1, c1 = np.ceil(rc.max(0)).astype(int) + 2
    r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, resolution), min(c1, resolution)
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def _rotate_y(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return v @ np.float32([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def _intersect(obj: _Object, rays: np.ndarray):
    """Ray-cast one object over the rays of its bounding box -> hit (h,w) bool, normals (m,3), local points (m,3)."""
    origin = _rotate_y(CAMERA_POS - obj.center, -obj.yaw)  # object frame: centre at 0, yaw undone
    d = _rotate_y(rays, -obj.yaw)
    with np.errstate(divide="ignore", invalid="ignore"):
        if obj.shape == "sphere":
            b = d @ origin
            disc = b * b - (origin @ origin - obj.size ** 2)
            hit = disc > 0
            t = -b[hit] - np.sqrt(disc[hit])
            local = origin + t[:, None] * d[hit]
            normal = local / obj.size
        elif obj.shape == "cube":
            half = obj.height
            t1, t2 = (-half - origin) / d, (half - origin) / d
            near = np.minimum(t1, t2)
            t_near, t_far = near.max(-1), np.maximum(t1, t2).min(-1)
            hit = (t_near < t_far) & (t_far > 0)
            local = origin + t_near[hit][:, None] * d[hit]
            axis = near[hit].argmax(-1)
            normal = np.zeros_like(local)
            normal[np.arange(len(axis)), axis] = -np.sign(d[hit][np.arange(len(axis)), axis])
        else:  # cylinder standing upright: side wall or top cap, whichever the ray meets first
            radius, half = obj.footprint, obj.height
            a = d[..., 0] ** 2 + d[..., 2] ** 2
            b = d[..., 0] * origin[0] + d[..., 2] * origin[2]
            disc = b * b - a * (origin[0] ** 2 + origin[2] ** 2 - radius ** 2)
            t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
            side_ok = (disc > 0) & (np.abs(origin[1] + t_side * d[..., 1]) <= half)
            t_top = (half - origin[1]) / d[..., 1]
            top_x, top_z = origin[0] + t_top * d[..., 0], origin[2] + t_top * d[..., 2]
            top_ok = (d[..., 1] < 0) & (top_x ** 2 + top_z ** 2 <= radius ** 2)
            hit = side_ok | top_ok
            use_top = top_ok[hit] & (~side_ok[hit] | (t_top[hit] < t_side[hit]))
            t = np.where(use_top, t_top[hit], t_side[hit])
            local = origin + t[:, None] * d[hit]
            normal = np.where(use_top[:, None], np.float32([0, 1, 0]),
                              local * np.float32([1, 0, 1]) / radius)
    return hit, _rotate_y(normal, obj.yaw).astype(np.float32), local.astype(np.float32)


def _place_objects(rng: np.random.Generator, count: int, placed: list[_Object], grid: _Grid,
                   resolution: int, style: str) -> list[_Object]:
    """Rejection-sample `count` more objects that do not touch each other and stand inside the picture."""
    hue0 = rng.random()
    for _ in range(60 * count):
        if count == 0:
            break
        shape, x, z, size = SHAPES[rng.integers(len(SHAPES))], rng.uniform(*PLACE_X), rng.uniform(*PLACE_Z), \
            rng.uniform(*SIZE_RANGE)
        row, col = _project(np.float32([x, HEIGHT[shape] * size, z]), grid, resolution) / resolution
        if not (0.06 < row < 0.94 and 0.06 < col < 0.94):
            continue
        if any(np.hypot(x - o.x, z - o.z) < FOOTPRINT[shape] * size + o.footprint + 0.1 for o in placed):
            continue
        placed.append(_sample_look(rng, (hue0 + 0.618034 * len(placed)) % 1, shape, x, z, size, style))  # distinct hues
        count -= 1
    return placed


def _paint_ids(objects: list, hits: list, resolution: int) -> np.ndarray:
    """Painter's algorithm on object indices only (objects already sorted far-to-near); -1 = background."""
    painted = np.full((resolution, resolution), -1, np.int16)
    for k, (box, hit) in enumerate(hits):
        if box is not None:
            r0, r1, c0, c1 = box
            painted[r0:r1, c0:c1][hit] = k
    return painted


def _background(rng: np.random.Generator, grid: _Grid, objects: list[_Object], resolution: int, style: str):
    """Floor + wall (anti-aliased by 2x2 supersampling) with soft blob shadows -> albedo, shade (H,W,*).
    clevrtex: a random two-tone texture on each plane; clevr: one plain, nearly grey colour on each."""
    def plane_texture(coords, v_lo, v_hi):  # -> its two colours and which one each sample shows
        hue = rng.random()
        c1 = hsv_to_rgb(hue, rng.uniform(0.05, 0.3), rng.uniform(v_lo, v_hi))
        c2 = c1 * rng.uniform(0.55, 0.8) if rng.random() < 0.7 else c1 + (1 - c1) * rng.uniform(0.2, 0.35)
        if style == "clevr":
            c1 = c2 = hsv_to_rgb(hue, rng.uniform(0.0, 0.08), rng.uniform(v_lo, v_hi))
        freq = rng.uniform(0.5, 1.3)
        p = np.concatenate([coords * freq, np.full((len(coords), 1), 0.5, np.float32)], -1)
        p = p + np.float32([rng.random(), rng.random(), 0])
        chosen = _pattern(TEXTURES[rng.integers(len(TEXTURES))], p, _random_directions(rng) * [1, 1, 0])
        return np.stack([c1, c2]), chosen

    floor_colors, floor_choice = plane_texture(grid.floor_xz, 0.35, 0.65)
    wall_colors, wall_choice = plane_texture(grid.wall_xy, 0.45, 0.75)
    which = np.empty(grid.is_wall.shape, np.uint8)  # index into [floor1, floor2, wall1, wall2] per supersample
    which[~grid.is_wall] = floor_choice
    which[grid.is_wall] = 2 + wall_choice
    samples = np.concatenate([floor_colors, wall_colors]).astype(np.float32)[which]
    albedo = (samples[::2, ::2] + samples[1::2, ::2] + samples[::2, 1::2] + samples[1::2, 1::2]) * 0.25
    shade = grid.plane_shade.copy()
    shadow_dir = -TO_LIGHT[[0, 2]] / np.linalg.norm(TO_LIGHT[[0, 2]])
    for obj in objects:  # a soft ellipse cast away from the light, stretched along the light direction
        center = np.float32([obj.x, obj.z]) + shadow_dir * obj.height * np.linalg.norm(TO_LIGHT[[0, 2]]) / TO_LIGHT[1]
        reach = 1.15 * 1.6 * obj.footprint
        corners = np.float32([[center[0] + dx, 0, center[1] + dz] for dx in (-reach, reach) for dz in (-reach, reach)])
        rc = _project(corners, grid, resolution)
        r0, c0 = np.maximum(np.floor(rc.min(0)).astype(int), 0)
        r1, c1 = np.minimum(np.ceil(rc.max(0)).astype(int) + 1, resolution)
        rel = grid.pixel_floor_xz[r0:r1, c0:c1] - center
        along = rel @ shadow_dir
        across = rel @ np.float32([-shadow_dir[1], shadow_dir[0]])
        dist = np.sqrt((along / 1.6) ** 2 + across ** 2) / obj.footprint
        shade[r0:r1, c0:c1] *= 1 - 0.45 * np.clip((1.15 - dist) / 0.5, 0, 1)
    return albedo, shade


def _check_object_counts(min_objects: int, max_objects: int) -> None:
    if not 1 <= min_objects <= max_objects <= 255:
        raise InputError(f"need 1 <= min_objects <= max_objects <= 255, got {min_objects}, {max_objects}; "
                         f"fix the object-count settings")


def render_scene(seed: int, resolution: int = 128, min_objects: int = 3, max_objects: int = 10,
                 style: str = "clevrtex", return_albedo: bool = False
                 ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
    """One random scene -> image (H,W,3) uint8, mask (H,W) uint8 (0 = background, ids 1..n far-to-near).
    style: "clevr" (flat colours, plain floor and wall) or "clevrtex" (textured objects, floor and wall).

    With return_albedo=True also returns a dict for verifying the mask: "albedo" (H,W,3) base colour before shading
    and noise, "colors" (n,2,3) each object's two texture colours, "silhouettes" (n,H,W) where each object would be
    drawn if it were alone (id order)."""
    _check_object_counts(min_objects, max_objects)
    if style not in STYLES:
        raise InputError(f"unknown scene style {style!r}; choose one of {', '.join(STYLES)}")
    rng = np.random.default_rng(seed)
    grid = _grid(resolution)
    min_area = max(6, int(0.0035 * resolution * resolution))  # smaller objects would be a few unreadable pixels
    target = int(rng.integers(min_objects, max_objects + 1))
    objects: list[_Object] = []
    for _ in range(4):  # place, drop the (almost) hidden ones, top up; rarely needs a second round
        objects = _place_objects(rng, target - len(objects), objects, grid, resolution, style)
        objects.sort(key=lambda o: -float(np.linalg.norm(o.center - CAMERA_POS)))  # far to near
        boxes = [_bbox(o, grid, resolution) for o in objects]
        hits = [(b, *_intersect(o, grid.rays[b[0]:b[1], b[2]:b[3]])) if b else (None, None, None, None)
                for o, b in zip(objects, boxes)]
        while True:  # dropping an object only uncovers others, so iterate until every kept object is big enough
            painted = _paint_ids(objects, [(h[0], h[1]) for h in hits], resolution)
            area = np.bincount(painted.ravel() + 1, minlength=len(objects) + 1)[1:]
            keep = [k for k in range(len(objects)) if area[k] >= min_area]
            if len(keep) == len(objects):
                break
            objects, hits = [objects[k] for k in keep], [hits[k] for k in keep]
        if len(objects) >= target:
            break

    albedo, shade = _background(rng, grid, objects, resolution, style)
    image = albedo * shade[..., None]
    for k, (obj, (box, hit, normal, local)) in enumerate(zip(objects, hits)):
        r0, r1, c0, c1 = box
        visible = painted[r0:r1, c0:c1] == k
        keep = visible[hit]
        normal, local = normal[keep], local[keep]
        p = local * obj.tex_freq + obj.tex_offset
        base = obj.colors[_pattern(obj.texture, p, obj.tex_dirs).astype(np.int64)]
        lambert = AMBIENT + DIFFUSE * np.clip(normal @ TO_LIGHT, 0, None)
        color = base * lambert[:, None]
        if obj.shiny:  # Blinn-Phong highlight: metal-like objects as in CLEVR
            view = -grid.rays[r0:r1, c0:c1][visible]
            half = view + TO_LIGHT
            half /= np.linalg.norm(half, axis=-1, keepdims=True)
            color = color + 0.6 * np.clip((normal * half).sum(-1), 0, 1)[:, None] ** 40
        image[r0:r1, c0:c1][visible] = color
        albedo[r0:r1, c0:c1][visible] = base
    image = image + PIXEL_NOISE * rng.standard_normal(image.shape, np.float32)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    mask = (painted + 1).astype(np.uint8)  # painter index k -> id k+1: contiguous because hidden objects were dropped
    if not return_albedo:
        return image, mask
    silhouettes = np.zeros((len(objects), resolution, resolution), bool)
    for k, (box, hit, _, _) in enumerate(hits):
        silhouettes[k, box[0]:box[1], box[2]:box[3]] = hit
    colors = np.stack([o.colors for o in objects]) if objects else np.zeros((0, 2, 3), np.float32)
    return image, mask, {"albedo": albedo, "colors": colors, "silhouettes": silhouettes}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic 2-D shape scenes, for data statistics the CLEVR-like styles lack (a suite to choose presets on):
#   "dsprites":        flat-coloured squares, ellipses, triangles and hearts on a background of random colour,
#                      free to overlap (like Multi-dSprites);
#   "textured-shapes": the same shapes with two-tone textures, on a textured background;
#   "occluded":        a few large flat shapes that overlap heavily.
# Each shape is a hard-edged region tested at the pixel centres and painted in order, so the mask is what was drawn.

SHAPES_2D = ("square", "ellipse", "triangle", "heart")
SHAPE_STYLES = {"dsprites": dict(size=(0.09, 0.2), textured=False),   # size: half-width, a share of the side
                "textured-shapes": dict(size=(0.09, 0.2), textured=True),
                "occluded": dict(size=(0.2, 0.36), textured=False)}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether shape-local points (u, v) lie in the shape, which spans about [-1, 1] on each axis."""
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "ellipse":
        return u ** 2 + (v / 0.55) ** 2 <= 1
    if shape == "triangle":
        return (v >= -0.75) & (v <= 1 - 1.75 * np.abs(u))
    x, y = 1.15 * u, 1.15 * v + 0.15   # heart: (x^2 + y^2 - 1)^3 <= x^2 y^3
    return (x ** 2 + y ** 2 - 1) ** 3 <= x ** 2 * y ** 3


def _distinct_color(rng: np.random.Generator, hue: float, avoid: list[np.ndarray]) -> np.ndarray:
    """A saturated colour near `hue` at least 0.3 (RGB, 0-1) from every colour in `avoid`, where one can be found."""
    for _ in range(20):
        color = hsv_to_rgb((hue + rng.uniform(-0.05, 0.05)) % 1, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
        if all(np.linalg.norm(color - other) >= 0.3 for other in avoid):
            break
    return color


def _texture(rng: np.random.Generator, base: np.ndarray, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """A random two-tone texture of `base` (a darker or lighter second tone) at the points (u, v) -> (..., 3)."""
    second = base * rng.uniform(0.4, 0.65) if rng.random() < 0.7 else base + (1 - base) * rng.uniform(0.45, 0.7)
    p = np.stack([u * freq, v * freq, np.full_like(u, 0.5)], -1) + np.float32([rng.random(), rng.random(), 0])
    chosen = _pattern(TEXTURES[rng.integers(len(TEXTURES))], p, _random_directions(rng) * [1, 1, 0])
    return np.stack([base, second]).astype(np.float32)[chosen.astype(np.int64)]


def render_shapes(seed: int, resolution: int = 64, min_objects: int = 2, max_objects: int = 5,
                  style: str = "dsprites") -> tuple[np.ndarray, np.ndarray]:
    """One random 2-D scene -> image (H,W,3) uint8, mask (H,W) uint8 (0 = background, ids 1..n bottom to top).
    Shapes hidden below a few pixels are dropped and others placed until the scene has its count (within 4 rounds)."""
    _check_object_counts(min_objects, max_objects)
    if style not in SHAPE_STYLES:
        raise InputError(f"unknown shape style {style!r}; choose one of {', '.join(SHAPE_STYLES)}")
    rng = np.random.default_rng(seed)
    size, textured = SHAPE_STYLES[style]["size"], SHAPE_STYLES[style]["textured"]
    ys, xs = (np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5) / resolution
    min_area = max(6, int(0.0035 * resolution * resolution))
    target = int(rng.integers(min_objects, max_objects + 1))
    background_hue = rng.random()
    background = hsv_to_rgb(background_hue, rng.uniform(0.1, 0.9), rng.uniform(0.25, 0.95))
    colors, regions = [background], []
    for _ in range(4):
        for k in range(target - len(regions)):
            half, angle = rng.uniform(*size), rng.uniform(0, 2 * np.pi)
            cx, cy = rng.uniform(half * 0.5, 1 - half * 0.5, 2)
            dx, dy = xs - cx, ys - cy
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / half
            v = (-dx * np.sin(angle) + dy * np.cos(angle)) / half
            color = _distinct_color(rng, background_hue + 0.2 + 0.618034 * len(colors), colors)
            look = _texture(rng, color, u, v, rng.uniform(1.2, 2.5)) if textured else color
            regions.append((_inside(SHAPES_2D[rng.integers(len(SHAPES_2D))], u, v), look))
            colors.append(color)
        painted = np.zeros((resolution, resolution), np.int64)   # 0 background, k + 1 = region k, painted in order
        for k, (inside, _) in enumerate(regions):
            painted[inside] = k + 1
        area = np.bincount(painted.ravel(), minlength=len(regions) + 1)[1:]
        regions = [region for region, visible in zip(regions, area) if visible >= min_area]
        if len(regions) >= target:
            break
    image = (_texture(rng, background, xs, ys, rng.uniform(6, 12)) if textured
             else np.broadcast_to(background, (resolution, resolution, 3))).copy()
    mask = np.zeros((resolution, resolution), np.uint8)
    for k, (inside, look) in enumerate(regions):
        image[inside] = look[inside] if textured else look
        mask[inside] = k + 1
    image = image + PIXEL_NOISE * rng.standard_normal(image.shape, np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def render(seed: int, resolution: int, min_objects: int, max_objects: int, style: str) -> tuple[np.ndarray, np.ndarray]:
    """One scene of any embedded style: render_scene's CLEVR-like ones or render_shapes' 2-D ones."""
    if style in SHAPE_STYLES:
        return render_shapes(seed, resolution, min_objects, max_objects, style)
    return render_scene(seed, resolution, min_objects, max_objects, style)
